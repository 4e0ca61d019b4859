//! `--enable-sandbox` and `--enable-seccomp` (src/isolation.rs), from the outside: what
//! `/proc/PID` shows of the isolated process (seccomp mode, `no_new_privs`, capability
//! sets, its root), that data still flows through every path (TCP by hash, UDP, ICMP, DNS,
//! a published port, the API socket, exits), that a forbidden syscall kills it with
//! `SIGSYS`, that the `run` mode works isolated, also unprivileged (where usernet needs a
//! user namespace of its own), and that none of this happens without the flags.

mod util;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use util::*;

/// Both isolation flags.
const ISOLATED: [&str; 2] = ["--enable-sandbox", "--enable-seccomp"];

/// A capability set holding only `CAP_NET_BIND_SERVICE` (bit 10), as `/proc/PID/status`
/// prints it.
const NET_BIND_SERVICE_ONLY: &str = "0000000000000400";

/// An empty capability set.
const NO_CAPS: &str = "0000000000000000";

/// The environment variable that makes usernet call a forbidden syscall once isolated.
const PROBE_ENV: &str = "USERNET_TEST_FORBIDDEN_SYSCALL";

/// Host directories that must not be visible from the sandbox's root.
const HOST_ONLY: [&str; 8] = ["usr", "home", "proc", "bin", "lib", "sys", "dev", "var"];

fn any(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 0)
}

/// `/proc/PID/status`.
fn status(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"))
}

/// One field of `/proc/PID/status`, trimmed.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name}: in /proc/PID/status:\n{status}"))
        .trim()
        .to_string()
}

/// Asserts seccomp filter mode, `no_new_privs` and only `CAP_NET_BIND_SERVICE` left.
#[track_caller]
fn assert_isolated(pid: u32) {
    let s = status(pid);
    assert_eq!(field(&s, "Seccomp"), "2", "seccomp filter mode:\n{s}");
    assert_eq!(field(&s, "NoNewPrivs"), "1", "no_new_privs:\n{s}");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(&s, set), NET_BIND_SERVICE_ONLY, "{set}:\n{s}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(field(&s, set), NO_CAPS, "{set}:\n{s}");
    }
}

/// The names in `/proc/PID/root`, sorted.
fn root_entries(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap_or_else(|e| panic!("list /proc/{pid}/root: {e}"))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that usernet's root is the sandbox: none of the host's directories but `/etc`
/// and `/run` (read-only, the host's own, as slirp4netns keeps them), and
/// `/etc/resolv.conf` readable there with the content usernet was started with.
#[track_caller]
fn assert_sandbox_root(t: &Topology, pid: u32) {
    let entries = root_entries(pid);
    for dir in HOST_ONLY {
        assert!(
            !entries.iter().any(|e| e == dir),
            "/{dir} is visible in the sandbox: {entries:?}"
        );
    }
    assert_eq!(
        entries,
        vec!["etc".to_string(), "run".to_string()],
        "the sandbox's root holds only what usernet keeps"
    );
    let root = format!("/proc/{pid}/root");
    // /etc and /run are the host's, whole: tools read /proc/PID/root/etc.
    for (dir, file) in [("etc", "passwd"), ("etc", "ld.so.cache"), ("run", "netns")] {
        let inside = format!("{root}/{dir}/{file}");
        let host = format!("/{dir}/{file}");
        assert_eq!(
            fs::symlink_metadata(&inside).map(|m| m.file_type()).ok(),
            fs::symlink_metadata(&host).map(|m| m.file_type()).ok(),
            "{inside} is not the host's {host}"
        );
        if file == "passwd" {
            assert_eq!(fs::read(&inside).ok(), fs::read(&host).ok(), "{inside}");
        }
    }
    for dir in ["etc", "run"] {
        let err = fs::write(format!("{root}/{dir}/usernet-new-file"), "x")
            .expect_err("kept directories are read-only");
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "/{dir}: {err}");
    }
    let inside = fs::read_to_string(format!("{root}/etc/resolv.conf"))
        .unwrap_or_else(|e| panic!("resolv.conf in the sandbox: {e}"));
    let host =
        fs::read_to_string(format!("/etc/netns/{}/resolv.conf", t.host)).expect("H's resolv.conf");
    assert_eq!(inside, host, "the sandbox must see H's resolv.conf");
    assert_read_only(Path::new(&format!("{root}/etc/resolv.conf")));
    let err = fs::write(format!("{root}/new-file"), "x").expect_err("the root is read-only");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "creating a file: {err}"
    );
}

/// Asserts that opening `path` for writing fails with `EROFS` (nothing is written).
#[track_caller]
fn assert_read_only(path: &Path) {
    let err = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect_err("a kept file must be read-only");
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EROFS),
        "{}: {err}",
        path.display()
    );
}

/// Asserts the opposite of [`assert_isolated`] and [`assert_sandbox_root`].
#[track_caller]
fn assert_not_isolated(pid: u32) {
    let s = status(pid);
    assert_eq!(
        field(&s, "Seccomp"),
        "0",
        "no filter without the flag:\n{s}"
    );
    assert_eq!(field(&s, "NoNewPrivs"), "0", "{s}");
    assert_ne!(field(&s, "CapBnd"), NET_BIND_SERVICE_ONLY, "{s}");
    assert_ne!(field(&s, "CapEff"), NET_BIND_SERVICE_ONLY, "{s}");
    let entries = root_entries(pid);
    assert!(
        entries.iter().any(|e| e == "usr") && entries.iter().any(|e| e == "proc"),
        "the host's root without the flag: {entries:?}"
    );
}

/// Asserts that `st` is death by `SIGSYS` (a seccomp kill).
#[track_caller]
fn assert_sigsys(st: ExitStatus, stderr: &str) {
    assert_eq!(
        st.signal(),
        Some(libc::SIGSYS),
        "expected death by SIGSYS (31), got {st}; stderr:\n{stderr}"
    );
}

/// One API exchange on the socket at `path`: request, half-close, reply to EOF.
fn api(path: &Path, req: &str) -> String {
    let mut s = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("connect API socket {}: {e}", path.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(format!("{req}\n").as_bytes())
        .expect("write request");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("reply to {req}: {e} (got {out:?})"));
    out
}

fn ping(t: &Topology, dst: &str) -> Finished {
    t.run_in_container(
        "ping",
        &["-n", "-c", "2", "-W", "1", dst],
        Duration::from_secs(20),
    )
}

// ---------------------------------------------------------------------------------------------
// Attach mode, both flags
// ---------------------------------------------------------------------------------------------

#[test]
fn sandbox_seccomp_attach_isolated_and_every_path_flows() {
    let Some(t) = Topology::new() else { return };
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let dns = DnsServer::start(&t);
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let source = TcpServer::source(&t.world_ns(), any(WORLD));
    let echo = UdpEcho::start(&t.world_ns(), any(WORLD));
    let published = TcpServer::sink(&t.container_ns(), any(Ipv4Addr::UNSPECIFIED));
    let published_api = TcpServer::sink(&t.container_ns(), any(Ipv4Addr::UNSPECIFIED));
    let sock = t.tmp.join("api.sock");
    let p = format!("8080:{}", published.addr.port());
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "-a", sock.to_str().expect("utf-8"), "-p", &p])
        .args(ISOLATED)
        .start();

    // Isolated by the time it says ready.
    assert_isolated(u.pid);
    assert_sandbox_root(&t, u.pid);

    // TCP both ways, compared by hash.
    t.in_container(|| upload_to_sink(sink.addr, 0x5A0, 8 << 20));
    t.in_container(|| download_from_source(source.addr, 0x5A1, 8 << 20));
    assert_eq!(sink.stats.peer_ips(), vec![HOST_ADDR]);
    // UDP.
    t.in_container(|| {
        let s = udp_socket(any(Ipv4Addr::UNSPECIFIED));
        for size in [1usize, 1000, 1472] {
            udp_roundtrip(&s, echo.addr, &pattern(size as u64, size), 3)
                .unwrap_or_else(|e| panic!("UDP {size} bytes: {e}"));
        }
    });
    // DNS over UDP and TCP through the forwarder.
    let q = dns_query(0x5AFE, DNS_NAME, QTYPE_A);
    let (udp, tcp) = t.in_container(|| {
        (
            dns_udp_exchange(SocketAddrV4::new(DNS, 53), &q),
            dns_tcp_exchange(SocketAddrV4::new(DNS, 53), &q),
        )
    });
    for (how, reply) in [
        ("UDP", udp.expect("no DNS answer over UDP")),
        ("TCP", tcp.expect("DNS over TCP")),
    ] {
        let r = parse_dns(&reply).expect("malformed DNS answer");
        assert_eq!((r.id, r.rcode), (0x5AFE, 0), "{how}");
        assert_eq!(r.a, vec![WORLD], "{how}");
    }
    assert!(dns.udp_queries.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // ICMP: ping sockets made in the sandbox.
    if require_tool("ping") {
        let f = ping(&t, &WORLD.to_string());
        f.assert_success();
        let f = ping(&t, &GATEWAY.to_string());
        f.assert_success();
    }
    // A port published with -p, then one through the API (socket, bind, listen under the
    // filter), both fed from the world.
    t.in_world(|| upload_to_sink(SocketAddrV4::new(HOST_ADDR, 8080), 0x5A2, 4 << 20));
    let req = format!(
        r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"0.0.0.0","host_port":8081,"guest_port":{}}}}}"#,
        published_api.addr.port()
    );
    let reply = api(&sock, &req);
    assert!(reply.contains("\"return\""), "add_hostfwd: {reply}");
    t.in_world(|| upload_to_sink(SocketAddrV4::new(HOST_ADDR, 8081), 0x5A3, 4 << 20));
    let list = api(&sock, r#"{"execute":"list_hostfwd"}"#);
    assert!(list.contains("8081"), "list_hostfwd: {list}");
    // A garbage request is answered, not fatal.
    let bad = api(&sock, "{not json");
    assert!(bad.contains("error"), "garbage request: {bad}");

    u.assert_running();
    assert_isolated(u.pid);

    // Exit on SIGTERM: status 0, and the API socket unlinked from inside the sandbox.
    u.signal(Signal::SIGTERM);
    let st = u
        .wait_exit(EXIT_GUARD)
        .expect("usernet still running after SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "exit after SIGTERM: {st}\n{}",
        u.stderr()
    );
    assert!(
        !sock.exists(),
        "the API socket must be unlinked at exit, also when sandboxed"
    );
}

#[test]
fn sandbox_seccomp_exit_fd_and_namespace_deletion_still_end_usernet() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info"])
        .args(ISOLATED)
        .exit_fd()
        .start();
    assert_isolated(u.pid);
    u.close_exit_fd();
    u.assert_exited_0("the -e pipe closed", "exit fd closed: exiting");

    // The target watch (inotify on /run/netns) still works after pivot_root: the log line
    // names it as the cause (no timer could have ended usernet).
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info"])
        .args(ISOLATED)
        .start();
    assert_isolated(u.pid);
    ip(&["netns", "del", &t.container]);
    u.assert_exited_0("`ip netns del`", "the namespace went away: exiting");
}

#[test]
fn sandbox_seccomp_pid_target_exit_is_noticed_through_the_pidfd() {
    let Some(t) = Topology::new() else { return };
    // `ip netns exec C sleep 60` execs in place: its PID lives in C.
    let mut sleeper = ChildGuard::spawn(t.exec_in(&t.container, "sleep", &["60"]));
    let pid = sleeper.pid();
    let ok = wait_for(Duration::from_secs(10), || {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    });
    assert!(ok.is_some(), "the sleeper did not start");
    let pid_s = pid.to_string();
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "--log-level", "info"])
        .args(ISOLATED)
        .target(["--netns-type=pid", pid_s.as_str(), "tap0"])
        .start();
    assert_isolated(u.pid);
    t.in_container(|| upload_to_sink(sink.addr, 0x5B, 1 << 20));
    // The target's end is seen through the pidfd (poll(2) under the filter).
    sleeper.0.kill().expect("kill the sleeper");
    let _ = sleeper.0.wait();
    u.assert_exited_0("its target exited", "the namespace went away: exiting");
}

#[test]
fn sandbox_keeps_resolv_conf_behind_a_symlink_even_under_tmp() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("unshare") {
        return;
    }
    // In a mount namespace of its own, usernet's /etc is a tmpfs where resolv.conf is a
    // symbolic link to a file in the test's directory under /tmp, the very directory the
    // sandbox mounts its new root on. ld.so.cache is copied so that usernet still starts.
    let real = t.tmp.join("real-resolv.conf");
    fs::write(&real, "nameserver 127.0.0.1\n# behind a symlink\n").expect("write");
    let cache = t.tmp.join("ld.so.cache");
    let _ = fs::copy("/etc/ld.so.cache", &cache);
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /etc; \
         if [ -e {cache} ]; then cp {cache} /etc/ld.so.cache; fi; \
         ln -s {real} /etc/resolv.conf; exec \"$@\"",
        cache = cache.display(),
        real = real.display()
    );
    let mut u = UsernetCmd::new(&t)
        .wrap([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script.as_str(),
            "sh",
        ])
        .args(["-c"])
        .args(ISOLATED)
        .start();
    assert_isolated(u.pid);
    let root = format!("/proc/{}/root", u.pid);
    let link = fs::read_link(format!("{root}/etc/resolv.conf"))
        .unwrap_or_else(|e| panic!("/etc/resolv.conf in the sandbox is not a symlink: {e}"));
    assert_eq!(link, real, "the symlink is replayed as it was");
    let rel = real.strip_prefix("/").expect("absolute");
    let inside = format!("{root}/{}", rel.display());
    assert_eq!(
        fs::read_to_string(&inside).unwrap_or_else(|e| panic!("{inside}: {e}")),
        fs::read_to_string(&real).expect("real")
    );
    assert_read_only(Path::new(&inside));
    // Nothing else of the test's directory is there.
    let dir = Path::new(&inside).parent().expect("parent");
    let names: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![real.file_name().expect("name").to_owned()]);
    // DNS still answers.
    let _dns = DnsServer::start(&t);
    let reply = t.in_container(|| {
        dns_udp_exchange(SocketAddrV4::new(DNS, 53), &dns_query(7, DNS_NAME, QTYPE_A))
    });
    assert!(reply.is_some(), "no DNS answer");
    u.assert_running();
}

// ---------------------------------------------------------------------------------------------
// The filter kills
// ---------------------------------------------------------------------------------------------

#[test]
fn seccomp_forbidden_syscall_kills_with_sigsys() {
    let Some(t) = Topology::new() else { return };
    for flags in [&ISOLATED[..], &["--enable-seccomp"][..]] {
        let probe = format!("{PROBE_ENV}=1");
        let (_ready, mut u) = UsernetCmd::new(&t)
            .wrap(["env", probe.as_str()])
            .args(["-c"])
            .args(flags)
            .try_start();
        let st = u
            .wait_exit(EXIT_GUARD)
            .unwrap_or_else(|| panic!("{flags:?}: still running with the probe set"));
        assert_sigsys(st, &u.stderr());
    }
}

#[test]
fn seccomp_only_filters_without_sandbox() {
    let Some(t) = Topology::new() else { return };
    let mut u = UsernetCmd::new(&t).args(["-c", "--enable-seccomp"]).start();
    let s = status(u.pid);
    assert_eq!(field(&s, "Seccomp"), "2", "{s}");
    assert_eq!(field(&s, "NoNewPrivs"), "1", "{s}");
    assert_ne!(
        field(&s, "CapEff"),
        NET_BIND_SERVICE_ONLY,
        "no sandbox, no drop:\n{s}"
    );
    assert!(root_entries(u.pid).iter().any(|e| e == "usr"));
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    t.in_container(|| upload_to_sink(sink.addr, 0x5C, 1 << 20));
    u.assert_running();
}

#[test]
fn without_the_flags_nothing_is_isolated_and_the_probe_is_harmless() {
    let Some(t) = Topology::new() else { return };
    let probe = format!("{PROBE_ENV}=1");
    let mut u = UsernetCmd::new(&t)
        .wrap(["env", probe.as_str()])
        .args(["-c"])
        .start();
    assert_not_isolated(u.pid);
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    t.in_container(|| upload_to_sink(sink.addr, 0x5D, 1 << 20));
    u.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Run mode
// ---------------------------------------------------------------------------------------------

/// Polls usernet's status until it is isolated (run mode has no ready fd).
fn wait_isolated(pid: u32) {
    let ok = wait_for(READY_TIMEOUT, || {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        (field(&s, "Seccomp") == "2").then_some(())
    });
    assert!(ok.is_some(), "usernet {pid} never got its filter");
    assert_isolated(pid);
}

#[test]
fn run_isolated_reaches_the_world_and_returns_the_exit_code() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    // The command waits until the test has looked at usernet, then talks to the world.
    let go = t.tmp.join("go");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; \
         exec 3<>/dev/tcp/{WORLD}/{port} 2>/dev/null || exit 9; exit 7",
        go = go.display(),
        port = sink.addr.port()
    );
    let mut u = UsernetCmd::new(&t)
        .target(
            ["run"]
                .into_iter()
                .chain(ISOLATED)
                .chain(["--", "bash", "-c", script.as_str()]),
        )
        .spawn();
    wait_isolated(u.pid);
    let entries = root_entries(u.pid);
    assert!(!entries.iter().any(|e| e == "usr"), "{entries:?}");
    fs::write(&go, "").expect("go");
    let st = u
        .wait_exit(Duration::from_secs(30))
        .expect("run mode did not end");
    assert_eq!(st.code(), Some(7), "{st}\n{}", u.stderr());
}

#[test]
fn run_isolated_passes_sigterm_to_the_command() {
    let Some(t) = Topology::new() else { return };
    // The command says when its trap is set: usernet is isolated before it releases the
    // command, so isolation alone does not mean the trap is there yet.
    let trapped = t.tmp.join("trapped");
    let script = format!(
        "trap 'exit 5' TERM; touch {}; while :; do sleep 0.1; done",
        trapped.display()
    );
    let mut u = UsernetCmd::new(&t)
        .target(
            ["run"]
                .into_iter()
                .chain(ISOLATED)
                .chain(["--", "sh", "-c", script.as_str()]),
        )
        .spawn();
    wait_isolated(u.pid);
    let set = wait_for(Duration::from_secs(20), || trapped.exists().then_some(()));
    assert!(
        set.is_some(),
        "the command never set its trap\n{}",
        u.stderr()
    );
    // kill(2) of the command's PID, under the filter.
    u.signal(Signal::SIGTERM);
    let st = u
        .wait_exit(EXIT_GUARD)
        .expect("run mode did not end after SIGTERM");
    assert_eq!(
        st.code(),
        Some(5),
        "the command's status after SIGTERM: {st}\n{}",
        u.stderr()
    );
}

#[test]
fn run_isolated_as_unprivileged_user_gets_its_own_user_namespace() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("setpriv") {
        return;
    }
    let mode = fs::metadata("/dev/net/tun").map(|m| m.permissions().mode() & 0o777);
    if !require(
        matches!(mode, Ok(m) if m & 0o666 == 0o666),
        "/dev/net/tun must be mode 0666 for unprivileged users (.ci/run does it)",
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
    let mut probe = t.exec_in(&t.host, "setpriv", &nobody[1..]);
    probe.args(["unshare", "--user", "--net", "true"]);
    let p = run_with_timeout(probe, Duration::from_secs(10));
    if !require(
        p.success(),
        &format!("unprivileged user namespaces do not work here:\n{p}"),
    ) {
        return;
    }
    let sink = TcpServer::sink(&t.world_ns(), any(WORLD));
    let go = t.tmp.join("go");
    // The test directory must be reachable by nobody for the command to see `go`.
    fs::set_permissions(&t.tmp, fs::Permissions::from_mode(0o755)).expect("chmod");
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; \
         exec 3<>/dev/tcp/{WORLD}/{port} || exit 9; exit 3",
        go = go.display(),
        port = sink.addr.port()
    );
    let mut u = UsernetCmd::new(&t)
        .wrap(nobody)
        .target(
            ["run"]
                .into_iter()
                .chain(ISOLATED)
                .chain(["--", "bash", "-c", script.as_str()]),
        )
        .spawn();
    wait_isolated(u.pid);
    // Its own user namespace: not ours.
    let ours = fs::read_link("/proc/self/ns/user").expect("our userns");
    let its = fs::read_link(format!("/proc/{}/ns/user", u.pid)).expect("its userns");
    assert_ne!(ours, its, "usernet should have made a user namespace");
    let entries = root_entries(u.pid);
    assert!(!entries.iter().any(|e| e == "usr"), "{entries:?}");
    // Not dumpable: another process of the same user (a container sharing the host's PID
    // namespace) can neither ptrace usernet nor read its /proc files, root excepted. A
    // dumpable process of that user, for contrast, is readable.
    let mut same_user = t.exec_in(&t.host, "setpriv", &nobody[1..]);
    same_user.args(["sleep", "30"]);
    let contrast = ChildGuard::spawn(same_user);
    // Until it has become `sleep` it is still root's `ip` or `setpriv`.
    let comm = format!("/proc/{}/comm", contrast.pid());
    let became = wait_for(Duration::from_secs(10), || {
        (std::fs::read_to_string(&comm).ok()?.trim() == "sleep").then_some(())
    });
    assert!(became.is_some(), "the contrast process never became sleep");
    for (pid, readable) in [(contrast.pid(), true), (u.pid, false)] {
        for (tool, file) in [("cat", "environ"), ("ls", "root/")] {
            let path = format!("/proc/{pid}/{file}");
            let mut c = t.exec_in(&t.host, "setpriv", &nobody[1..]);
            c.args([tool, &path]);
            let r = run_with_timeout(c, Duration::from_secs(10));
            assert_eq!(
                r.success(),
                readable,
                "{tool} {path} as the same user:\n{r}"
            );
            if !readable {
                assert!(r.stderr.contains("Permission denied"), "{path}:\n{r}");
            }
        }
    }
    drop(contrast);
    fs::write(&go, "").expect("go");
    let st = u
        .wait_exit(Duration::from_secs(30))
        .expect("run mode did not end");
    assert_eq!(st.code(), Some(3), "{st}\n{}", u.stderr());
}
