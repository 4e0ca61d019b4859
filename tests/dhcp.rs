//! The DHCP server on the TAP subnet, exercised by real clients in a container that usernet
//! does not configure (no `-c`): busybox `udhcpc` and, where installed, ISC `dhclient`.

mod util;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use util::*;

fn write_script(path: &Path, body: &str) {
    fs::write(path, body).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// Parses `key=value` words into a lookup.
fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or("")
}

fn assert_lease(text: &str) {
    let ip: std::net::Ipv4Addr = field(text, "ip")
        .parse()
        .unwrap_or_else(|_| panic!("no leased address in {text:?}"));
    let o = ip.octets();
    assert!(
        o[..3] == [10, 0, 2] && (15..=30).contains(&o[3]),
        "leased {ip}, outside the pool 10.0.2.15-10.0.2.30 ({text:?})"
    );
    assert_eq!(field(text, "router"), "10.0.2.2", "router in {text:?}");
    assert!(
        field(text, "dns").split(',').any(|d| d == "10.0.2.3"),
        "dns server 10.0.2.3 missing in {text:?}"
    );
    assert_eq!(
        field(text, "subnet"),
        "255.255.255.0",
        "subnet mask in {text:?}"
    );
}

#[test]
fn dhcp_udhcpc_gets_lease_in_pool() {
    let Some(t) = Topology::new() else { return };
    if !require(
        which("udhcpc").is_some() || which("busybox").is_some(),
        "neither `udhcpc` nor `busybox` is installed",
    ) {
        return;
    }
    let _u = UsernetCmd::new(&t).start(); // no -c: tap0 exists but is not configured
    ip(&["-n", &t.container, "link", "set", "tap0", "up"]);
    let out = t.tmp.join("udhcpc.lease");
    let script = t.tmp.join("udhcpc.script");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n  \
             echo \"ip=$ip router=$router dns=$(echo $dns | tr ' ' ,) subnet=$subnet\" > {}\n;;\nesac\nexit 0\n",
            out.display()
        ),
    );
    let script = script.to_string_lossy().into_owned();
    let args = [
        "-i", "tap0", "-n", "-q", "-f", "-t", "5", "-T", "2", "-A", "1", "-s", &script,
    ];
    let f = if which("udhcpc").is_some() {
        t.run_in_container("udhcpc", &args, Duration::from_secs(30))
    } else {
        let mut a = vec!["udhcpc"];
        a.extend(args);
        t.run_in_container("busybox", &a, Duration::from_secs(30))
    };
    f.assert_success();
    let lease = fs::read_to_string(&out).unwrap_or_else(|_| panic!("the script never ran:\n{f}"));
    assert_lease(&lease);
}

#[test]
fn dhcp_dhclient_gets_lease_in_pool() {
    let Some(t) = Topology::new() else { return };
    if !require_tool("dhclient") {
        return;
    }
    let _u = UsernetCmd::new(&t).start();
    ip(&["-n", &t.container, "link", "set", "tap0", "up"]);
    let out = t.tmp.join("dhclient.lease");
    let script = t.tmp.join("dhclient.script");
    write_script(
        &script,
        &format!(
            "#!/bin/sh\ncase \"$reason\" in BOUND|RENEW|REBOOT)\n  \
             echo \"ip=$new_ip_address router=$new_routers dns=$(echo $new_domain_name_servers | tr ' ' ,) \
             subnet=$new_subnet_mask\" > {0}.tmp && mv {0}.tmp {0}\n;;\nesac\nexit 0\n",
            out.display()
        ),
    );
    let conf = t.tmp.join("dhclient.conf");
    fs::write(&conf, "timeout 20;\nretry 1;\n").expect("write dhclient.conf");
    let p = |n: &str| t.tmp.join(n).to_string_lossy().into_owned();
    let mut cmd = t.exec_in(
        &t.container,
        "dhclient",
        &[
            "-d",
            "-1",
            "-v",
            "-sf",
            &p("dhclient.script"),
            "-lf",
            &p("dhclient.leases"),
            "-pf",
            &p("dhclient.pid"),
            "-cf",
            &p("dhclient.conf"),
            "tap0",
        ],
    );
    // dhclient -d never exits on success: run it in the background and stop it by PID.
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn dhclient");
    let lease = wait_for(Duration::from_secs(30), || fs::read_to_string(&out).ok());
    kill_tree(&mut child);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let lease = lease.unwrap_or_else(|| panic!("dhclient got no lease within 30 s:\n{err}"));
    assert_lease(&lease);
}
