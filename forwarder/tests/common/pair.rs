//! A guest TCP/IP stack (smoltcp) wired to the forwarder, which is wired to the in-memory
//! host: quinn-proto's `Pair`, with a guest, a gateway and a host instead of two
//! endpoints. [`Pair::drive`] moves frames both ways and readiness in until nothing
//! moves, then jumps the fake clock to the next deadline of either side.
#![allow(dead_code)]

use std::collections::VecDeque;

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

use super::{finish_turn, Sim, GUEST, GUEST_MAC, GW};

/// The guest's link: frames from the forwarder wait in `rx`, frames for it in `tx`.
#[derive(Default)]
pub struct Link {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: Vec<Vec<u8>>,
}

pub struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct TxToken<'a>(&'a mut Vec<Vec<u8>>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push(frame);
        r
    }
}

impl Device for Link {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// A guest (smoltcp) behind the forwarder (in [`Sim`], over the in-memory host).
pub struct Pair {
    pub sim: Sim,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub link: Link,
    /// Frames the forwarder sent that were not Ethernet for the guest's stack (kept for
    /// tests that look for ICMP errors).
    pub seen: Vec<Vec<u8>>,
}

impl Pair {
    /// A guest at `10.0.2.100/24` with the gateway `10.0.2.2` as its default route.
    pub fn new(sim: Sim) -> Pair {
        let mut link = Link::default();
        let cfg = IfaceConfig::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let now = sim.now();
        let mut iface = Interface::new(cfg, &mut link, now);
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::from(GUEST)), 24))
                .unwrap();
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(GW))
            .unwrap();
        Pair {
            sim,
            iface,
            sockets: SocketSet::new(Vec::new()),
            link,
            seen: Vec::new(),
        }
    }

    /// A guest TCP socket connecting to `to` from `local_port`.
    pub fn connect(&mut self, to: ([u8; 4], u16), local_port: u16) -> SocketHandle {
        let rx = tcp::SocketBuffer::new(vec![0u8; 256 << 10]);
        let tx = tcp::SocketBuffer::new(vec![0u8; 256 << 10]);
        let h = self.sockets.add(tcp::Socket::new(rx, tx));
        let remote = (IpAddress::Ipv4(Ipv4Address::from(to.0)), to.1);
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(self.iface.context(), remote, local_port)
            .unwrap();
        h
    }

    /// A guest TCP socket listening on `port`.
    pub fn listen(&mut self, port: u16) -> SocketHandle {
        let rx = tcp::SocketBuffer::new(vec![0u8; 256 << 10]);
        let tx = tcp::SocketBuffer::new(vec![0u8; 256 << 10]);
        let h = self.sockets.add(tcp::Socket::new(rx, tx));
        self.sockets.get_mut::<tcp::Socket>(h).listen(port).unwrap();
        h
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Moves everything that can move at the current time: guest frames to the
    /// forwarder, its frames to the guest, host readiness in. Returns whether anything
    /// moved.
    pub fn step(&mut self) -> bool {
        let now = self.sim.now();
        let mut moved = false;
        self.iface.poll(now, &mut self.link, &mut self.sockets);
        for mut frame in std::mem::take(&mut self.link.tx) {
            moved = true;
            let mut io = forwarder::Io {
                host: &mut self.sim.host,
                tap: &mut self.sim.wire,
            };
            self.sim.fwd.handle_frame(now, &mut frame, &mut io);
        }
        moved |= !self.sim.host.events.is_empty();
        finish_turn(
            &mut self.sim.fwd,
            &mut self.sim.host,
            now,
            &mut self.sim.wire,
        );
        for frame in self.sim.wire.0.drain(..) {
            moved = true;
            self.seen.push(frame.clone());
            self.link.rx.push_back(frame);
        }
        moved
    }

    /// Runs until nothing moves and no deadline falls within `ms` of fake time.
    pub fn drive(&mut self, ms: u64) {
        let end = self.sim.micros + ms as i64 * 1000;
        loop {
            let mut spins = 0;
            while self.step() {
                spins += 1;
                assert!(spins < 100_000, "the pair never settles");
            }
            let now = self.sim.now();
            let next = [
                self.iface.poll_at(now, &self.sockets),
                self.sim.fwd.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|at| at.total_micros() <= end) else {
                self.sim.micros = end.max(self.sim.micros);
                self.step();
                return;
            };
            self.sim.micros = next.total_micros().max(self.sim.micros + 1);
        }
    }
}
