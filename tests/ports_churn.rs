//! Published ports survive churn (issue 3, item 5): 10,000 sequential short TCP connections
//! through a published port, and 1,000 UDP clients, leave no fd behind in usernet (its
//! `/proc/PID/fd` count returns to the baseline once they are done), no connection open in
//! the container, and no unbounded memory growth.

mod util;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use util::*;

/// Sequential TCP connections of the churn test.
const CONNECTIONS: usize = 10_000;

/// How long usernet may take to return to its fd baseline (polled: a pass is not slower).
const SETTLE: Duration = Duration::from_secs(30);

fn any0() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

/// usernet's resident set size in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Waits up to `t` until usernet's fd count is at most `base`; returns how long it took.
#[track_caller]
fn assert_fds_back(u: &Usernet, base: usize, t: Duration) {
    let t0 = Instant::now();
    if wait_for(t, || (u.fd_count() <= base).then_some(())).is_none() {
        panic!(
            "usernet still holds {} fds {t:?} after the churn (baseline {base}):\n{}",
            u.fd_count(),
            u.fd_targets().join("\n")
        );
    }
    eprintln!("usernet fds back to <= {base} after {:.2?}", t0.elapsed());
}

/// One short request/reply: connect, send 16 bytes, half-close, read the echo to EOF.
fn short_exchange(dst: SocketAddrV4, i: usize) -> Result<(), String> {
    let mut s = connect(dst).map_err(|e| format!("connect: {e}"))?;
    let msg = format!("churn {i:010}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != msg.as_bytes() {
        return Err(format!(
            "echo differs: {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    Ok(())
}

#[test]
fn churn_10000_sequential_tcp_connections_leave_nothing_behind() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let p = format!("8080:{}", echo.addr.port());
    let mut u = UsernetCmd::new(&t).args(["-c", "-p", &p]).start();
    let dst = SocketAddrV4::new(HOST_ADDR, 8080);

    // Warm-up: lazily created state (buffers, timers) is not a leak.
    t.in_world(|| {
        for i in 0..200 {
            short_exchange(dst, i).unwrap_or_else(|e| panic!("warm-up {i}: {e}"));
        }
    });
    thread::sleep(Duration::from_millis(500));
    let base = u.fd_count();
    let rss0 = rss_kib(u.pid);

    let t0 = Instant::now();
    let mut max_fds = base;
    t.in_world(|| {
        for i in 0..CONNECTIONS {
            if let Err(e) = short_exchange(dst, i) {
                panic!(
                    "connection {i} of {CONNECTIONS} failed after {:.2?}: {e}",
                    t0.elapsed()
                );
            }
            if i % 1000 == 999 {
                let fds = u.fd_count();
                max_fds = max_fds.max(fds);
                eprintln!(
                    "{} connections in {:.2?}; usernet fds {fds}",
                    i + 1,
                    t0.elapsed()
                );
            }
        }
    });
    let took = t0.elapsed();
    eprintln!(
        "{CONNECTIONS} sequential connections in {took:.2?} ({:.0}/s); fd baseline {base}, \
         max seen {max_fds}",
        CONNECTIONS as f64 / took.as_secs_f64()
    );
    // No time limit: each connection's connect and read timeouts bound a hang, and the
    // container's accepted count below proves every connection went through.
    u.assert_running();

    assert_fds_back(&u, base, SETTLE);
    let ok = wait_for(SETTLE, || {
        (echo.stats.open.load(Ordering::SeqCst) == 0).then_some(())
    });
    assert!(
        ok.is_some(),
        "{} connection(s) still open in the container",
        echo.stats.open.load(Ordering::SeqCst)
    );
    assert_eq!(
        echo.stats.accepted.load(Ordering::SeqCst),
        CONNECTIONS + 200,
        "connections the container accepted"
    );
    assert!(
        echo.stats.errors.lock().unwrap().is_empty(),
        "container server errors: {:?}",
        &echo.stats.errors.lock().unwrap()[..]
    );
    let rss1 = rss_kib(u.pid);
    eprintln!("usernet VmRSS {rss0} KiB -> {rss1} KiB");
    assert!(
        rss1 < rss0 + 32 * 1024,
        "usernet grew from {rss0} KiB to {rss1} KiB over {CONNECTIONS} connections"
    );
    // Still serving.
    t.in_world(|| short_exchange(dst, 0).unwrap_or_else(|e| panic!("after churn: {e}")));
}

#[test]
fn churn_1000_udp_clients_leave_no_fd_behind() {
    let Some(t) = Topology::new() else { return };
    let echo = UdpEcho::start(&t.container_ns(), any0());
    let p = format!("5300:{}/udp", echo.addr.port());
    let mut u = UsernetCmd::new(&t).args(["-c", "-p", &p]).start();
    let dst = SocketAddrV4::new(HOST_ADDR, 5300);
    t.in_world(|| {
        let s = udp_socket(any0());
        udp_roundtrip(&s, dst, b"warm-up", 3).unwrap_or_else(|e| panic!("{e}"));
    });
    thread::sleep(Duration::from_millis(300));
    let base = u.fd_count();
    t.in_world(|| {
        for i in 0..1000u32 {
            // A fresh client socket (a fresh source port) each time.
            let s = udp_socket(any0());
            udp_roundtrip(&s, dst, format!("client {i}").as_bytes(), 3)
                .unwrap_or_else(|e| panic!("UDP client {i}: {e}"));
        }
    });
    u.assert_running();
    // Inbound UDP associations must not cost an fd each (nor leak one).
    assert_fds_back(&u, base + 2, SETTLE);
}
