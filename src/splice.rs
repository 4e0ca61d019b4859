//! Relaying two TCP sockets to each other without the bytes entering this process:
//! pasta's "splice" path.
//!
//! # Theory of operation
//!
//! A [`Pair`] holds two connected stream sockets and one pipe per direction. Bytes go
//! from a socket into its pipe and from the pipe into the other socket with `splice(2)`,
//! as in pasta: the data never enters this process's memory. A side reads into its pipe
//! only once the pipe is empty, so the pipe's fill is known without asking the kernel.
//! When a side reaches end of file and its pipe is empty, the other side's sending side
//! is shut down (half-close); the pair is over when both sides reached end of file and
//! both pipes are empty, or on an error of either socket.
//!
//! The two sockets are watched under two tokens ([`crate::host::Sockets`]: the flow's id
//! for side A, the accepted socket, and [`crate::host::PEER_TOKENS`] plus it for side B),
//! so an event says which socket it is for. [`Pair::note`] turns it into the directions
//! that socket can serve, and [`Pair::pump_noted`] moves only those:
//!
//! - a side readable: its own direction (drain its pipe, then read it while the pipe
//!   empties);
//! - a side writable: the other direction, only if that one's pipe holds bytes; it drains
//!   them, then goes on reading the other socket, whose readable edge was taken while
//!   the pipe could not empty.
//!
//! A direction whose pipe is empty has read its socket until `EAGAIN` (or its end), so a
//! writable destination with an empty pipe has nothing to move: the edge-triggered
//! readable event of the source comes when there is. An idle direction costs no
//! `splice`: a 1-byte ping-pong takes three per direction (into the pipe, out of it, and
//! the read that finds the socket empty), where pumping both directions on every event
//! of either socket also tried the idle one, an `EAGAIN` each time.
//!
//! Urgent data (`MSG_OOB`) stays in the stream, in its place, as in the flows through
//! the guest link. `splice` from a TCP socket stops at the urgent mark, whatever the
//! socket's options: there it moves nothing, and says `EAGAIN`, or 0 once the peer's FIN
//! is queued, with the urgent byte and the rest still to read. Taken at its word, that
//! stalls the direction (no new readable edge comes for bytes already queued) or cuts the
//! stream at the mark. So both sockets of a pair keep urgent data inline (`SO_OOBINLINE`,
//! from their listener or set where they are made: [`crate::host`],
//! [`crate::pasta::agent`]), both are watched for `EPOLLPRI` as well, and a socket that
//! reported it is marked for the pair's life. On a marked socket a `splice` that moves
//! nothing is followed by a one-byte `recv`, which does pass the mark: the byte goes into
//! the (empty, so it cannot be short) pipe and waits its turn there, and splicing goes
//! on; only the `recv`'s own `EAGAIN` or 0 means an empty socket or the end of file.
//!
//! The urgent data and the FIN behind it may arrive after the event at hand was reported
//! and before its `splice`, which then returns 0 at a mark that no `EPOLLPRI` announced.
//! So a `splice` of 0 from an unmarked socket is its end of file only once an event of
//! that socket reported the peer's end of stream (`EPOLLRDHUP`; `Side::hup`): by then
//! everything before the FIN was there, and a pending mark was reported with it. Before,
//! the 0 waits for that event, which the FIN's arrival raises. The sockets that never had
//! urgent data pay nothing: no call more per `splice` (a `splice` more only when the FIN
//! overtakes its event), and the `EPOLLPRI` interest rides on their registrations.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use forwarder::Ready;
use mio::net::TcpStream;

/// Pipe capacity asked for per direction (the kernel may give less: a user's pipes
/// beyond `fs.pipe-user-pages-soft` get the minimum).
const PIPE_SIZE: usize = 1 << 20;

/// A pipe that bytes cross between two sockets by `splice(2)`.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in it.
    len: usize,
    /// Its capacity.
    cap: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let asked = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(asked))
            .or_else(|_| fcntl(&w, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Pipe {
            r,
            w,
            len: 0,
            cap: usize::try_from(cap).unwrap_or(4096),
        })
    }
}

/// `splice(2)` without blocking: `Ok(None)` for `EAGAIN`.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<Option<usize>> {
    use nix::fcntl::SpliceFFlags;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        match nix::fcntl::splice(from, None, to, None, len, flags) {
            Ok(n) => return Ok(Some(n)),
            Err(nix::errno::Errno::EAGAIN) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// One side of a pair.
struct Side {
    sock: TcpStream,
    /// Read from this side, not yet written to the other.
    pipe: Pipe,
    /// This side reached end of file.
    eof: bool,
    /// The other side's sending side was shut down (after this side's end of file).
    shut: bool,
    /// This socket reported urgent data (`EPOLLPRI`) once: a `splice` from it that moves
    /// nothing may have stopped at the urgent mark (see the module's header).
    urgent: bool,
    /// This socket reported its peer's end of stream (`EPOLLRDHUP` or `EPOLLHUP`): only
    /// then is a `splice` of 0 from it the end of file, unless `urgent` (see the module's
    /// header).
    hup: bool,
}

impl Side {
    fn new(sock: TcpStream) -> io::Result<Side> {
        Ok(Side {
            sock,
            pipe: Pipe::new()?,
            eof: false,
            shut: false,
            urgent: false,
            hup: false,
        })
    }

    fn done(&self) -> bool {
        self.eof && self.pipe.len == 0
    }
}

/// Which socket of a [`Pair`] an event is for: `A` is the one it was made with first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The first socket (the accepted connection).
    A,
    /// The second socket (the one opened for it).
    B,
}

/// Two stream sockets relayed to each other; see the module's header.
pub struct Pair {
    a: Side,
    b: Side,
    /// The directions the events since the last pump can move: A to B, B to A.
    noted: [bool; 2],
}

impl Pair {
    /// Relays `a` and `b`, which come with their options (Nagle off, urgent data inline)
    /// from their listener or their maker: none is set per connection here.
    ///
    /// # Errors
    /// When the pipes cannot be made (`EMFILE`...).
    pub fn new(a: TcpStream, b: TcpStream) -> io::Result<Pair> {
        Ok(Pair {
            a: Side::new(a)?,
            b: Side::new(b)?,
            noted: [false; 2],
        })
    }

    /// The two sockets, to register or deregister.
    pub fn sockets(&mut self) -> [&mut TcpStream; 2] {
        [&mut self.a.sock, &mut self.b.sock]
    }

    /// Notes event `ready` of socket `end`: the directions it lets move, for the next
    /// [`pump_noted`](Self::pump_noted). Readable or urgent: its own; writable: the
    /// other, if that one's pipe holds bytes (an empty pipe means its source was read to
    /// `EAGAIN`). Urgent data and the peer's end of stream are kept for good
    /// (`Side::urgent`, `Side::hup`).
    pub fn note(&mut self, end: End, ready: &Ready) {
        let (own, other, side, other_side) = match end {
            End::A => (0, 1, &mut self.a, &self.b),
            End::B => (1, 0, &mut self.b, &self.a),
        };
        side.urgent |= ready.urgent;
        side.hup |= ready.hup;
        self.noted[own] |= ready.readable || ready.urgent;
        self.noted[other] |= ready.writable && other_side.pipe.len > 0;
    }

    /// Moves what the noted events let move (see [`note`](Self::note)), and forgets them.
    /// Returns the bytes written to either side, and whether the pair is over (both ends
    /// done, or an error).
    pub fn pump_noted(&mut self) -> (usize, bool) {
        let [a_to_b, b_to_a] = std::mem::take(&mut self.noted);
        self.pump_ways(a_to_b, b_to_a)
    }

    /// Moves what either side has (and what waits in the pipes) to the other, whatever
    /// the events (as if each socket had reported its peer's end of stream, if any).
    /// Returns as [`pump_noted`](Self::pump_noted).
    #[cfg(test)]
    pub fn pump(&mut self) -> (usize, bool) {
        self.a.hup = true;
        self.b.hup = true;
        self.pump_ways(true, true)
    }

    fn pump_ways(&mut self, a_to_b: bool, b_to_a: bool) -> (usize, bool) {
        let mut moved = 0;
        let mut r = Ok(());
        if a_to_b {
            r = pump_one(&mut self.a, &mut self.b, &mut moved);
        }
        if b_to_a && r.is_ok() {
            r = pump_one(&mut self.b, &mut self.a, &mut moved);
        }
        (moved, r.is_err() || (self.a.done() && self.b.done()))
    }
}

/// Moves what `src` has (and what waits in its pipe) to `dst`, adding to `moved`. An
/// error (or a write of 0) ends the pair.
fn pump_one(src: &mut Side, dst: &mut Side, moved: &mut usize) -> io::Result<()> {
    loop {
        // Empty the pipe first.
        while src.pipe.len > 0 {
            match splice(src.pipe.r.as_fd(), dst.sock.as_fd(), src.pipe.len)? {
                Some(0) => return Err(io::ErrorKind::WriteZero.into()),
                Some(n) => {
                    src.pipe.len -= n;
                    *moved += n;
                }
                None => return Ok(()),
            }
        }
        if src.eof {
            if !src.shut {
                let _ = dst.sock.shutdown(Shutdown::Write);
                src.shut = true;
            }
            return Ok(());
        }
        // The pipe is empty: EAGAIN can only mean that the socket is, or, on a socket
        // that had urgent data, that the read stopped at the urgent mark (so can 0).
        match splice(src.sock.as_fd(), src.pipe.w.as_fd(), src.pipe.cap)? {
            Some(0) | None if src.urgent => {
                if !pass_mark(src)? {
                    return Ok(());
                }
            }
            // The end of stream arrived after the event at hand: its own event, urgent
            // data reported with it if a mark is before it, is still to come.
            Some(0) if !src.hup => return Ok(()),
            Some(0) => src.eof = true,
            Some(n) => src.pipe.len += n,
            None => return Ok(()),
        }
    }
}

/// After a `splice` from `src` (pipe empty) moved nothing: reads one byte with `recv`,
/// which gets past the urgent mark where `splice` stops (the urgent byte itself, inline
/// by `SO_OOBINLINE`), and puts it in the pipe, where it waits its turn like any other.
/// Returns whether the socket may have more (`false`: `EAGAIN`, it is empty). A read of
/// 0 is the end of file.
fn pass_mark(src: &mut Side) -> io::Result<bool> {
    let mut byte = [0u8; 1];
    let n = loop {
        match (&src.sock).read(&mut byte) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    if n == 0 {
        src.eof = true;
        return Ok(true);
    }
    // One byte into an empty pipe: nothing can be left over (a failure ends the pair).
    match nix::unistd::write(&src.pipe.w, &byte)? {
        1 => src.pipe.len += 1,
        _ => return Err(io::ErrorKind::WriteZero.into()),
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn readable() -> Ready {
        Ready {
            readable: true,
            ..Ready::default()
        }
    }

    fn writable() -> Ready {
        Ready {
            writable: true,
            ..Ready::default()
        }
    }

    fn connected() -> (std::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, TcpStream::from_std(s))
    }

    #[test]
    fn relays_both_ways_and_half_closes() {
        let (mut client, a) = connected();
        let (mut server, b) = connected();
        let mut pair = Pair::new(a, b).unwrap();
        // Bounds that only a broken relay reaches: it fails the test instead of hanging it.
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        for s in [&client, &server] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
        }
        let pump = |pair: &mut Pair| {
            assert!(std::time::Instant::now() < give_up, "the relay stalled");
            pair.pump()
        };
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let mut moved = 0;
        // Blocking reads on the far ends; the pump runs until the bytes arrived.
        while moved < 5 {
            moved += pump(&mut pair).0;
        }
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello", "bytes and the FIN reached the server");
        server.write_all(b"world").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut done = false;
        while !done {
            let (n, d) = pump(&mut pair);
            moved += n;
            done = d;
        }
        assert_eq!(moved, 10);
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"world");
    }

    /// Bytes waiting to be read on `s` (non-blocking peek; 0 when none).
    fn waiting(s: &std::net::TcpStream) -> usize {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0; 64];
        let n = match s.peek(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        };
        s.set_nonblocking(false).unwrap();
        n
    }

    #[test]
    fn an_event_pumps_only_the_directions_its_socket_serves() {
        let (mut client, a) = connected();
        let (mut server, b) = connected();
        let mut pair = Pair::new(a, b).unwrap();
        client.write_all(b"up").unwrap();
        server.write_all(b"down").unwrap();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        // A readable: A to B only, though B has bytes too.
        let mut moved = 0;
        while moved < 2 {
            assert!(std::time::Instant::now() < give_up, "the relay stalled");
            pair.note(End::A, &readable());
            moved += pair.pump_noted().0;
        }
        assert_eq!(moved, 2);
        let mut got = [0; 2];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"up");
        assert_eq!(waiting(&client), 0, "B's bytes moved on A's event");
        // A writable with B's pipe empty: nothing to move (B's readable event brings it).
        pair.note(End::A, &writable());
        assert_eq!(pair.pump_noted(), (0, false));
        assert_eq!(waiting(&client), 0);
        // Nothing noted: nothing moves.
        assert_eq!(pair.pump_noted(), (0, false));
        assert_eq!(waiting(&client), 0);
        moved = 0;
        while moved < 4 {
            assert!(std::time::Instant::now() < give_up, "the relay stalled");
            pair.note(End::B, &readable());
            moved += pair.pump_noted().0;
        }
        let mut got = [0; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"down");
    }

    #[test]
    fn a_writable_destination_drains_the_pipe_left_behind() {
        let (mut client, a) = connected();
        let (mut server, b) = connected();
        // Small buffers towards the server, which does not read yet: B fills up.
        socket2::SockRef::from(&b)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&server)
            .set_recv_buffer_size(4096)
            .unwrap();
        let mut pair = Pair::new(a, b).unwrap();
        client.set_nonblocking(true).unwrap();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let chunk = vec![0x5a; 64 << 10];
        let mut sent = 0;
        // A readable until A's pipe keeps bytes that B cannot take.
        while pair.a.pipe.len == 0 {
            assert!(std::time::Instant::now() < give_up, "B never filled up");
            match client.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            pair.note(End::A, &readable());
            let (_, done) = pair.pump_noted();
            assert!(!done);
        }
        let left = pair.a.pipe.len;
        // B readable (nothing to read there) or A writable move nothing of A's pipe.
        pair.note(End::B, &readable());
        pair.note(End::A, &writable());
        assert_eq!(pair.pump_noted(), (0, false));
        assert_eq!(pair.a.pipe.len, left);
        // The server reads; B's writable event alone drains what A's pipe kept.
        server.set_nonblocking(true).unwrap();
        let mut buf = vec![0; 64 << 10];
        let mut moved = 0;
        let mut received = 0;
        while moved == 0 {
            assert!(
                std::time::Instant::now() < give_up,
                "the pipe never drained"
            );
            match server.read(&mut buf) {
                Ok(n) => {
                    assert!(buf[..n].iter().all(|&x| x == 0x5a));
                    received += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            pair.note(End::B, &writable());
            moved += pair.pump_noted().0;
        }
        assert!(received <= sent);
    }

    /// The urgent mark stops `splice` (0 with the FIN behind it): the bytes after it, the
    /// urgent one inline, and the end of stream come through once the socket reported
    /// urgent data, and an event older than the mark and the FIN does not end the stream.
    #[test]
    fn urgent_data_passes_inline_and_an_early_event_ends_nothing() {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let (mut client, a) = connected();
        let (mut server, b) = connected();
        socket2::SockRef::from(&a)
            .set_out_of_band_inline(true)
            .unwrap();
        let mut pair = Pair::new(a, b).unwrap();
        client.write_all(b"12345").unwrap();
        assert_eq!(
            send(client.as_raw_fd(), b"!", MsgFlags::MSG_OOB).unwrap(),
            1
        );
        client.write_all(b"67890").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .unwrap();
        // On loopback the bytes and the FIN are queued on A when the calls return. An
        // event that reported neither (readable only): the bytes before the mark, and
        // the stream goes on.
        pair.note(End::A, &readable());
        assert_eq!(pair.pump_noted(), (5, false));
        let mut got = [0; 5];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"12345");
        server.set_nonblocking(true).unwrap();
        let peek = server.peek(&mut got).map_err(|e| e.kind());
        assert_eq!(peek, Err(io::ErrorKind::WouldBlock), "the stream goes on");
        server.set_nonblocking(false).unwrap();
        // Their own event: urgent data and the peer's end of stream.
        let ready = Ready {
            readable: true,
            hup: true,
            urgent: true,
            ..Ready::default()
        };
        pair.note(End::A, &ready);
        assert_eq!(pair.pump_noted(), (6, false));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"!67890", "the urgent byte inline, the rest, the end");
        assert!(pair.a.done());
    }
}
