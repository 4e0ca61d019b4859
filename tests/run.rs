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

#[track_caller]
fn assert_exit(u: &mut Usernet, within: Duration, code: i32) {
    let status = u
        .wait_exit(within)
        .unwrap_or_else(|| panic!("usernet still runs after {within:?}"));
    assert_eq!(status.code(), Some(code), "{status}: {}", u.stderr());
}

/// The captured stdout shows `text` (the capture thread may lag behind the exit).
#[track_caller]
fn assert_stdout(u: &Usernet, text: &str) {
    let seen = wait_for(Duration::from_secs(2), || {
        u.stdout().contains(text).then_some(())
    });
    assert!(seen.is_some(), "stdout lacks {text:?}: {}", u.stdout());
}

#[test]
fn sigterm_ends_the_command_and_everything_it_started() {
    let Some(t) = Topology::new() else { return };
    let m = marker(1);
    let _guard = Leftovers(m.clone());
    let script = format!("sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    let sent = Instant::now();
    u.signal(Signal::SIGTERM);
    // sh dies of the SIGTERM passed on to it (it is not PID 1): 128 + 15, at once.
    assert_exit(&mut u, Duration::from_secs(5), 143);
    assert!(sent.elapsed() < Duration::from_secs(5));
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
    assert!(f.stdout.contains("started"), "{f}");
    assert!(f.elapsed < Duration::from_secs(20), "{f}");
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
    assert_exit(&mut u, Duration::from_secs(5), 5);
    assert_stdout(&u, "got USR1");
    assert_eq!(sleepers(&m), Vec::<u32>::new());

    // A command that traps SIGTERM and cleans up gets to do so.
    let m = marker(4);
    let _guard = Leftovers(m.clone());
    let script = format!("trap 'echo cleaning up; exit 0' TERM; sleep {m} & wait");
    let mut u = start_with_sleeper(&t, &[], &script, &m);
    u.signal(Signal::SIGTERM);
    assert_exit(&mut u, Duration::from_secs(5), 0);
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
    assert_exit(&mut u, Duration::from_secs(10), 137);
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
    u.wait_exit(Duration::from_secs(5)).expect("usernet exits");
    let gone = wait_for(Duration::from_secs(5), || {
        sleepers(&m).is_empty().then_some(())
    });
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
