//! ICMP echo through usernet: the gateway always answers; other destinations answer only when
//! `net.ipv4.ping_group_range` in usernet's namespace lets it open ping sockets, and otherwise
//! no reply is ever faked.

mod util;

use std::time::Duration;

use util::*;

/// `ping -c COUNT -W 10 DST` in C: it ends at the last reply, or 10 s after the last request
/// went unanswered.
fn ping(t: &Topology, dst: &str, count: &str) -> Finished {
    t.run_in_container(
        "ping",
        &["-n", "-c", count, "-W", "10", dst],
        Duration::from_secs(30),
    )
}

#[test]
fn icmp_ping_gateway_answers() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("ping") {
        return;
    }
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    // Default ping_group_range ("1 0"): the gateway still answers.
    let f = ping(&t, "10.0.2.2", "3");
    f.assert_success();
    assert!(f.stdout.contains("bytes from 10.0.2.2"), "{f}");
}

#[test]
fn icmp_ping_world_when_ping_group_range_allows() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("ping") {
        return;
    }
    t.host_sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let f = ping(&t, "203.0.113.1", "3");
    f.assert_success();
    assert!(f.stdout.contains("bytes from 203.0.113.1"), "{f}");
}

#[test]
fn icmp_ping_world_without_ping_group_range_gets_no_reply() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("ping") {
        return;
    }
    // A new netns starts with ping_group_range "1 0": nobody may open ping sockets.
    t.host_sysctl("net.ipv4.ping_group_range", "1 0");
    let _u = UsernetCmd::new(&t).args(["-c"]).start();
    let f = ping(&t, "203.0.113.1", "2");
    assert!(f.status.is_some(), "ping hung:\n{f}");
    assert!(
        !f.success(),
        "ping of the world succeeded although usernet cannot ping:\n{f}"
    );
    assert!(!f.stdout.contains("bytes from"), "a reply was faked:\n{f}");
    // The gateway keeps answering.
    ping(&t, "10.0.2.2", "1").assert_success();
}
