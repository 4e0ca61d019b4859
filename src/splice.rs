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
//! Both sockets are watched under one token (the spliced flow's id,
//! [`crate::host::Sockets`]): any readiness of either pumps both directions
//! ([`Pair::pump`]), which costs a `splice` returning `EAGAIN` per idle direction.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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
}

impl Side {
    fn new(sock: TcpStream) -> io::Result<Side> {
        let _ = sock.set_nodelay(true);
        Ok(Side {
            sock,
            pipe: Pipe::new()?,
            eof: false,
            shut: false,
        })
    }

    fn done(&self) -> bool {
        self.eof && self.pipe.len == 0
    }
}

/// Two stream sockets relayed to each other; see the module's header.
pub struct Pair {
    a: Side,
    b: Side,
}

impl Pair {
    /// Relays `a` and `b` (Nagle off on both).
    ///
    /// # Errors
    /// When the pipes cannot be made (`EMFILE`...).
    pub fn new(a: TcpStream, b: TcpStream) -> io::Result<Pair> {
        Ok(Pair {
            a: Side::new(a)?,
            b: Side::new(b)?,
        })
    }

    /// The two sockets, to register or deregister.
    pub fn sockets(&mut self) -> [&mut TcpStream; 2] {
        [&mut self.a.sock, &mut self.b.sock]
    }

    /// Moves what either side has (and what waits in the pipes) to the other. Returns the
    /// bytes written to either side, and whether the pair is over (both ends done, or an
    /// error).
    pub fn pump(&mut self) -> (usize, bool) {
        let mut moved = 0;
        let r = pump_one(&mut self.a, &mut self.b, &mut moved)
            .and_then(|()| pump_one(&mut self.b, &mut self.a, &mut moved));
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
        // The pipe is empty: EAGAIN can only mean that the socket is.
        match splice(src.sock.as_fd(), src.pipe.w.as_fd(), src.pipe.cap)? {
            Some(0) => src.eof = true,
            Some(n) => src.pipe.len += n,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

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
}
