//! Control connections read without blocking the event loop: the API socket's and the
//! network socket's.
//!
//! # Theory of operation
//!
//! One request per connection: a client connects, writes one JSON value (a line, or up to
//! a half-close), may pass one descriptor with it (`SCM_RIGHTS`: a member's TAP), and reads
//! one reply; then we close. Both control sockets run inside the event loop, which also
//! carries every guest's traffic, so nothing here may wait for a client:
//!
//! - sockets are non-blocking and registered for readability; each readiness event reads
//!   what is there into the client's buffer (at most `MAX_REQUEST + 1` bytes are kept:
//!   larger requests are answered, with an error, as soon as that much has come);
//! - a request is complete when its bytes form a JSON value, when the client half-closes,
//!   or when it reaches the size limit; only then does the owner see it ([`Clients::read`]);
//! - a client that has not completed its request within its timeout is closed
//!   ([`Clients::expire`]), and at most `max_clients` are served at once: a new connection
//!   beyond that closes the one that has waited longest without completing its request.
//!   So a silent or slow client costs one descriptor for a while, never the loop, and
//!   idle connections cannot lock a caller like podman out (a real request is complete
//!   within microseconds of its connect, so it is never the longest-waiting);
//! - the reply is a few hundred bytes on a fresh socket: one non-blocking write; a client
//!   that does not read loses its reply, never our loop;
//! - the reply is one JSON value in slirp4netns's shapes on both sockets: `{"return": ...}`,
//!   or `{"error": {"desc": ...}}` ([`error`], shared by every command's handler).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use serde_json::{json, Value};
use slab::Slab;

/// How soon `accept` is tried again after it failed for lack of fds.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    fd: Option<OwnedFd>,
    since: Instant,
    /// Accept order (ties in `since` are possible within one batch).
    serial: u64,
}

/// The connections of one control socket.
pub struct Clients {
    clients: Slab<Client>,
    /// Client `i` is registered as `Token(base + i)`.
    base: usize,
    max_clients: usize,
    max_request: usize,
    timeout: Duration,
    /// Names the socket in log lines.
    what: &'static str,
    /// When to try `accept` again after it failed for lack of fds (EMFILE): the client
    /// waits in the backlog and no new edge will say so.
    retry: Option<Instant>,
    /// The next client's `serial`.
    accepted: u64,
}

/// A complete request.
pub struct Request {
    /// Whom to [`reply`](Clients::reply) to.
    pub client: usize,
    /// Its bytes (more than the size limit when it was too large).
    pub bytes: Vec<u8>,
    /// The descriptor passed with it, if any.
    pub fd: Option<OwnedFd>,
}

/// The reply refusing a request: `{"error": {"desc": DESC}}`.
pub fn error(desc: &str) -> Value {
    json!({ "error": { "desc": desc } })
}

impl Clients {
    /// No clients yet; client tokens start at `base`.
    pub fn new(
        what: &'static str,
        base: usize,
        max_clients: usize,
        max_request: usize,
        timeout: Duration,
    ) -> Clients {
        Clients {
            clients: Slab::new(),
            base,
            max_clients,
            max_request,
            timeout,
            what,
            retry: None,
            accepted: 0,
        }
    }

    /// Accepts every pending connection of `listener`.
    pub fn accept(&mut self, listener: &UnixListener, registry: &Registry) {
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("{}: accept failed ({e}); trying again shortly", self.what);
                    self.retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            };
            if self.clients.len() >= self.max_clients {
                // Every client here is still sending its request (complete ones are
                // answered and closed at once); the one accepted first has waited longest.
                let oldest = self
                    .clients
                    .iter()
                    .min_by_key(|(_, c)| c.serial)
                    .map(|(id, _)| id);
                log::warn!(
                    "{}: more than {} clients, closing the one waiting longest for its request",
                    self.what,
                    self.max_clients
                );
                if let Some(id) = oldest {
                    self.close(id, registry);
                }
            }
            let entry = self.clients.vacant_entry();
            let token = Token(self.base + entry.key());
            if registry
                .register(&mut stream, token, Interest::READABLE)
                .is_err()
            {
                continue;
            }
            entry.insert(Client {
                stream,
                buf: Vec::with_capacity(256),
                fd: None,
                since: Instant::now(),
                serial: self.accepted,
            });
            self.accepted += 1;
        }
    }

    /// Reads what client `token` sent; its request once complete (see the module's
    /// header). A client whose socket failed is closed.
    pub fn read(&mut self, token: Token, registry: &Registry) -> Option<Request> {
        let id = token.0.checked_sub(self.base)?;
        let client = self.clients.get_mut(id)?;
        let mut chunk = [0u8; 1024];
        let mut eof = false;
        loop {
            match crate::sys::recv_with_fd(client.stream.as_fd(), &mut chunk) {
                Ok((0, _)) => {
                    eof = true;
                    break;
                }
                Ok((n, fd)) => {
                    if fd.is_some() {
                        client.fd = fd;
                    }
                    let room = (self.max_request + 1).saturating_sub(client.buf.len());
                    client.buf.extend_from_slice(&chunk[..n.min(room)]);
                    if client.buf.len() > self.max_request {
                        break;
                    }
                }
                Err(nix::Error::EAGAIN) => break,
                Err(nix::Error::EINTR) => {}
                Err(_) => {
                    self.close(id, registry);
                    return None;
                }
            }
        }
        let complete = eof
            || client.buf.len() >= self.max_request
            || serde_json::from_slice::<serde_json::Value>(&client.buf).is_ok();
        if !complete {
            return None;
        }
        Some(Request {
            client: id,
            bytes: std::mem::take(&mut client.buf),
            fd: client.fd.take(),
        })
    }

    /// Sends `reply` to `client` and closes the connection.
    pub fn reply(&mut self, client: usize, reply: &[u8], registry: &Registry) {
        if let Some(c) = self.clients.get_mut(client) {
            let _ = io::Write::write_all(&mut c.stream, reply);
        }
        self.close(client, registry);
    }

    fn close(&mut self, id: usize, registry: &Registry) {
        if let Some(mut c) = self.clients.try_remove(id) {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// Closes clients that have been silent too long and retries a failed `accept`;
    /// returns when to call again.
    pub fn expire(
        &mut self,
        now: Instant,
        listener: &UnixListener,
        registry: &Registry,
    ) -> Option<Instant> {
        if self.retry.is_some_and(|at| now >= at) {
            self.retry = None;
            self.accept(listener, registry);
        }
        let stale: Vec<usize> = self
            .clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.since) >= self.timeout)
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            log::debug!(
                "{}: closing a client that sent no complete request",
                self.what
            );
            self.close(id, registry);
        }
        self.clients
            .iter()
            .map(|(_, c)| c.since + self.timeout)
            .chain(self.retry)
            .min()
    }
}
