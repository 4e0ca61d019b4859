//! `usernet run -- CMD` as people use it: the command's own PID namespace (nothing it
//! starts outlives it or usernet, signals reach it first, a grace period before the kill),
//! and every set-up step finished before the command is released (a failure means the
//! command never runs).
//!
//! Processes left behind are looked for by their command line: each test's `sleep` gets a
//! duration no other process has (`40.<test pid><n>`).

mod util;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

/// A `sleep` argument no other process on the machine uses.
fn marker(n: u32) -> String {
    format!("40.{}{n}", std::process::id())
}

/// Kills leftovers (by PID) so that a failing test does not leave them running.
struct Leftovers(String);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in sleepers(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn run_cmd<'t>(t: &'t Topology, opts: &[&str], script: &str) -> UsernetCmd<'t> {
    let mut target = vec!["run"];
    target.extend_from_slice(opts);
    target.extend_from_slice(&["--", "sh", "-c", script]);
    UsernetCmd::new(t).target(target)
}

/// Starts `usernet run OPTS -- sh -c SCRIPT` and waits until `sleep MARKER` runs.
fn start_with_sleeper(t: &Topology, opts: &[&str], script: &str, marker: &str) -> Usernet {
    let mut u = run_cmd(t, opts, script).spawn();
    let seen = wait_for(Duration::from_secs(20), || {
        (!sleepers(marker).is_empty()).then_some(())
    });
    if seen.is_none() {
        u.assert_running();
        panic!("`sleep {marker}` never started");
    }
    u
}

/// Asserts that usernet exits with `code` within [`EXIT_GUARD`]. How the command ended is
/// in the code (143: the SIGTERM passed on; 137: killed after the stop timeout), not in
/// how long a busy machine took.
#[track_caller]
fn assert_exit(u: &mut Usernet, code: i32) {
    let status = u
        .wait_exit(EXIT_GUARD)
        .unwrap_or_else(|| panic!("usernet still runs after {EXIT_GUARD:?}"));
    assert_eq!(
        status.code(),
        Some(code),
        "{status}: {}",
        u.stderr_at_exit()
    );
}

/// The stdout of usernet, which has exited, shows `text` (read to its end: the capture
/// thread may lag behind the exit).
#[track_caller]
fn assert_stdout(u: &Usernet, text: &str) {
    let out = u.stdout_at_exit();
    assert!(out.contains(text), "stdout lacks {text:?}: {out}");
}

#[test]
fn sigterm_ends_the_command_and_everything_it_started() {
    let Some(t) = Topology::new() else { return };
    let m = marker(1);
    let _guard = Leftovers(m.clone());
    let script = format!("sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    u.signal(Signal::SIGTERM);
    // sh dies of the SIGTERM passed on to it (it is not PID 1): 128 + 15, at once.
    assert_exit(&mut u, 143);
    assert_eq!(
        sleepers(&m),
        Vec::<u32>::new(),
        "`sleep {m}` outlived usernet"
    );
}

#[test]
fn background_job_does_not_outlive_the_command() {
    let Some(t) = Topology::new() else { return };
    let m = marker(2);
    let _guard = Leftovers(m.clone());
    let script = format!("sleep {m} & echo started");
    let f = run_cmd(&t, &[], &script).output(Duration::from_secs(30));
    assert_eq!(f.code(), Some(0), "{f}");
    // Had usernet waited for the background `sleep` (40 s), the 30 s guard would have
    // ended it with no exit code.
    assert!(f.stdout.contains("started"), "{f}");
    assert_eq!(
        sleepers(&m),
        Vec::<u32>::new(),
        "`sleep {m}` outlived the command"
    );
}

#[test]
fn command_is_pid_2_under_its_own_init_and_sees_its_own_proc() {
    let Some(t) = Topology::new() else { return };
    let f = run_cmd(&t, &[], "echo pid=$$; ls /proc | grep -c '^[0-9]'")
        .output(Duration::from_secs(30));
    assert_eq!(f.code(), Some(0), "{f}");
    assert!(f.stdout.contains("pid=2\n"), "{f}");
    // init, sh, ls, grep: a handful, not the host's processes.
    let count: u32 = f
        .stdout
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(999);
    assert!(count <= 5, "/proc shows {count} processes:\n{f}");
}

#[test]
fn signals_reach_the_command_first() {
    let Some(t) = Topology::new() else { return };
    let m = marker(3);
    let _guard = Leftovers(m.clone());
    let script = format!("trap 'echo got USR1; exit 5' USR1; sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    u.signal(Signal::SIGUSR1);
    assert_exit(&mut u, 5);
    assert_stdout(&u, "got USR1");
    assert_eq!(sleepers(&m), Vec::<u32>::new());

    // A command that traps SIGTERM and cleans up gets to do so.
    let m = marker(4);
    let _guard = Leftovers(m.clone());
    let script = format!("trap 'echo cleaning up; exit 0' TERM; sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    u.signal(Signal::SIGTERM);
    assert_exit(&mut u, 0);
    assert_stdout(&u, "cleaning up");
    assert_eq!(sleepers(&m), Vec::<u32>::new());
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    let Some(t) = Topology::new() else { return };
    let m = marker(5);
    let _guard = Leftovers(m.clone());
    let script = format!("trap '' TERM; sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &["--stop-timeout", "1"], &script, &m);
    let sent = Instant::now();
    u.signal(Signal::SIGTERM);
    assert_exit(&mut u, 137);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed after {took:?}, before the stop timeout"
    );
    assert_eq!(
        sleepers(&m),
        Vec::<u32>::new(),
        "`sleep {m}` outlived usernet"
    );
}

#[test]
fn sigkill_of_usernet_takes_the_command_along() {
    let Some(t) = Topology::new() else { return };
    let m = marker(6);
    let _guard = Leftovers(m.clone());
    let script = format!("sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    u.signal(Signal::SIGKILL);
    u.wait_exit(EXIT_GUARD).expect("usernet exits");
    let gone = wait_for(EXIT_GUARD, || sleepers(&m).is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "`sleep {m}` outlived usernet: {:?}",
        sleepers(&m)
    );
}

/// Runs `usernet run OPTS -- touch MARKER` where a set-up step must fail; asserts a clear
/// message naming `needle` and that the command never ran.
fn assert_setup_failure_stops_the_command(t: &Topology, opts: &[&str], needle: &str) {
    let marker = t.tmp.join("command-ran");
    let marker_s = marker.to_str().unwrap();
    let mut target = vec!["run"];
    target.extend_from_slice(opts);
    target.extend_from_slice(&["--", "touch", marker_s]);
    let f = UsernetCmd::new(t)
        .target(target)
        .output(Duration::from_secs(30));
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(
        f.stderr.contains(needle),
        "message does not name {needle}:\n{f}"
    );
    // Let a wrongly released command finish before looking.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !marker.exists(),
        "the command ran although set-up failed:\n{f}"
    );
}

#[test]
fn taken_port_stops_usernet_before_the_command_runs() {
    let Some(t) = Topology::new() else { return };
    let taken = t.in_host(|| {
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).expect("bind in H")
    });
    let port = taken.local_addr().unwrap().port();
    let spec = format!("{port}:80");
    assert_setup_failure_stops_the_command(&t, &["-p", &spec], &port.to_string());
}

#[test]
fn unusable_api_socket_stops_usernet_before_the_command_runs() {
    let Some(t) = Topology::new() else { return };
    let path = t.tmp.join("no-such-dir").join("api.sock");
    assert!(!Path::new(&path).parent().unwrap().exists());
    assert_setup_failure_stops_the_command(&t, &["-a", path.to_str().unwrap()], "api.sock");
}

// ---------------------------------------------------------------------------------------------
// The control API without asking: $XDG_RUNTIME_DIR/usernet/NAME.sock, `ports`, `stats`, `ps`
// ---------------------------------------------------------------------------------------------

/// A private `$XDG_RUNTIME_DIR` for one test, so that runs of other tests stay out of it.
fn runtime_env(t: &Topology) -> (std::path::PathBuf, Vec<String>) {
    let xdg = t.tmp.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    let wrap = vec![
        "env".to_owned(),
        format!("XDG_RUNTIME_DIR={}", xdg.display()),
    ];
    (xdg.join("usernet"), wrap)
}

/// Runs a client subcommand (`ports list`, `stats`, `ps`) with the test's runtime dir.
fn client(t: &Topology, wrap: &[String], args: &[&str]) -> Finished {
    UsernetCmd::new(t)
        .wrap(wrap)
        .target(args)
        .output(Duration::from_secs(20))
}

#[test]
fn run_serves_its_api_under_its_name_and_clients_find_it() {
    let Some(t) = Topology::new() else { return };
    let (dir, wrap) = runtime_env(&t);
    let m = marker(7);
    let _guard = Leftovers(m.clone());
    let script = format!("sleep {m} & wait");
    let mut u = run_cmd(&t, &["--name", "web", "-p", "127.0.0.1:18080:80"], &script)
        .wrap(&wrap)
        .spawn();
    let up = wait_for(Duration::from_secs(20), || {
        (!sleepers(&m).is_empty()).then_some(())
    });
    assert!(up.is_some(), "the command never started:\n{}", u.stderr());
    let socket = dir.join("web.sock");
    assert!(socket.exists(), "no API socket {}", socket.display());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "{}", dir.display());

    // The only run: found without -a or --name.
    let f = client(&t, &wrap, &["ports", "list"]);
    assert!(f.success(), "{f}");
    assert!(
        f.stdout.contains("tcp 127.0.0.1:18080 -> 10.0.2.100:80"),
        "{f}"
    );
    let f = client(&t, &wrap, &["stats", "--name", "web"]);
    assert!(f.success(), "{f}");
    assert!(f.stdout.contains("flows.published_ports 1"), "{f}");

    // A stale socket (its usernet died) is cleaned away by `ps`, which lists the live run.
    drop(std::os::unix::net::UnixListener::bind(dir.join("dead.sock")).unwrap());
    let f = client(&t, &wrap, &["ps"]);
    assert!(f.success(), "{f}");
    let line = f
        .stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("{f}"));
    assert_eq!(
        line,
        format!("web {} 127.0.0.1:18080->80/tcp sh -c {script}", u.pid),
        "{f}"
    );
    assert!(!f.stdout.contains("dead"), "{f}");
    assert!(
        !dir.join("dead.sock").exists(),
        "the stale socket is still there"
    );

    // The name is taken while it runs: refused before the command could run.
    let other = t.tmp.join("second-ran");
    let f = UsernetCmd::new(&t)
        .wrap(&wrap)
        .target([
            "run",
            "--name",
            "web",
            "--",
            "touch",
            other.to_str().unwrap(),
        ])
        .output(Duration::from_secs(20));
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(
        f.stderr.contains("usernet named web is running already"),
        "{f}"
    );
    assert!(!other.exists());

    // Two runs: a client without --name says which there are.
    let m2 = marker(8);
    let _guard2 = Leftovers(m2.clone());
    let mut u2 = run_cmd(&t, &[], &format!("sleep {m2} & wait"))
        .wrap(&wrap)
        .spawn();
    let up = wait_for(Duration::from_secs(20), || {
        (!sleepers(&m2).is_empty()).then_some(())
    });
    assert!(
        up.is_some(),
        "the second command never started:\n{}",
        u2.stderr()
    );
    // Its default name is its PID.
    assert!(dir.join(format!("{}.sock", u2.pid)).exists());
    let f = client(&t, &wrap, &["stats"]);
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(
        f.stderr.contains("several usernet runs")
            && f.stderr.contains("web")
            && f.stderr.contains("--name"),
        "{f}"
    );

    // Socket files go when their runs end.
    u.signal(Signal::SIGTERM);
    u2.signal(Signal::SIGTERM);
    assert_exit(&mut u, 143);
    assert_exit(&mut u2, 143);
    assert!(!socket.exists());
    let f = client(&t, &wrap, &["ports", "list"]);
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(f.stderr.contains("no usernet run is running"), "{f}");
}

// ---------------------------------------------------------------------------------------------
// Published ports: both families without an address, one family with one
// ---------------------------------------------------------------------------------------------

/// The greeting of the container's server, read through host address `addr`.
fn greeting(t: &Topology, addr: std::net::SocketAddr) -> std::io::Result<String> {
    t.in_host(|| {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
}

#[test]
fn publish_without_address_listens_on_ipv4_and_ipv6() {
    let Some(t) = Topology::new_ipv6() else {
        return;
    };
    if !require_tool("socat") {
        return;
    }
    let (_, wrap) = runtime_env(&t);
    // Dual-stack: an IPv6 client reaches the container over IPv6 (it has fd00::100).
    let server =
        "socat TCP6-LISTEN:80,ipv6only=0,fork,reuseaddr SYSTEM:'echo hello from the container'";
    let mut u = run_cmd(&t, &["-p", "18082:80", "-p", "127.0.0.1:18083:80"], server)
        .wrap(&wrap)
        .spawn();
    let f = wait_for(Duration::from_secs(20), || {
        let f = client(&t, &wrap, &["ports", "list"]);
        f.success().then_some(f)
    });
    let Some(f) = f else {
        u.assert_running();
        panic!("no API answer");
    };
    for rule in [
        "tcp 0.0.0.0:18082 -> 10.0.2.100:80",
        "tcp [::]:18082 -> 10.0.2.100:80",
        "tcp 127.0.0.1:18083 -> 10.0.2.100:80",
    ] {
        assert!(f.stdout.contains(rule), "no rule {rule}:\n{f}");
    }
    assert_eq!(f.stdout.lines().count(), 4, "one header, three rules:\n{f}");
    for addr in ["127.0.0.1:18082", "[::1]:18082", "127.0.0.1:18083"] {
        let addr = addr.parse().unwrap();
        let got = wait_for(Duration::from_secs(10), || {
            greeting(&t, addr).ok().filter(|g| !g.is_empty())
        });
        assert_eq!(
            got.as_deref(),
            Some("hello from the container\n"),
            "through {addr}"
        );
    }
    // An explicit address keeps its one family.
    let refused = greeting(&t, "[::1]:18083".parse().unwrap());
    assert!(refused.is_err(), "[::1]:18083 answered: {refused:?}");

    // `ports add` without an address does as -p does.
    let f = client(&t, &wrap, &["ports", "add", "18084:80"]);
    assert!(f.success(), "{f}");
    assert!(f.stdout.contains("tcp 0.0.0.0:18084"), "{f}");
    assert!(f.stdout.contains("tcp [::]:18084"), "{f}");

    // Removing a rule that does not exist says so.
    let f = client(&t, &wrap, &["ports", "remove", "99"]);
    assert_eq!(f.code(), Some(1), "{f}");
    assert!(f.stderr.contains("no published port with id 99"), "{f}");
    assert_eq!(f.stderr.lines().count(), 1, "{f}");
    u.signal(Signal::SIGTERM);
    u.wait_exit(Duration::from_secs(10)).expect("usernet ends");
}

#[test]
fn publish_without_address_and_without_ipv6_listens_on_ipv4_only() {
    let Some(t) = Topology::new() else { return };
    let (_, wrap) = runtime_env(&t);
    let mut u = run_cmd(&t, &["--disable-ipv6", "-p", "18085:80"], "sleep 30")
        .wrap(&wrap)
        .spawn();
    let f = wait_for(Duration::from_secs(20), || {
        let f = client(&t, &wrap, &["ports", "list"]);
        f.success().then_some(f)
    });
    let Some(f) = f else {
        u.assert_running();
        panic!("no API answer");
    };
    assert!(f.stdout.contains("tcp 0.0.0.0:18085"), "{f}");
    assert!(!f.stdout.contains("[::]"), "{f}");
    u.signal(Signal::SIGTERM);
    u.wait_exit(Duration::from_secs(10)).expect("usernet ends");
}

#[test]
fn unprivileged_port_is_explained() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("setpriv") {
        return;
    }
    t.host_sysctl("net.ipv4.ip_unprivileged_port_start", "1024");
    // A directory nobody may write, for the API socket.
    let dir = std::env::temp_dir().join(format!("usernet-test-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let socket = dir.join("api.sock");
    let f = UsernetCmd::new(&t)
        .wrap([
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .target([
            "run",
            "-a",
            socket.to_str().unwrap(),
            "-p",
            "80:80",
            "--",
            "true",
        ])
        .output(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    // Unprivileged user namespaces and /dev/net/tun must work for nobody; lifecycle.rs
    // checks those. Here only the message matters, whatever set-up step failed first.
    assert_eq!(f.code(), Some(1), "{f}");
    if f.stderr.contains("0.0.0.0:80") {
        assert!(
            f.stderr.contains("net.ipv4.ip_unprivileged_port_start"),
            "{f}"
        );
        assert_eq!(f.stderr.lines().count(), 1, "{f}");
    } else {
        panic!("usernet failed before publishing the port:\n{f}");
    }
}
