//! The slirp4netns-compatible JSON API socket (`-a/--api-socket`) and the `usernet ports`
//! client (issue 3, `../shared/docs/compat.md`): add/list/remove with the exact JSON shapes,
//! every error object, the 4096-byte limit, answers without a half-close, the socket's
//! lifetime (there before `-r` fires, unlinked at exit), abusive clients that must not stall
//! the data plane, and the human-readable `ports` client.
//!
//! Replies are parsed with a small local JSON parser (no JSON crate among the dev-dependencies)
//! and compared as values, so key order and whitespace do not matter but every key and value
//! does.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

// ---------------------------------------------------------------------------------------------
// JSON: the harness's reader; objects compare regardless of key order
// ---------------------------------------------------------------------------------------------

type Json = JsonValue;

/// Parses one complete JSON document (surrounding whitespace allowed).
fn parse_json(text: &str) -> Result<Json, String> {
    parse_json_value(text)
}

/// Parses a JSON literal written in a test.
fn j(text: &str) -> Json {
    parse_json(text).unwrap_or_else(|e| panic!("bad JSON in the test itself: {e}: {text}"))
}

#[test]
fn local_json_parser_self_test() {
    assert_eq!(
        j(r#" {"b":[1,2.5,-3e2],"a":{"x":"q\"\u0041\n"},"c":null,"d":true} "#),
        j(r#"{"a":{"x":"q\"A\n"},"b":[1,2.5,-300],"c":null,"d":true}"#)
    );
    assert!(parse_json("{").is_err());
    assert!(parse_json("{} x").is_err());
    assert!(parse_json(r#"{"a":1,}"#).is_err());
    assert_ne!(j(r#"{"a":1}"#), j(r#"{"a":1,"b":2}"#));
}

// ---------------------------------------------------------------------------------------------
// API client
// ---------------------------------------------------------------------------------------------

/// Deadline of every API exchange.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the API socket without ever blocking: a non-blocking `connect` retried on
/// `EAGAIN` (full backlog) for up to `t`, then switched to blocking with [`API_TIMEOUT`].
fn api_connect_within(path: &Path, t: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let end = Instant::now() + t;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new(path)?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let s = UnixStream::from(fd);
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(API_TIMEOUT))?;
                s.set_write_timeout(Some(API_TIMEOUT))?;
                return Ok(s);
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < end => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn api_connect(path: &Path) -> UnixStream {
    api_connect_within(path, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the API socket {}: {e}", path.display()))
}

/// Reads a reply to EOF. A reset after some data counts as the end (usernet may close with
/// unread request bytes, which AF_UNIX reports as ECONNRESET after the queued reply).
fn read_reply(s: &mut UnixStream) -> Result<String, String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no complete reply (EOF) within {API_TIMEOUT:?}; got so far: {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            Err(e) if !got.is_empty() => {
                eprintln!("(read after the reply: {e})");
                break;
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    String::from_utf8(got).map_err(|e| format!("reply is not UTF-8: {e}"))
}

/// One exchange: writes `req` (write errors tolerated: usernet may stop reading an oversized
/// request), optionally half-closes, reads the reply to EOF.
fn api_raw(path: &Path, req: &[u8], half_close: bool) -> String {
    let mut s = api_connect(path);
    if let Err(e) = s.write_all(req) {
        eprintln!("(writing {} request bytes: {e})", req.len());
    }
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    read_reply(&mut s).unwrap_or_else(|e| {
        panic!(
            "API request {:?}: {e}",
            String::from_utf8_lossy(&req[..req.len().min(200)])
        )
    })
}

/// One request as a client like podman sends it (object, `\n`, half-close); the parsed reply.
#[track_caller]
fn api(path: &Path, req: &str) -> Json {
    let raw = api_raw(path, format!("{req}\n").as_bytes(), true);
    parse_json(&raw).unwrap_or_else(|e| panic!("reply to {req} is not JSON ({e}): {raw:?}"))
}

/// Asserts that the reply to `req` equals the JSON `expected`.
#[track_caller]
fn assert_reply(path: &Path, req: &str, expected: &str) -> Json {
    let got = api(path, req);
    assert_eq!(
        got,
        j(expected),
        "request {req}\n  got      {got:?}\n  expected {expected}"
    );
    got
}

/// Asserts that `req` is answered with exactly `{"error":{"desc":DESC}}`.
#[track_caller]
fn assert_error(path: &Path, req: &str, desc: &str) {
    let raw = api_raw(path, req.as_bytes(), true);
    let got =
        parse_json(&raw).unwrap_or_else(|e| panic!("reply to {req:?} is not JSON ({e}): {raw:?}"));
    let want = Json::Obj(BTreeMap::from([(
        "error".to_string(),
        Json::Obj(BTreeMap::from([(
            "desc".to_string(),
            Json::Str(desc.to_string()),
        )])),
    )]));
    assert_eq!(
        got, want,
        "request {req:?}\n  got {raw}\n  expected desc {desc:?}"
    );
}

/// The error desc of the reply to `req` (panics if the reply is not an error object).
#[track_caller]
fn error_desc(path: &Path, req: &str) -> String {
    let got = api(path, req);
    got.get("error")
        .and_then(|e| e.get("desc"))
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("reply to {req} is not an error object: {got:?}"))
        .to_string()
}

fn add_req(
    proto: &str,
    host_addr: &str,
    host_port: u16,
    guest_addr: &str,
    guest_port: u16,
) -> String {
    format!(
        r#"{{"execute":"add_hostfwd","arguments":{{"proto":"{proto}","host_addr":"{host_addr}","host_port":{host_port},"guest_addr":"{guest_addr}","guest_port":{guest_port}}}}}"#
    )
}

/// `add_hostfwd`; returns the new id (panics on anything but `{"return":{"id":N}}`).
#[track_caller]
fn add(path: &Path, proto: &str, host_addr: &str, host_port: u16, guest_port: u16) -> u64 {
    let req = add_req(proto, host_addr, host_port, "10.0.2.100", guest_port);
    let got = api(path, &req);
    let Json::Obj(m) = &got else {
        panic!("{req}: {got:?}")
    };
    assert_eq!(
        m.len(),
        1,
        "{req}: reply must be {{\"return\":{{\"id\":N}}}}: {got:?}"
    );
    let id = got
        .get("return")
        .filter(|r| matches!(r, Json::Obj(m) if m.len() == 1))
        .and_then(|r| r.get("id"))
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("{req}: reply must be {{\"return\":{{\"id\":N}}}}: {got:?}"));
    id
}

const LIST: &str = r#"{"execute":"list_hostfwd"}"#;

fn remove_req(id: u64) -> String {
    format!(r#"{{"execute":"remove_hostfwd","arguments":{{"id":{id}}}}}"#)
}

fn entry(id: u64, proto: &str, host_addr: &str, host_port: u16, guest_port: u16) -> String {
    format!(
        r#"{{"id":{id},"proto":"{proto}","host_addr":"{host_addr}","host_port":{host_port},"guest_addr":"10.0.2.100","guest_port":{guest_port}}}"#
    )
}

fn entries(list: &[String]) -> String {
    format!(r#"{{"entries":[{}]}}"#, list.join(","))
}

// ---------------------------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------------------------

fn any0() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

fn api_path(t: &Topology) -> PathBuf {
    t.tmp.join("api.sock")
}

/// usernet `-c -a PATH EXTRA...`, ready.
fn start_with_api(t: &Topology, extra: &[&str]) -> (Usernet, PathBuf) {
    let sock = api_path(t);
    let u = UsernetCmd::new(t)
        .args(["-c", "-a", sock.to_str().expect("utf-8 path")])
        .args(extra)
        .start();
    (u, sock)
}

/// Waits up to `t` until usernet's fd count is at most `base`.
fn wait_fds(u: &Usernet, base: usize, t: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    wait_for(t, || (u.fd_count() <= base).then(|| t0.elapsed())).ok_or_else(|| {
        format!(
            "usernet holds {} fds after {t:?}, baseline {base}:\n{}",
            u.fd_count(),
            u.fd_targets().join("\n")
        )
    })
}

// ---------------------------------------------------------------------------------------------
// add / list / remove
// ---------------------------------------------------------------------------------------------

#[test]
fn api_add_list_remove_exact_shapes() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let (_u, sock) = start_with_api(&t, &[]);
    let gp = echo.addr.port();

    assert_reply(&sock, LIST, r#"{"entries":[]}"#);
    assert_reply(
        &sock,
        &add_req("tcp", "0.0.0.0", 8080, "10.0.2.100", gp),
        r#"{"return":{"id":1}}"#,
    );
    assert_reply(
        &sock,
        LIST,
        &entries(&[entry(1, "tcp", "0.0.0.0", 8080, gp)]),
    );
    assert_reply(
        &sock,
        &add_req("udp", "127.0.0.1", 5353, "10.0.2.100", 53),
        r#"{"return":{"id":2}}"#,
    );
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "0.0.0.0", 8080, gp),
            entry(2, "udp", "127.0.0.1", 5353, 53),
        ]),
    );

    // The rule works: a world client reaches the container's echo server.
    t.in_world(|| echo_once(SocketAddrV4::new(HOST_ADDR, 8080), b"through rule 1"));

    assert_reply(&sock, &remove_req(1), r#"{"return":{}}"#);
    assert_reply(
        &sock,
        LIST,
        &entries(&[entry(2, "udp", "127.0.0.1", 5353, 53)]),
    );
    // Removing closes the host listener: refused, and the port is free again in H.
    t.in_world(|| assert_refused(SocketAddrV4::new(HOST_ADDR, 8080)));
    let rebound = t.in_host(|| TcpListener::bind("0.0.0.0:8080").map(drop));
    assert!(
        rebound.is_ok(),
        "tcp 8080 still taken after remove: {rebound:?}"
    );
    assert_reply(&sock, &remove_req(2), r#"{"return":{}}"#);
    assert_reply(&sock, LIST, r#"{"entries":[]}"#);
    let rebound = t.in_host(|| UdpSocket::bind("127.0.0.1:5353").map(drop));
    assert!(
        rebound.is_ok(),
        "udp 5353 still taken after remove: {rebound:?}"
    );
}

#[test]
fn api_ids_start_at_1_and_are_never_reused() {
    let Some(t) = Topology::new() else { return };
    let (_u, sock) = start_with_api(&t, &[]);
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 9001, 80), 1);
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 9002, 80), 2);
    assert_reply(&sock, &remove_req(2), r#"{"return":{}}"#);
    // The highest id was removed: a new rule must still not get 2 again.
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 9002, 80), 3);
    assert_reply(&sock, &remove_req(1), r#"{"return":{}}"#);
    assert_eq!(add(&sock, "udp", "0.0.0.0", 9001, 80), 4);
    // A removed id stays removed.
    assert_error(
        &sock,
        &remove_req(1),
        "bad request: remove_hostfwd: bad arguments.id",
    );
    assert_error(
        &sock,
        &remove_req(2),
        "bad request: remove_hostfwd: bad arguments.id",
    );
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(3, "tcp", "0.0.0.0", 9002, 80),
            entry(4, "udp", "0.0.0.0", 9001, 80),
        ]),
    );
}

#[test]
fn api_empty_or_missing_addresses_take_the_defaults() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let (_u, sock) = start_with_api(&t, &[]);
    let gp = echo.addr.port();
    let reqs = [
        // empty host_addr and guest_addr
        format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_addr":"","host_port":9101,"guest_addr":"","guest_port":{gp}}}}}"#
        ),
        // both missing
        format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":"tcp","host_port":9102,"guest_port":{gp}}}}}"#
        ),
        // udp, both missing
        r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_port":9103,"guest_port":53}}"#
            .to_string(),
    ];
    for (i, r) in reqs.iter().enumerate() {
        assert_reply(&sock, r, &format!(r#"{{"return":{{"id":{}}}}}"#, i + 1));
    }
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "0.0.0.0", 9101, gp),
            entry(2, "tcp", "0.0.0.0", 9102, gp),
            entry(3, "udp", "0.0.0.0", 9103, 53),
        ]),
    );
    // Defaults mean what they say: reachable from the world on every address, into the guest.
    t.in_world(|| {
        echo_once(SocketAddrV4::new(HOST_ADDR, 9101), b"default addresses");
        echo_once(
            SocketAddrV4::new(HOST_ADDR2, 9102),
            b"default addresses, 2nd host addr",
        );
    });
}

#[test]
fn api_ipv6_host_addresses_are_accepted() {
    let Some(t) = Topology::new() else { return };
    let v6 = t.in_host(|| TcpListener::bind("[::1]:0").is_ok());
    if !require(v6, "IPv6 loopback (::1) unavailable in the host namespace") {
        return;
    }
    let echo = TcpServer::echo(&t.container_ns(), any0());
    let gp = echo.addr.port();
    let (_u, sock) = start_with_api(&t, &[]);
    assert_eq!(add(&sock, "tcp", "::1", 9201, gp), 1);
    assert_eq!(add(&sock, "tcp", "::", 9202, gp), 2);
    assert_eq!(add(&sock, "udp", "::1", 9203, 53), 3);
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "::1", 9201, gp),
            entry(2, "tcp", "::", 9202, gp),
            entry(3, "udp", "::1", 9203, 53),
        ]),
    );
    // Really listening on IPv6 in H, and forwarding.
    for port in [9201, 9202] {
        let back = t.in_host(|| {
            let dst: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
            let mut s = std::net::TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)
                .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            s.write_all(b"over IPv6").expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
            let mut back = Vec::new();
            s.read_to_end(&mut back).expect("read");
            back
        });
        assert_eq!(back, b"over IPv6", "echo through [::1]:{port}");
    }
}

#[test]
fn api_lists_rules_published_with_flags() {
    let Some(t) = Topology::new() else { return };
    let (_u, sock) = start_with_api(
        &t,
        &[
            "-p",
            "9301:80",
            "-p",
            "127.0.0.1:9302:81/udp",
            "-p",
            "9303-9304:82-83",
        ],
    );
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "0.0.0.0", 9301, 80),
            entry(2, "udp", "127.0.0.1", 9302, 81),
            entry(3, "tcp", "0.0.0.0", 9303, 82),
            entry(4, "tcp", "0.0.0.0", 9304, 83),
        ]),
    );
    // Flag rules can be removed like API rules, and API ids continue after them.
    assert_reply(&sock, &remove_req(2), r#"{"return":{}}"#);
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 9305, 84), 5);
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn api_request_errors_have_the_exact_descs() {
    let Some(t) = Topology::new() else { return };
    let (mut u, sock) = start_with_api(&t, &[]);
    let cases: &[(&str, &str)] = &[
        ("", "bad request: cannot parse JSON"),
        ("not json", "bad request: cannot parse JSON"),
        (
            r#"{"execute":"list_hostfwd""#,
            "bad request: cannot parse JSON",
        ),
        (
            "\x00\x01\x02garbage\x7f\u{fffd}",
            "bad request: cannot parse JSON",
        ),
        ("[1,2,3]", "bad request: json_object() failed"),
        (r#""add_hostfwd""#, "bad request: json_object() failed"),
        ("42", "bad request: json_object() failed"),
        ("{}", "bad request: no execute found"),
        (r#"{"arguments":{"id":1}}"#, "bad request: no execute found"),
        (r#"{"execute":42}"#, "bad request: no execute found"),
        (
            r#"{"execute":"frobnicate"}"#,
            "bad request: unknown execute",
        ),
        (r#"{"execute":""}"#, "bad request: unknown execute"),
        (
            r#"{"execute":"LIST_HOSTFWD"}"#,
            "bad request: unknown execute",
        ),
    ];
    for (req, desc) in cases {
        assert_error(&sock, req, desc);
    }
    u.assert_running();
}

#[test]
fn api_add_hostfwd_argument_errors_have_the_exact_descs() {
    let Some(t) = Topology::new() else { return };
    let (mut u, sock) = start_with_api(&t, &[]);
    let full = |proto: &str, ha: &str, hp: &str, ga: &str, gp: &str| {
        format!(
            r#"{{"execute":"add_hostfwd","arguments":{{"proto":{proto},"host_addr":{ha},"host_port":{hp},"guest_addr":{ga},"guest_port":{gp}}}}}"#
        )
    };
    let ok = ("\"tcp\"", "\"0.0.0.0\"", "8080", "\"10.0.2.100\"", "80");
    let pre = "bad request: add_hostfwd: bad arguments.";
    let mut cases: Vec<(String, String)> = Vec::new();
    // proto: missing (slirp4netns crashes here; we answer), wrong, wrong type.
    cases.push((
        r#"{"execute":"add_hostfwd","arguments":{"host_addr":"0.0.0.0","host_port":8080,"guest_port":80}}"#.into(),
        format!("{pre}proto"),
    ));
    cases.push((r#"{"execute":"add_hostfwd"}"#.into(), format!("{pre}proto")));
    for p in ["\"sctp\"", "\"TCP \"", "\"\"", "6", "null"] {
        cases.push((full(p, ok.1, ok.2, ok.3, ok.4), format!("{pre}proto")));
    }
    for ha in [
        "\"not-an-ip\"",
        "\"1.2.3\"",
        "\"256.0.0.1\"",
        "\"10.0.2.100.5\"",
    ] {
        cases.push((full(ok.0, ha, ok.2, ok.3, ok.4), format!("{pre}host_addr")));
    }
    for hp in ["0", "-1", "65536", "\"8080\"", "null"] {
        cases.push((full(ok.0, ok.1, hp, ok.3, ok.4), format!("{pre}host_port")));
    }
    cases.push((
        r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","guest_port":80}}"#.into(),
        format!("{pre}host_port"),
    ));
    for ga in ["\"bogus\"", "\"1.2.3.4.5\"", "\"10.0.2\""] {
        cases.push((full(ok.0, ok.1, ok.2, ga, ok.4), format!("{pre}guest_addr")));
    }
    for gp in ["0", "-5", "70000", "\"80\"", "null"] {
        cases.push((full(ok.0, ok.1, ok.2, ok.3, gp), format!("{pre}guest_port")));
    }
    cases.push((
        r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_port":8080}}"#.into(),
        format!("{pre}guest_port"),
    ));
    for (req, desc) in &cases {
        assert_error(&sock, req, desc);
    }
    // None of them created a rule, and the next valid one still works.
    assert_reply(&sock, LIST, r#"{"entries":[]}"#);
    let id = add(&sock, "tcp", "0.0.0.0", 8080, 80);
    assert!(id >= 1);
    u.assert_running();
}

#[test]
fn api_remove_hostfwd_errors_have_the_exact_descs() {
    let Some(t) = Topology::new() else { return };
    let (_u, sock) = start_with_api(&t, &[]);
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 8080, 80), 1);
    let desc = "bad request: remove_hostfwd: bad arguments.id";
    for req in [
        r#"{"execute":"remove_hostfwd"}"#,
        r#"{"execute":"remove_hostfwd","arguments":{}}"#,
        r#"{"execute":"remove_hostfwd","arguments":{"id":0}}"#,
        r#"{"execute":"remove_hostfwd","arguments":{"id":2}}"#,
        r#"{"execute":"remove_hostfwd","arguments":{"id":99999}}"#,
        r#"{"execute":"remove_hostfwd","arguments":{"id":-1}}"#,
        r#"{"execute":"remove_hostfwd","arguments":{"id":"1"}}"#,
    ] {
        assert_error(&sock, req, desc);
    }
    // The rule survived all of that.
    assert_reply(
        &sock,
        LIST,
        &entries(&[entry(1, "tcp", "0.0.0.0", 8080, 80)]),
    );
    assert_reply(&sock, &remove_req(1), r#"{"return":{}}"#);
    assert_error(&sock, &remove_req(1), desc);
}

#[test]
fn api_too_large_message_limit_is_4096_bytes() {
    let Some(t) = Topology::new() else { return };
    let (mut u, sock) = start_with_api(&t, &[]);
    let pad = |n: usize| {
        let mut r = LIST.as_bytes().to_vec();
        r.resize(n, b' ');
        r
    };
    // 4095 bytes: still a request.
    let raw = api_raw(&sock, &pad(4095), true);
    assert_eq!(
        parse_json(&raw),
        Ok(j(r#"{"entries":[]}"#)),
        "4095-byte request: {raw}"
    );
    // 4096 bytes and more: too large, also without a half-close.
    for (n, half_close) in [
        (4096, true),
        (4096, false),
        (4097, true),
        (65536, true),
        (1 << 20, false),
    ] {
        let raw = api_raw(&sock, &pad(n), half_close);
        assert_eq!(
            parse_json(&raw),
            Ok(j(r#"{"error":{"desc":"bad request: too large message"}}"#)),
            "{n}-byte request (half-close: {half_close}): {raw:?}"
        );
    }
    // A large request that is not even JSON.
    let raw = api_raw(&sock, &vec![b'x'; 10_000], true);
    assert_eq!(
        parse_json(&raw),
        Ok(j(r#"{"error":{"desc":"bad request: too large message"}}"#)),
        "10000 bytes of garbage: {raw:?}"
    );
    u.assert_running();
    assert_reply(&sock, LIST, r#"{"entries":[]}"#);
}

#[test]
fn api_port_in_use_is_a_clear_error() {
    let Some(t) = Topology::new() else { return };
    // Another program of the host already holds TCP 8081 and UDP 5301.
    let (_tcp, _udp) = t.in_host(|| {
        (
            TcpListener::bind("0.0.0.0:8081").expect("bind tcp 8081 in H"),
            UdpSocket::bind("0.0.0.0:5301").expect("bind udp 5301 in H"),
        )
    });
    let (mut u, sock) = start_with_api(&t, &[]);
    assert_eq!(add(&sock, "tcp", "0.0.0.0", 8080, 80), 1);
    let check = |req: String| {
        let desc = error_desc(&sock, &req);
        assert!(
            desc.starts_with("bad request: add_hostfwd: slirp_add_hostfwd failed"),
            "{req}: desc {desc:?}"
        );
        assert!(
            desc.contains("Address already in use"),
            "{req}: desc {desc:?}"
        );
    };
    // Our own rule.
    check(add_req("tcp", "0.0.0.0", 8080, "10.0.2.100", 81));
    // Another process's sockets.
    check(add_req("tcp", "0.0.0.0", 8081, "10.0.2.100", 80));
    check(add_req("udp", "", 5301, "", 53));
    // TCP and UDP ports are separate: udp 8080 is free.
    assert_eq!(add(&sock, "udp", "0.0.0.0", 8080, 80), 2);
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "0.0.0.0", 8080, 80),
            entry(2, "udp", "0.0.0.0", 8080, 80),
        ]),
    );
    u.assert_running();
}

// ---------------------------------------------------------------------------------------------
// Transport details and lifetime
// ---------------------------------------------------------------------------------------------

#[test]
fn api_answers_complete_json_without_half_close() {
    let Some(t) = Topology::new() else { return };
    let (_u, sock) = start_with_api(&t, &[]);
    for req in [
        format!("{LIST}\n"),
        LIST.to_string(),
        add_req("tcp", "0.0.0.0", 8080, "10.0.2.100", 80),
        "  {\"execute\" : \"list_hostfwd\" }  \n".to_string(),
    ] {
        // A reply at all proves it: a client without a complete request is closed without
        // one when its CLIENT_TIMEOUT expires.
        let raw = api_raw(&sock, req.as_bytes(), false);
        let v = parse_json(&raw).unwrap_or_else(|e| panic!("{req:?}: {e}: {raw:?}"));
        assert!(
            v.get("entries").is_some() || v.get("return").is_some(),
            "{req:?}: {raw}"
        );
    }
    // Written in pieces with pauses, no half-close: answered once complete.
    let mut s = api_connect(&sock);
    for part in [r#"{"execute":"#, r#""list_"#, r#"hostfwd"}"#] {
        s.write_all(part.as_bytes()).expect("write part");
        thread::sleep(Duration::from_millis(150));
    }
    let raw = read_reply(&mut s).expect("reply to a request written in pieces");
    assert_eq!(
        parse_json(&raw),
        Ok(j(&entries(&[entry(1, "tcp", "0.0.0.0", 8080, 80)]))),
        "{raw}"
    );
}

#[test]
fn api_socket_exists_before_ready_and_is_unlinked_at_exit() {
    let Some(t) = Topology::new() else { return };
    let sock = api_path(&t);
    // A stale file at the path (a previous crash) is replaced, as slirp4netns does.
    fs::write(&sock, b"stale").expect("write stale file");

    // SIGTERM.
    let (mut u, _) = start_with_api(&t, &[]);
    // -r has fired: the socket must already answer, at the first attempt.
    let md = fs::symlink_metadata(&sock).expect("API socket path after -r");
    assert!(
        md.file_type().is_socket(),
        "{} is not a socket: {md:?}",
        sock.display()
    );
    let mut s = UnixStream::connect(&sock).expect("connect right after -r");
    s.set_read_timeout(Some(API_TIMEOUT)).expect("timeout");
    s.write_all(LIST.as_bytes()).expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        parse_json(&read_reply(&mut s).expect("reply")),
        Ok(j(r#"{"entries":[]}"#))
    );
    u.signal(Signal::SIGTERM);
    let st = u.wait_exit(IO_TIMEOUT);
    assert!(
        st.is_some(),
        "usernet did not exit within {IO_TIMEOUT:?} of SIGTERM"
    );
    assert!(
        !sock.exists() && fs::symlink_metadata(&sock).is_err(),
        "API socket {} still exists after SIGTERM",
        sock.display()
    );

    // Exit fd closed.
    let mut u = UsernetCmd::new(&t)
        .args(["-c", "-a", sock.to_str().expect("utf-8")])
        .exit_fd()
        .start();
    assert!(sock.exists(), "API socket missing after -r");
    assert_reply(&sock, LIST, r#"{"entries":[]}"#);
    u.close_exit_fd();
    let st = u.wait_exit(IO_TIMEOUT);
    assert!(
        st.is_some(),
        "usernet did not exit within {IO_TIMEOUT:?} of the exit fd closing"
    );
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "API socket {} still exists after the exit fd closed",
        sock.display()
    );
}

#[test]
fn api_abuse_does_not_stall_the_data_plane() {
    let Some(t) = Topology::new() else { return };
    let sink = TcpServer::sink(&t.container_ns(), any0());
    let source = TcpServer::source(&t.container_ns(), any0());
    let p1 = format!("18080:{}", sink.addr.port());
    let p2 = format!("18081:{}", source.addr.port());
    let (mut u, sock) = start_with_api(&t, &["-p", &p1, "-p", &p2]);
    let up = SocketAddrV4::new(HOST_ADDR, 18080);
    let down = SocketAddrV4::new(HOST_ADDR, 18081);
    t.in_world(|| upload_to_sink(up, 1, 4096));
    t.in_world(|| download_from_source(down, 2, 4096));
    thread::sleep(Duration::from_millis(300));
    let base = u.fd_count();

    let mut held: Vec<UnixStream> = Vec::new();
    let mut refused = 0;
    let mut hold = |s: io::Result<UnixStream>, held: &mut Vec<UnixStream>| match s {
        Ok(s) => held.push(s),
        Err(e) => {
            refused += 1;
            eprintln!("(held API connection not established: {e})");
        }
    };
    // 50 idle connections.
    for _ in 0..50 {
        hold(
            api_connect_within(&sock, Duration::from_millis(500)),
            &mut held,
        );
    }
    // 10 half-written requests.
    let partial = br#"{"execute":"list_hostfwd"}"#;
    for i in 0..10 {
        let s = api_connect_within(&sock, Duration::from_millis(500)).and_then(|mut s| {
            s.write_all(&partial[..3 + i])?;
            Ok(s)
        });
        hold(s, &mut held);
    }
    // 5 complete requests whose replies are never read (half-open from usernet's view).
    for _ in 0..5 {
        let s = api_connect_within(&sock, Duration::from_millis(500)).and_then(|mut s| {
            s.write_all(partial)?;
            s.shutdown(Shutdown::Write)?;
            Ok(s)
        });
        hold(s, &mut held);
    }
    // 5 with binary garbage and no end.
    for _ in 0..5 {
        let s = api_connect_within(&sock, Duration::from_millis(500)).and_then(|mut s| {
            s.write_all(&[0xff, 0x00, b'{', b'"'].repeat(500))?;
            Ok(s)
        });
        hold(s, &mut held);
    }
    eprintln!(
        "holding {} API connections ({refused} not established)",
        held.len()
    );

    // A flooder (4 MiB of garbage on one connection) and a slow client (one byte every
    // 100 ms) while the data plane works.
    let flood_path = sock.clone();
    let flooder = thread::spawn(move || {
        let Ok(mut s) = api_connect_within(&flood_path, Duration::from_secs(2)) else {
            return "not connected".to_string();
        };
        s.set_write_timeout(Some(Duration::from_secs(5))).ok();
        let chunk = vec![b'['; 64 << 10];
        let mut sent = 0usize;
        for _ in 0..64 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => return format!("stopped after {sent} bytes: {e}"),
            }
        }
        format!("wrote all {sent} bytes")
    });
    let slow_path = sock.clone();
    let slow = thread::spawn(move || {
        let Ok(mut s) = api_connect_within(&slow_path, Duration::from_secs(2)) else {
            return "not connected".to_string();
        };
        let t0 = Instant::now();
        for (i, b) in LIST.as_bytes().iter().enumerate() {
            if let Err(e) = s.write_all(&[*b]) {
                return format!(
                    "closed by usernet after {i} bytes in {:.2?} of writing slowly: {e}",
                    t0.elapsed()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = s.shutdown(Shutdown::Write);
        match read_reply(&mut s) {
            Ok(r) => format!("reply: {r}"),
            Err(e) => format!("no reply: {e}"),
        }
    });

    let t0 = Instant::now();
    t.in_world(|| {
        upload_to_sink(up, 0xAB05E, 16 << 20);
        download_from_source(down, 0xAB05F, 16 << 20);
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "16 MiB each way took {took:.2?} with abusive API clients"
    );

    // The API still answers while those are held: at its limit of 64, each new client
    // closes the one that has waited longest. (API_TIMEOUT bounds the wait for the reply.)
    let v = api(&sock, LIST);
    assert_eq!(
        v.get("entries")
            .map(|e| matches!(e, Json::Arr(a) if a.len() == 2)),
        Some(true),
        "list_hostfwd while abused: {v:?}"
    );
    eprintln!("flooder: {}", flooder.join().expect("flooder"));
    eprintln!("slow client: {}", slow.join().expect("slow client"));
    drop(held);
    u.assert_running();
    // Every abusive connection is gone from usernet once the clients are.
    wait_fds(&u, base, IO_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(add(&sock, "udp", "0.0.0.0", 18082, 53), 3);
}

#[test]
fn api_client_over_the_limit_closes_the_one_waiting_longest() {
    let Some(t) = Topology::new() else { return };
    let (u, sock) = start_with_api(&t, &["--max-api-clients", "2"]);
    // Two connections that send nothing fill the two places.
    let mut first = api_connect(&sock);
    let mut second = api_connect(&sock);
    // A third client is served: the first, which has waited longest, makes room.
    let v = api(&sock, LIST);
    assert!(
        matches!(v.get("entries"), Some(Json::Arr(_))),
        "list_hostfwd with the API at its limit: {v:?}"
    );
    assert_eq!(
        read_reply(&mut first).as_deref(),
        Ok(""),
        "the longest-waiting client is closed without a reply"
    );
    // The second is still being served. It must send within usernet's CLIENT_TIMEOUT (5 s)
    // of being accepted, or usernet closes it without a reply: inherent in the timeout.
    let timeout = "usernet closes a client with no complete request 5 s after accepting it: \
                   did this test take longer to get here?";
    second
        .write_all(LIST.as_bytes())
        .unwrap_or_else(|e| panic!("second client writes: {e} ({timeout})"));
    second
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("second client half-closes: {e} ({timeout})"));
    let raw = read_reply(&mut second).unwrap_or_else(|e| panic!("second client: {e}"));
    assert!(
        raw.contains("\"entries\""),
        "second client's reply: {raw:?} (an empty one: {timeout})"
    );
    // The log line reaches us through a pipe read by another thread.
    let said = wait_for(IO_TIMEOUT, || {
        u.stderr()
            .contains("more than 2 clients, closing the one waiting longest")
            .then_some(())
    });
    assert!(
        said.is_some(),
        "usernet says why it closed one:\n{}",
        u.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// `usernet ports`
// ---------------------------------------------------------------------------------------------

/// `ip netns exec H usernet ports --api-socket SOCK ARGS...` with a deadline.
fn ports(t: &Topology, sock: &Path, args: &[&str]) -> Finished {
    let mut a = vec!["ports", "--api-socket", sock.to_str().expect("utf-8")];
    a.extend_from_slice(args);
    run_with_timeout(
        t.exec_in(&t.host, usernet_bin(), &a),
        Duration::from_secs(15),
    )
}

/// Non-empty lines with runs of whitespace collapsed (column alignment is free).
fn norm(s: &str) -> Vec<String> {
    s.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

#[track_caller]
fn ports_ok(t: &Topology, sock: &Path, args: &[&str], expected: &[&str]) {
    let f = ports(t, sock, args);
    assert_eq!(f.code(), Some(0), "usernet ports {args:?}:\n{f}");
    assert_eq!(
        norm(&f.stdout),
        expected,
        "usernet ports {args:?} stdout:\n{f}"
    );
}

#[track_caller]
fn ports_err(t: &Topology, sock: &Path, args: &[&str]) -> String {
    let f = ports(t, sock, args);
    assert_eq!(
        f.code(),
        Some(1),
        "usernet ports {args:?} must exit 1:\n{f}"
    );
    f.stderr.trim().to_string()
}

#[test]
fn ports_client_add_list_remove_output() {
    let Some(t) = Topology::new() else { return };
    let echo = TcpServer::echo(
        &t.container_ns(),
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000),
    );
    let (_u, sock) = start_with_api(&t, &[]);
    ports_ok(&t, &sock, &["list"], &["ID PROTO HOST GUEST"]);
    ports_ok(
        &t,
        &sock,
        &["add", "8080:7000"],
        &["1 tcp 0.0.0.0:8080 -> 10.0.2.100:7000"],
    );
    ports_ok(
        &t,
        &sock,
        &["add", "127.0.0.1:5353:53/udp"],
        &["2 udp 127.0.0.1:5353 -> 10.0.2.100:53"],
    );
    ports_ok(
        &t,
        &sock,
        &["add", "9000-9002:7000-7002/tcp"],
        &[
            "3 tcp 0.0.0.0:9000 -> 10.0.2.100:7000",
            "4 tcp 0.0.0.0:9001 -> 10.0.2.100:7001",
            "5 tcp 0.0.0.0:9002 -> 10.0.2.100:7002",
        ],
    );
    ports_ok(
        &t,
        &sock,
        &["list"],
        &[
            "ID PROTO HOST GUEST",
            "1 tcp 0.0.0.0:8080 -> 10.0.2.100:7000",
            "2 udp 127.0.0.1:5353 -> 10.0.2.100:53",
            "3 tcp 0.0.0.0:9000 -> 10.0.2.100:7000",
            "4 tcp 0.0.0.0:9001 -> 10.0.2.100:7001",
            "5 tcp 0.0.0.0:9002 -> 10.0.2.100:7002",
        ],
    );
    // What the client added is what the API lists.
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "0.0.0.0", 8080, 7000),
            entry(2, "udp", "127.0.0.1", 5353, 53),
            entry(3, "tcp", "0.0.0.0", 9000, 7000),
            entry(4, "tcp", "0.0.0.0", 9001, 7001),
            entry(5, "tcp", "0.0.0.0", 9002, 7002),
        ]),
    );
    t.in_world(|| {
        echo_once(SocketAddrV4::new(HOST_ADDR, 8080), b"via ports add");
        echo_once(SocketAddrV4::new(HOST_ADDR, 9000), b"via a range");
    });
    ports_ok(&t, &sock, &["remove", "1"], &["removed 1"]);
    ports_ok(&t, &sock, &["remove", "4"], &["removed 4"]);
    ports_ok(
        &t,
        &sock,
        &["list"],
        &[
            "ID PROTO HOST GUEST",
            "2 udp 127.0.0.1:5353 -> 10.0.2.100:53",
            "3 tcp 0.0.0.0:9000 -> 10.0.2.100:7000",
            "5 tcp 0.0.0.0:9002 -> 10.0.2.100:7002",
        ],
    );
    t.in_world(|| assert_refused(SocketAddrV4::new(HOST_ADDR, 8080)));
    drop(echo);
}

#[test]
fn ports_client_ipv6_host_address() {
    let Some(t) = Topology::new() else { return };
    let v6 = t.in_host(|| TcpListener::bind("[::1]:0").is_ok());
    if !require(v6, "IPv6 loopback (::1) unavailable in the host namespace") {
        return;
    }
    let (_u, sock) = start_with_api(&t, &[]);
    ports_ok(
        &t,
        &sock,
        &["add", "[::1]:8443:443"],
        &["1 tcp [::1]:8443 -> 10.0.2.100:443"],
    );
    ports_ok(
        &t,
        &sock,
        &["add", "[::]:5353:53/udp"],
        &["2 udp [::]:5353 -> 10.0.2.100:53"],
    );
    assert_reply(
        &sock,
        LIST,
        &entries(&[
            entry(1, "tcp", "::1", 8443, 443),
            entry(2, "udp", "::", 5353, 53),
        ]),
    );
}

#[test]
fn ports_client_errors_exit_1_with_the_desc() {
    let Some(t) = Topology::new() else { return };
    let (mut u, sock) = start_with_api(&t, &[]);
    ports_ok(
        &t,
        &sock,
        &["add", "8080:80"],
        &["1 tcp 0.0.0.0:8080 -> 10.0.2.100:80"],
    );

    let e = ports_err(&t, &sock, &["remove", "99"]);
    // slirp4netns's reply says "bad arguments.id"; the client says what is wrong.
    assert_eq!(
        e,
        "usernet: no published port with id 99 (the ids are 1; `usernet ports list` shows them)"
    );

    let e = ports_err(&t, &sock, &["add", "8080:81"]);
    assert!(
        e.starts_with("usernet: bad request: add_hostfwd: slirp_add_hostfwd failed")
            && e.contains("already in use"),
        "stderr: {e:?}"
    );

    // Malformed specs never reach usernet (and must fail, whatever the status).
    for spec in [
        "notaspec",
        "8080",
        "70000:80",
        "8080:0",
        "1.2.3:8080:80",
        "9000-9002:80-81",
        "8080:80/sctp",
    ] {
        let f = ports(&t, &sock, &["add", spec]);
        assert!(
            f.status.is_some() && !f.success(),
            "usernet ports add {spec:?} must fail:\n{f}"
        );
        assert!(
            !f.stderr.trim().is_empty(),
            "usernet ports add {spec:?}: no message\n{f}"
        );
    }
    ports_ok(
        &t,
        &sock,
        &["list"],
        &["ID PROTO HOST GUEST", "1 tcp 0.0.0.0:8080 -> 10.0.2.100:80"],
    );

    // No usernet behind the path: a prompt failure, not a hang.
    let missing = t.tmp.join("nobody-here.sock");
    let f = ports(&t, &missing, &["list"]);
    assert!(
        f.status.is_some(),
        "usernet ports hung on a missing socket:\n{f}"
    );
    assert!(
        !f.success(),
        "usernet ports on a missing socket succeeded:\n{f}"
    );
    assert!(f.stderr.starts_with("usernet: "), "{f}");
    u.assert_running();
}
