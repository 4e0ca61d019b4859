//! The forwarder driven over memory: guest frames built and checked with etherparse (an
//! implementation independent of smoltcp::wire), host sockets on this machine's loopback.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::Duration as StdDuration;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use forwarder::nat::{NatConfig, Network};
use forwarder::{Config, Forwarder, FrameSink, Io, Limits};
use mio::{Events, Poll};
use smoltcp::time::{Duration, Instant};

pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const GW_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];
pub const GUEST: [u8; 4] = [10, 0, 2, 100];
pub const GW: [u8; 4] = [10, 0, 2, 2];

#[derive(Default)]
pub struct Wire(pub Vec<Vec<u8>>);

impl FrameSink for Wire {
    fn send_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.push(frame.to_vec());
        Ok(())
    }
}

pub struct Sim {
    pub poll: Poll,
    pub events: Events,
    pub fwd: Forwarder,
    pub wire: Wire,
    pub start: std::time::Instant,
}

impl Sim {
    pub fn new(host_loopback: bool) -> Sim {
        let cfg = Config {
            nat: NatConfig {
                net: Network {
                    addr: Ipv4Addr::new(10, 0, 2, 0),
                    prefix_len: 24,
                },
                net6: None,
                host_loopback,
                nameservers: vec![],
            },
            dns_enabled: true,
            mtu: 1500,
            vnet_hdr_len: 0,
            offload: false,
            outbound_v4: None,
            outbound_v6: None,
            guest_v4: None,
            guest_v6: None,
            tcp_buffer: 64 * 1024,
            udp_idle: Duration::from_secs(60),
            limits: Limits::default(),
            seed: 1,
        };
        Sim {
            poll: Poll::new().unwrap(),
            events: Events::with_capacity(64),
            fwd: Forwarder::new(cfg, Instant::from_micros(0)),
            wire: Wire::default(),
            start: std::time::Instant::now(),
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as i64)
    }

    /// Feeds a guest frame and runs the forwarder's turn.
    pub fn send(&mut self, frame: &[u8]) {
        let now = self.now();
        let mut io = Io {
            registry: self.poll.registry(),
            tap: &mut self.wire,
        };
        self.fwd.handle_frame(now, frame, &mut io);
        self.fwd.poll_flows(now, &mut io);
        self.fwd.flush(&mut self.wire);
    }

    /// Runs event loop turns until `done` holds for a frame sent to the guest or the
    /// time runs out; returns that frame.
    pub fn run_until(&mut self, ms: u64, mut done: impl FnMut(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + StdDuration::from_millis(ms);
        loop {
            if let Some(i) = self.wire.0.iter().position(|f| done(f)) {
                return Some(self.wire.0.remove(i));
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            self.poll
                .poll(&mut self.events, Some(StdDuration::from_millis(5)))
                .unwrap();
            let now = self.now();
            let mut io = Io {
                registry: self.poll.registry(),
                tap: &mut self.wire,
            };
            for ev in self.events.iter() {
                let r = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let w = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                self.fwd.handle_ready(now, ev.token(), r, w, &mut io);
            }
            self.fwd.handle_timeouts(now, &mut io);
            self.fwd.poll_flows(now, &mut io);
            self.fwd.flush(&mut self.wire);
        }
    }
}

pub fn guest() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC).ipv4(GUEST, GW, 64)
}

pub fn tcp_of(frame: &[u8]) -> Option<(etherparse::TcpHeader, Vec<u8>, [u8; 4])> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        return None;
    };
    let Some(TransportSlice::Tcp(t)) = &p.transport else {
        return None;
    };
    Some((t.to_header(), t.payload().to_vec(), ip.header().source()))
}

pub fn tcp_frame(
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    build: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    data: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GUEST, dst, 64)
        .tcp(sport, dport, seq, 65535);
    let b = build(b);
    let mut out = Vec::new();
    b.write(&mut out, data).unwrap();
    out
}
