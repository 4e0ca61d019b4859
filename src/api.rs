//! The control API: slirp4netns's JSON protocol on a UNIX socket, and a client for it.
//!
//! # Theory of operation
//!
//! One request per connection: the client writes one JSON object, usually half-closes,
//! and reads one JSON reply; then we close. The server runs inside the event loop and
//! never blocks it: sockets are non-blocking, a request is at most [`MAX_REQUEST`] bytes
//! (larger ones get the `too large message` error), a connection that has not sent a
//! complete request within [`CLIENT_TIMEOUT`] is closed, and at most `--max-api-clients`
//! (64) are served at once (a new one beyond that closes the one waiting longest). A
//! request is answered as soon as its bytes form a complete JSON value or the client
//! half-closes, whichever comes first.
//!
//! Replies and error texts are slirp4netns's, byte for byte where callers might match
//! them (podman and RootlessKit do), with two improvements: a request without `proto` is
//! an error reply instead of a crash, and IPv6 host addresses are accepted.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forwarder::port::{PortError, PortRule, Proto};
use forwarder::{Forwarder, Io};

use crate::host::Sockets;
use mio::net::UnixListener;
use mio::{Interest, Registry, Token};

use crate::requests::{error, Clients};
use crate::subsystem::{Cx, Next, StartError, Subsystem};
use serde_json::{json, Value};

/// Largest request, in bytes (slirp4netns's buffer: 4096 bytes read means too large).
pub const MAX_REQUEST: usize = 4096;
/// Time a client has to send its request.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the API may change.
pub trait Control {
    /// Publishes a port.
    ///
    /// # Errors
    /// When the rule is invalid or the host socket cannot listen.
    fn add(
        &mut self,
        proto: Proto,
        host: SocketAddr,
        guest_addr: Option<Ipv4Addr>,
        guest_port: u16,
    ) -> Result<PortRule, PortError>;
    /// Unpublishes a port.
    ///
    /// # Errors
    /// When there is no such rule.
    fn remove(&mut self, id: u32) -> Result<(), PortError>;
    /// The rules.
    fn list(&self) -> Vec<PortRule>;
    /// Counters, flows and limits, as the `return` object of `get_stats`.
    fn stats(&self) -> Value;
    /// Who answers, as the `return` object of `get_info`: `mode`, `pid`, and in run mode
    /// `name` and `command`.
    fn info(&self) -> Value {
        json!({})
    }
    /// An egress policy command ([`crate::egress::execute`]); `None`: not one, or no
    /// policy here.
    fn egress(&mut self, _execute: &str, _args: Option<&Value>) -> Option<Value> {
        None
    }
}

/// The API's view of the forwarder for one request.
pub(crate) struct FwdControl<'a, 'io> {
    /// The forwarder.
    pub fwd: &'a mut Forwarder,
    /// The host side.
    pub io: &'a mut Io<'io, Sockets>,
}

impl Control for FwdControl<'_, '_> {
    fn add(
        &mut self,
        proto: Proto,
        host: std::net::SocketAddr,
        guest: Option<std::net::Ipv4Addr>,
        port: u16,
    ) -> Result<PortRule, PortError> {
        self.fwd.add_port(proto, host, guest, port, self.io.host)
    }
    fn remove(&mut self, id: u32) -> Result<(), PortError> {
        self.fwd.remove_port(id, self.io)
    }
    fn list(&self) -> Vec<PortRule> {
        self.fwd.port_rules()
    }
    fn egress(&mut self, execute: &str, args: Option<&Value>) -> Option<Value> {
        crate::egress::execute(self.fwd, self.io, execute, args)
    }
    fn stats(&self) -> serde_json::Value {
        let (tcp, udp, icmp) = self.fwd.flow_counts();
        let limits = self.fwd.limits();
        let counters: serde_json::Map<String, serde_json::Value> = self
            .fwd
            .counters()
            .iter()
            .map(|(name, value)| (name.to_owned(), value.into()))
            .collect();
        let mut stats = serde_json::json!({
            "flows": {
                "tcp": tcp,
                "tcp_half_open": self.fwd.half_open(),
                "udp": udp,
                "icmp": icmp,
                "published_ports": self.fwd.port_rules().len(),
            },
            "limits": {
                "tcp_flows": limits.tcp_flows,
                "tcp_half_open": limits.tcp_half_open,
                "udp_flows": limits.udp_flows,
                "icmp_flows": limits.icmp_flows,
            },
            "counters": counters,
        });
        // The egress policy's rules and hits, when there is one.
        if let Some(p) = self.fwd.egress(None) {
            stats["egress"] = crate::egress::policy_json(p);
        }
        stats
    }
}

/// A published port as `list_hostfwd` shows it.
pub fn rule_json(r: &PortRule) -> Value {
    json!({
        "id": r.id,
        "proto": r.proto.as_str(),
        "host_addr": r.host.ip().to_string(),
        "host_port": r.host.port(),
        "guest_addr": r.guest.ip().to_string(),
        "guest_port": r.guest.port(),
    })
}

/// Answers one request (its raw bytes).
pub fn execute(request: &[u8], ctl: &mut dyn Control) -> Value {
    if request.len() >= MAX_REQUEST {
        return error("bad request: too large message");
    }
    let Ok(v) = serde_json::from_slice::<Value>(request) else {
        return error("bad request: cannot parse JSON");
    };
    let Some(obj) = v.as_object() else {
        return error("bad request: json_object() failed");
    };
    let Some(execute) = obj.get("execute").and_then(Value::as_str) else {
        return error("bad request: no execute found");
    };
    let args = obj.get("arguments");
    let arg = |name: &str| args.and_then(|a| a.get(name));
    match execute {
        "add_hostfwd" => add_hostfwd(&arg, ctl),
        "list_hostfwd" => {
            json!({ "entries": ctl.list().iter().map(rule_json).collect::<Vec<_>>() })
        }
        "remove_hostfwd" => {
            let id = arg("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok());
            match id.map(|id| ctl.remove(id)) {
                Some(Ok(())) => json!({ "return": {} }),
                _ => error("bad request: remove_hostfwd: bad arguments.id"),
            }
        }
        "get_stats" => json!({ "return": ctl.stats() }),
        "get_info" => json!({ "return": ctl.info() }),
        other => ctl
            .egress(other, args)
            .unwrap_or_else(|| error("bad request: unknown execute")),
    }
}

fn port_arg(v: Option<&Value>) -> Option<u16> {
    v.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

fn add_hostfwd<'v>(arg: &dyn Fn(&str) -> Option<&'v Value>, ctl: &mut dyn Control) -> Value {
    let proto = match arg("proto").and_then(Value::as_str) {
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        _ => return error("bad request: add_hostfwd: bad arguments.proto"),
    };
    let host_ip = match arg("host_addr").and_then(Value::as_str) {
        None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(s) => match s.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return error("bad request: add_hostfwd: bad arguments.host_addr"),
        },
    };
    if arg("host_addr").is_some_and(|v| !v.is_string()) {
        return error("bad request: add_hostfwd: bad arguments.host_addr");
    }
    let Some(host_port) = port_arg(arg("host_port")) else {
        return error("bad request: add_hostfwd: bad arguments.host_port");
    };
    let guest_addr = match arg("guest_addr") {
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => match s.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => return error("bad request: add_hostfwd: bad arguments.guest_addr"),
        },
        Some(_) => return error("bad request: add_hostfwd: bad arguments.guest_addr"),
    };
    let Some(guest_port) = port_arg(arg("guest_port")) else {
        return error("bad request: add_hostfwd: bad arguments.guest_port");
    };
    match ctl.add(
        proto,
        SocketAddr::new(host_ip, host_port),
        guest_addr,
        guest_port,
    ) {
        Ok(rule) => json!({ "return": { "id": rule.id } }),
        Err(PortError::Invalid(_)) if guest_addr.is_some() => {
            error("bad request: add_hostfwd: bad arguments.guest_addr")
        }
        Err(e) => {
            // The whole chain: the OS error says why (slirp4netns's text stays the prefix).
            let mut desc = format!("bad request: add_hostfwd: slirp_add_hostfwd failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                desc.push_str(&format!(": {s}"));
                source = s.source();
            }
            error(&desc)
        }
    }
}

/// The API socket.
pub struct Server {
    listener: UnixListener,
    /// The socket's directory, kept open so that the socket can be unlinked at exit even
    /// after the sandbox has pivoted away from the host's file system.
    dir: std::fs::File,
    name: std::ffi::OsString,
    clients: Clients,
    listener_token: Token,
}

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on API socket {path}")]
pub struct ApiError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl Server {
    /// Binds `path` (removing a stale socket file first, as slirp4netns does) and
    /// registers it as `listener_token`; client tokens start at `client_base`; at most
    /// `max_clients` are served at once.
    ///
    /// # Errors
    /// [`ApiError`] when the socket cannot be bound or registered.
    pub fn bind(
        path: &Path,
        registry: &Registry,
        listener_token: Token,
        client_base: usize,
        max_clients: usize,
    ) -> Result<Server, ApiError> {
        let fail = |source| ApiError {
            path: path.to_owned(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let name = path
            .file_name()
            .ok_or_else(|| fail(io::Error::from(io::ErrorKind::InvalidInput)))?
            .to_owned();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::File::open(parent).map_err(fail)?;
        let mut listener = UnixListener::bind(path).map_err(fail)?;
        registry
            .register(&mut listener, listener_token, Interest::READABLE)
            .map_err(fail)?;
        Ok(Server {
            listener,
            dir,
            name,
            clients: Clients::new("API", client_base, max_clients, MAX_REQUEST, CLIENT_TIMEOUT),
            listener_token,
        })
    }

    /// Handles readiness of an API token.
    pub fn handle(&mut self, token: Token, registry: &Registry, ctl: &mut dyn Control) {
        if token == self.listener_token {
            self.clients.accept(&self.listener, registry);
            return;
        }
        let Some(req) = self.clients.read(token, registry) else {
            return;
        };
        let reply = execute(&req.bytes, ctl);
        log::debug!(
            "API request {:?} -> {reply}",
            String::from_utf8_lossy(&req.bytes)
        );
        self.clients
            .reply(req.client, reply.to_string().as_bytes(), registry);
    }

    /// Closes clients that have been silent too long and retries a failed `accept`;
    /// returns when to call again.
    pub fn expire(&mut self, now: Instant, registry: &Registry) -> Option<Instant> {
        self.clients.expire(now, &self.listener, registry)
    }
}

/// The API socket as a part of the event loop (`--api-socket`, run mode's own): bound at
/// start-up, its listener at the subsystem's base token and its clients after it.
pub struct Socket {
    path: PathBuf,
    max_clients: usize,
    server: Option<Server>,
}

impl Socket {
    /// The socket at `path`, serving at most `max_clients` at once.
    pub fn new(path: PathBuf, max_clients: usize) -> Socket {
        Socket {
            path,
            max_clients,
            server: None,
        }
    }
}

impl Subsystem for Socket {
    fn start(&mut self, base: usize, cx: &mut Cx<'_>) -> Result<(), StartError> {
        let server = Server::bind(
            &self.path,
            cx.registry,
            Token(base),
            base + 1,
            self.max_clients,
        )?;
        self.server = Some(server);
        Ok(())
    }

    fn handle(&mut self, local: usize, cx: &mut Cx<'_>) -> Next {
        let Some(server) = self.server.as_mut() else {
            return Next::Continue;
        };
        let token = Token(server.listener_token.0 + local);
        let mut io = cx.sockets.io(cx.taps.sink());
        let mut ctl = InfoControl {
            inner: FwdControl {
                fwd: cx.fwd,
                io: &mut io,
            },
            info: cx.info,
            waits: cx.waits,
        };
        server.handle(token, cx.registry, &mut ctl);
        Next::Continue
    }

    fn poll_timeout(&mut self, cx: &mut Cx<'_>) -> Option<Instant> {
        self.server.as_mut()?.expire(Instant::now(), cx.registry)
    }
}

/// [`FwdControl`] plus what `get_info` answers and the loop's waits.
struct InfoControl<'c, 'a, 'io> {
    inner: FwdControl<'a, 'io>,
    info: &'c serde_json::Value,
    /// The event loop's waits so far (`get_stats` section `loop`).
    waits: crate::busy_poll::WaitStats,
}

impl Control for InfoControl<'_, '_, '_> {
    fn add(
        &mut self,
        proto: Proto,
        host: SocketAddr,
        guest: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<PortRule, PortError> {
        self.inner.add(proto, host, guest, port)
    }
    fn remove(&mut self, id: u32) -> Result<(), PortError> {
        self.inner.remove(id)
    }
    fn list(&self) -> Vec<PortRule> {
        self.inner.list()
    }
    fn egress(&mut self, execute: &str, args: Option<&Value>) -> Option<Value> {
        self.inner.egress(execute, args)
    }
    fn stats(&self) -> Value {
        let mut stats = self.inner.stats();
        let w = self.waits;
        stats["loop"] = json!({
            "sleeps": w.sleeps,
            "spin_polls": w.spin_polls,
            "spun_wakeups": w.spun_wakeups,
            "spin_us": w.spin_us,
        });
        stats
    }
    fn info(&self) -> Value {
        self.info.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = nix::unistd::unlinkat(
            &self.dir,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

/// One request from the `usernet ports` client: the reply.
///
/// # Errors
/// When the socket cannot be reached or the reply is not JSON.
pub fn request(path: &Path, req: &Value) -> io::Result<Value> {
    let mut s = StdUnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(req.to_string().as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    serde_json::from_slice(&out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One line describing a rule: `1 tcp 0.0.0.0:8080 -> 10.0.2.100:80`.
pub fn describe(entry: &Value) -> String {
    let s = |k: &str| {
        entry
            .get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    let host_addr = s("host_addr");
    let host = if host_addr.contains(':') {
        format!("[{host_addr}]:{}", s("host_port"))
    } else {
        format!("{host_addr}:{}", s("host_port"))
    };
    format!(
        "{} {} {} -> {}:{}",
        s("id"),
        s("proto"),
        host,
        s("guest_addr"),
        s("guest_port")
    )
}

/// A rule in a few characters, as `usernet ps` shows it: `0.0.0.0:8080->80/tcp`.
pub fn describe_short(entry: &Value) -> String {
    let host_addr = entry["host_addr"].as_str().unwrap_or("?");
    let host_port = &entry["host_port"];
    let host = if host_addr.contains(':') {
        format!("[{host_addr}]:{host_port}")
    } else {
        format!("{host_addr}:{host_port}")
    };
    format!(
        "{host}->{}/{}",
        entry["guest_port"],
        entry["proto"].as_str().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    #[derive(Default)]
    struct Fake {
        rules: Vec<PortRule>,
        next: u32,
    }

    impl Control for Fake {
        fn add(
            &mut self,
            proto: Proto,
            host: SocketAddr,
            guest_addr: Option<Ipv4Addr>,
            guest_port: u16,
        ) -> Result<PortRule, PortError> {
            if self
                .rules
                .iter()
                .any(|r| r.host == host && r.proto == proto)
            {
                return Err(PortError::InUse {
                    addr: host,
                    source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
                });
            }
            self.next += 1;
            let rule = PortRule {
                id: self.next,
                proto,
                host,
                guest: SocketAddrV4::new(
                    guest_addr.unwrap_or(Ipv4Addr::new(10, 0, 2, 100)),
                    guest_port,
                ),
                device: None,
            };
            self.rules.push(rule.clone());
            Ok(rule)
        }
        fn remove(&mut self, id: u32) -> Result<(), PortError> {
            let before = self.rules.len();
            self.rules.retain(|r| r.id != id);
            if self.rules.len() == before {
                return Err(PortError::NotFound(id));
            }
            Ok(())
        }
        fn list(&self) -> Vec<PortRule> {
            self.rules.clone()
        }
        fn stats(&self) -> Value {
            json!({ "flows": { "tcp": 0 } })
        }
    }

    fn run(ctl: &mut Fake, req: &str) -> String {
        execute(req.as_bytes(), ctl).to_string()
    }

    #[test]
    fn add_list_remove_exact_shapes() {
        let mut f = Fake::default();
        let add = r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"10.0.2.100","guest_port":80}}"#;
        assert_eq!(run(&mut f, add), r#"{"return":{"id":1}}"#);
        assert_eq!(
            run(&mut f, "{\"execute\":\"list_hostfwd\"}\n"),
            r#"{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":8080,"guest_addr":"10.0.2.100","guest_port":80}]}"#
        );
        assert_eq!(
            run(
                &mut f,
                r#"{"execute":"remove_hostfwd","arguments":{"id":1}}"#
            ),
            r#"{"return":{}}"#
        );
        assert_eq!(
            run(&mut f, r#"{"execute":"list_hostfwd"}"#),
            r#"{"entries":[]}"#
        );
    }

    #[test]
    fn add_defaults_and_ipv6_host() {
        let mut f = Fake::default();
        let r = run(
            &mut f,
            r#"{"execute":"add_hostfwd","arguments":{"proto":"udp","host_addr":"","host_port":53,"guest_port":53}}"#,
        );
        assert_eq!(r, r#"{"return":{"id":1}}"#);
        assert_eq!(f.rules[0].host, "0.0.0.0:53".parse().unwrap());
        assert_eq!(f.rules[0].guest, "10.0.2.100:53".parse().unwrap());
        run(
            &mut f,
            r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"::1","host_port":80,"guest_port":80}}"#,
        );
        assert_eq!(f.rules[1].host, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn errors_match_slirp4netns() {
        let mut f = Fake::default();
        let cases = [
            ("not json", "bad request: cannot parse JSON"),
            ("[1,2]", "bad request: json_object() failed"),
            ("{}", "bad request: no execute found"),
            (
                r#"{"execute":"frobnicate"}"#,
                "bad request: unknown execute",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                r#"{"execute":"add_hostfwd"}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"sctp","host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.proto",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_addr":"nope","host_port":1,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_addr",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":0,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":70000,"guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.host_port",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1,"guest_addr":"x","guest_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_addr",
            ),
            (
                r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1}}"#,
                "bad request: add_hostfwd: bad arguments.guest_port",
            ),
            (
                r#"{"execute":"remove_hostfwd","arguments":{"id":9}}"#,
                "bad request: remove_hostfwd: bad arguments.id",
            ),
            (
                r#"{"execute":"remove_hostfwd"}"#,
                "bad request: remove_hostfwd: bad arguments.id",
            ),
        ];
        for (req, desc) in cases {
            assert_eq!(run(&mut f, req), error(desc).to_string(), "{req}");
        }
        let big = format!(
            "{{\"execute\":\"list_hostfwd\",\"pad\":\"{}\"}}",
            "x".repeat(5000)
        );
        assert_eq!(
            run(&mut f, &big),
            error("bad request: too large message").to_string()
        );
    }

    #[test]
    fn port_in_use_is_clear() {
        let mut f = Fake::default();
        let add = r#"{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":8080,"guest_port":80}}"#;
        run(&mut f, add);
        let r = run(&mut f, add);
        assert!(
            r.contains("bad request: add_hostfwd: slirp_add_hostfwd failed"),
            "{r}"
        );
        assert!(r.contains("already in use"), "{r}");
    }

    #[test]
    fn get_stats_returns_the_stats_object() {
        let mut f = Fake::default();
        assert_eq!(
            run(&mut f, r#"{"execute":"get_stats"}"#),
            r#"{"return":{"flows":{"tcp":0}}}"#
        );
    }

    #[test]
    fn describe_rules() {
        let e = json!({"id":1,"proto":"tcp","host_addr":"::","host_port":80,"guest_addr":"10.0.2.100","guest_port":8080});
        assert_eq!(describe(&e), "1 tcp [::]:80 -> 10.0.2.100:8080");
    }
}
