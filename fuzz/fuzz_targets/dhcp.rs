//! `DhcpServer::handle` on arbitrary messages: never a panic, never a reply longer than
//! its buffer. Input: messages, each prefixed by its length (2 bytes, little endian),
//! handled by one server in turn (leases carry over), a few seconds apart.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use forwarder::dhcp::{DhcpConfig, DhcpServer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut server = DhcpServer::new(DhcpConfig {
        server: Ipv4Addr::new(10, 0, 2, 2),
        prefix_len: 24,
        router: Ipv4Addr::new(10, 0, 2, 2),
        dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
        pool_start: Ipv4Addr::new(10, 0, 2, 15),
        pool_len: 16,
        lease: Duration::from_secs(60),
    });
    // A reply must fit what is left of a 1500-byte packet after IPv4 and UDP headers.
    let mut out = vec![0u8; 1500 - 28];
    let mut now = Instant::now();
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let (msg, next) = tail.split_at(len);
        if let Ok(reply) = server.handle(now, msg, &mut out) {
            assert!(reply.len <= out.len());
        }
        now += Duration::from_secs(u64::from(*a & 0x3f));
        rest = next;
    }
});
