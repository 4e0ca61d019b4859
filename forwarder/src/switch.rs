//! The switch: members' TAPs and the gateway on one Ethernet segment.
//!
//! # Theory of operation
//!
//! A network is one Ethernet segment. Each member namespace is attached by one TAP, a
//! *port* of this switch; the gateway (the virtual router with its services and the NAT,
//! [`crate::gateway`], [`crate::flow`]) is one more, internal port that owns the MAC
//! address of every virtual address. A single-namespace usernet (slirp4netns attach,
//! `usernet run`) is a network of one port: the same path, nothing bypasses the switch.
//!
//! [`Switch::handle_frame`] takes a frame read from a port and decides where it goes
//! ([`Verdict`]); [`Switch::route`] does the same for a frame the gateway built. The
//! frame is never rewritten: a TCP super-frame (GSO) read from one TAP with its vnet
//! header is written to the other TAP as it is, so member-to-member bulk traffic costs
//! one read and one write, no segmentation and no checksum.
//!
//! - **Learning with ageing.** A port has one MAC address, its member's: configured when
//!   the port is attached (then fixed), or learned from its frames (a member that changes
//!   its address moves its entry). A learned address ages out after [`AGEING`] without a
//!   frame from it: frames to it are flooded, and another port may take it.
//! - **Flooding.** Broadcast, multicast (so ARP and IPv6 neighbour discovery work between
//!   members) and unicast to an unknown or aged address go to every other port, the
//!   gateway included (it drops what is not its own and counts it).
//! - **Bounded queues.** A frame that a member's TAP cannot take now waits in that port's
//!   queue of [`QUEUE_SLOTS`] frames; when the queue is full the frame is dropped and
//!   counted, as a switch does: a slow member never stalls the others. Frames of the
//!   gateway to a member are the exception: the gateway stops and retries when the TAP
//!   would block (its flows keep their data, and smoltcp's loss recovery is slow), which
//!   `tun` writes practically never do.
//!
//! Security: every byte of a member's frame is the member's. A frame whose source address
//! is not the port's own (another live member's MAC, the gateway's, a multicast address,
//! anything but the configured one) is dropped and counted ([`PortCounters::drop_spoofed`]), so a member cannot steal another
//! member's or the gateway's traffic at L2; the gateway checks the IP addresses above.
//! A member with assigned addresses is also held to them in what it claims: its ARP
//! sender address, its IP sources, and the target of its IPv6 neighbour advertisements
//! (its own address, the one SLAAC makes of its MAC, or a link-local address that is
//! neither the router's nor the one another port's MAC makes); anything else is spoofed,
//! so a member cannot take the gateway's or another member's IPv6 address in their
//! neighbours' caches. Nor can a member be the others' router: what only a router sends
//! (IPv6 router advertisements and redirects, ICMP redirects, DHCP server replies from UDP
//! port 67) from a member with assigned addresses is dropped at its port and counted
//! ([`PortCounters::drop_rogue_router`], [`Verdict::Rogue`]).
//! Tables are bounded: one address per port, at most [`MAX_PORTS`] ports. Nothing here
//! allocates per frame (a port's queue is allocated when it is attached; untouched pages
//! cost no memory).

use std::collections::HashMap;
use std::io;

use slab::Slab;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, Ipv4Address, Ipv6Address};
use stack::l2::ETHERNET_HEADER_LEN;

use crate::nat::ROUTER_LINK_LOCAL;
use stack::txq::TxQueue;

/// A port of the switch: one member's TAP.
pub type PortId = usize;

/// A learned address is forgotten after this long without a frame from it (the usual
/// bridge default).
pub const AGEING: Duration = Duration::from_secs(300);

/// Frames a port keeps while its TAP cannot take them.
pub const QUEUE_SLOTS: usize = 64;

/// Ports of one switch.
pub const MAX_PORTS: usize = 1024;

/// Where frames for the members go: their TAPs in production, memory in tests.
pub trait FrameSink {
    /// Writes one frame (vnet header included) to `port`'s TAP.
    ///
    /// # Errors
    /// `WouldBlock` when the device cannot take it now; other errors drop the frame.
    fn send_frame(&mut self, port: PortId, frame: &[u8]) -> io::Result<()>;
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// To the gateway only.
    Gateway,
    /// To one member port.
    Port(PortId),
    /// To every port but the one it came from; to the gateway too when `gateway`.
    Flood {
        /// Whether the gateway gets a copy.
        gateway: bool,
    },
    /// Dropped (and counted on the port it came from).
    Drop,
    /// Dropped: a message only the network's router sends (router advertisement,
    /// redirect, DHCP server reply), from a member (counted on its port).
    Rogue,
}

/// Errors of attaching a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SwitchError {
    /// [`MAX_PORTS`] ports are attached.
    #[error("the switch has no free port ({MAX_PORTS} attached)")]
    Full,
    /// The address is the gateway's or another port's.
    #[error("MAC address {0} is in use on this network")]
    MacInUse(EthernetAddress),
    /// The address is not a unicast address.
    #[error("MAC address {0} is not a unicast address")]
    MacInvalid(EthernetAddress),
}

counters! {
    /// Counters of one port, exposed per member by the control API.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct PortCounters {
        /// Frames read from the member.
        rx_frames,
        /// Bytes read from the member.
        rx_bytes,
        /// Frames written to the member.
        tx_frames,
        /// Bytes written to the member.
        tx_bytes,
        /// Frames from the member whose source MAC is not the port's (spoofing).
        drop_spoofed,
        /// Frames from the member too short for an Ethernet header.
        drop_malformed,
        /// Frames for the member dropped because its queue was full.
        drop_queue_full,
        /// Frames the member's TAP refused (lost).
        tx_errors,
        /// Frames from the member flooded (broadcast, multicast, unknown unicast).
        flooded,
        /// Frames from the member that only the network's router sends (IPv6 router
        /// advertisements and redirects, ICMP redirects, DHCP server replies), dropped: a
        /// member cannot become the others' router or DHCP server.
        drop_rogue_router,
    }
}

/// Whether the IPv6 address `a` (16 bytes) is link-local (`fe80::/10`).
fn is_link_local(a: &[u8]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// Whether the interface identifier of the IPv6 address `a` (16 bytes) is the modified
/// EUI-64 that SLAAC derives from `mac`.
fn is_eui64_of(a: &[u8], mac: EthernetAddress) -> bool {
    let m = mac.as_bytes();
    a[8..] == [m[0] ^ 2, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]
}

/// The ICMPv6 message of an IPv6 frame (`eth` from its Ethernet header on): its type and
/// the offset of its ICMPv6 header, `None` for any other frame. Hop-by-hop, routing and
/// destination options headers before the ICMPv6 one are walked, each at least 8 bytes
/// long, so the walk ends within the frame (a fragment is no neighbour discovery message:
/// receivers ignore fragmented ones, RFC 6980).
fn icmpv6_message(eth: &[u8]) -> Option<(u8, usize)> {
    if eth.get(12..14)? != [0x86, 0xdd] {
        return None;
    }
    let mut next = *eth.get(20)?;
    let mut at = ETHERNET_HEADER_LEN + 40;
    loop {
        match next {
            58 => return Some((*eth.get(at)?, at)),
            0 | 43 | 60 => {
                next = *eth.get(at)?;
                at += (usize::from(*eth.get(at + 1)?) + 1) * 8;
            }
            _ => return None,
        }
    }
}

/// The target address of an IPv6 neighbour advertisement (`eth` from its Ethernet
/// header on), `None` for any other frame.
fn advert_target(eth: &[u8]) -> Option<[u8; 16]> {
    // ICMPv6, type 136: neighbour advertisement; the target follows 8 bytes on.
    match icmpv6_message(eth)? {
        (136, at) => eth.get(at + 8..at + 24)?.try_into().ok(),
        _ => None,
    }
}

/// Whether a frame (`eth` from its Ethernet header on) is a message only the network's
/// router sends: an IPv6 router advertisement (ICMPv6 134) or redirect (137), an ICMP
/// redirect (type 5), or a DHCP server's reply (UDP from port 67). IPv4 fragments but the
/// first carry no transport header and pass.
fn router_message(eth: &[u8]) -> bool {
    match eth.get(12..14) {
        Some([0x86, 0xdd]) => matches!(icmpv6_message(eth), Some((134 | 137, _))),
        Some([0x08, 0x00]) => {
            let Some(ip) = eth.get(ETHERNET_HEADER_LEN..) else {
                return false;
            };
            let (Some(&vihl), Some(frag), Some(&proto)) = (ip.first(), ip.get(6..8), ip.get(9))
            else {
                return false;
            };
            if u16::from_be_bytes([frag[0], frag[1]]) & 0x1fff != 0 {
                return false;
            }
            let l4 = usize::from(vihl & 0x0f) * 4;
            match proto {
                1 => ip.get(l4) == Some(&5),
                17 => ip.get(l4..l4 + 2) == Some(&[0, 67]),
                _ => false,
            }
        }
        _ => false,
    }
}

/// One member port.
#[derive(Debug)]
struct Port {
    /// The member's address: configured, or learned (and then aged).
    mac: Option<EthernetAddress>,
    /// Configured: never aged, never relearned.
    fixed: bool,
    /// The last frame from `mac`.
    seen: Instant,
    /// The member's addresses, when the network assigned them: its ARP, IPv4 and IPv6
    /// must come from these (or unspecified, or IPv6 link-local).
    v4: Option<Ipv4Address>,
    v6: Option<Ipv6Address>,
    /// Frames waiting for the TAP.
    queue: TxQueue,
    counters: PortCounters,
}

impl Port {
    fn alive(&self, now: Instant) -> bool {
        self.fixed || now < self.seen + AGEING
    }

    fn send(&mut self, id: PortId, frame: &[u8], sink: &mut dyn FrameSink) {
        if self.queue.is_empty() {
            match sink.send_frame(id, frame) {
                Ok(()) => {
                    self.counters.tx_frames += 1;
                    self.counters.tx_bytes += frame.len() as u64;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.counters.tx_errors += 1;
                    return;
                }
            }
        }
        match self.queue.slot() {
            Some(slot) if frame.len() <= slot.len() => {
                slot[..frame.len()].copy_from_slice(frame);
                self.queue.commit(frame.len());
            }
            _ => self.counters.drop_queue_full += 1,
        }
    }
}

/// The switch: ports, the address table, per-port queues and counters.
#[derive(Debug)]
pub struct Switch {
    gateway_mac: EthernetAddress,
    vnet_hdr_len: usize,
    ports: Slab<Port>,
    /// Address -> port: one entry per port at most.
    fdb: HashMap<EthernetAddress, PortId>,
    /// The time of the latest frame or turn, for [`route`](Self::route).
    now: Instant,
}

impl Switch {
    /// A switch without ports; `gateway_mac` is the internal port's address, and every
    /// frame starts with a vnet header of `vnet_hdr_len` bytes (0 or
    /// [`stack::vnet::HEADER_LEN`], the same on every TAP).
    pub fn new(gateway_mac: EthernetAddress, vnet_hdr_len: usize) -> Switch {
        Switch {
            gateway_mac,
            vnet_hdr_len,
            ports: Slab::new(),
            fdb: HashMap::new(),
            now: Instant::from_millis(0),
        }
    }

    /// Sets the time [`route`](Self::route) ages addresses by.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The time of the latest frame or turn.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Attaches a member port. `mac`: the member's address when it is known (then fixed:
    /// frames from any other are spoofed), else learned from the member's first frame.
    ///
    /// # Errors
    /// [`SwitchError`] when the switch is full or `mac` cannot be this port's.
    pub fn attach(
        &mut self,
        now: Instant,
        mac: Option<EthernetAddress>,
    ) -> Result<PortId, SwitchError> {
        if self.ports.len() >= MAX_PORTS {
            return Err(SwitchError::Full);
        }
        if let Some(mac) = mac {
            if !mac.is_unicast() {
                return Err(SwitchError::MacInvalid(mac));
            }
            if mac == self.gateway_mac || self.owner(now, mac).is_some() {
                return Err(SwitchError::MacInUse(mac));
            }
        }
        let slot = self.vnet_hdr_len + ETHERNET_HEADER_LEN + 65536;
        let id = self.ports.insert(Port {
            mac,
            fixed: mac.is_some(),
            seen: now,
            v4: None,
            v6: None,
            queue: TxQueue::new(QUEUE_SLOTS, slot),
            counters: PortCounters::default(),
        });
        if let Some(mac) = mac {
            self.fdb.insert(mac, id);
        }
        Ok(id)
    }

    /// Detaches a port: its address is forgotten, its queue dropped.
    pub fn detach(&mut self, port: PortId) {
        if let Some(p) = self.ports.try_remove(port) {
            if let Some(mac) = p.mac {
                if self.fdb.get(&mac) == Some(&port) {
                    self.fdb.remove(&mac);
                }
            }
        }
    }

    /// Pins `port` to its assigned addresses: ARP, IPv4 and IPv6 from any other source
    /// address (but unspecified ones, IPv6 link-local ones and the IPv6 address SLAAC
    /// derives from the port's MAC) are dropped as spoofed.
    pub fn set_addresses(
        &mut self,
        port: PortId,
        v4: Option<Ipv4Address>,
        v6: Option<Ipv6Address>,
    ) {
        if let Some(p) = self.ports.get_mut(port) {
            p.v4 = v4;
            p.v6 = v6;
        }
    }

    /// Whether a frame's IP-level source is one `p` may use.
    fn source_allowed(p: &Port, eth: &[u8]) -> bool {
        if p.v4.is_none() && p.v6.is_none() {
            return true;
        }
        let v4_ok = |a: &[u8]| a == [0, 0, 0, 0] || p.v4.is_some_and(|v4| v4.octets() == a);
        match eth.get(12..14) {
            // ARP: the sender protocol address.
            Some([0x08, 0x06]) => eth.get(28..32).is_some_and(v4_ok),
            Some([0x08, 0x00]) => eth.get(26..30).is_some_and(v4_ok),
            // IPv6: also the address SLAAC makes of the port's MAC (EUI-64), in any prefix.
            Some([0x86, 0xdd]) => eth.get(22..38).is_some_and(|a| {
                a.iter().all(|&b| b == 0)
                    || is_link_local(a)
                    || p.v6.is_some_and(|v6| v6.octets() == a)
                    || p.mac.is_some_and(|m| is_eui64_of(a, m))
            }),
            _ => true,
        }
    }

    /// Whether a frame from `port` that is an IPv6 neighbour advertisement names a target
    /// address the port may claim (see the module header); other frames pass.
    fn advert_allowed(&self, port: PortId, eth: &[u8]) -> bool {
        let Some(p) = self.ports.get(port) else {
            return false;
        };
        if p.v4.is_none() && p.v6.is_none() {
            return true;
        }
        let Some(t) = advert_target(eth) else {
            return true;
        };
        let eui64 = |m: EthernetAddress| is_eui64_of(&t, m);
        if p.v6.is_some_and(|v6| v6.octets() == t) || p.mac.is_some_and(eui64) {
            return true;
        }
        is_link_local(&t)
            && t != ROUTER_LINK_LOCAL.octets()
            && !eui64(self.gateway_mac)
            && !self
                .ports
                .iter()
                .any(|(id, o)| id != port && o.mac.is_some_and(eui64))
    }

    /// The attached ports.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().map(|(id, _)| id)
    }

    /// Number of attached ports.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether no port is attached.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// A port's member address (configured or learned).
    pub fn mac(&self, port: PortId) -> Option<EthernetAddress> {
        self.ports.get(port).and_then(|p| p.mac)
    }

    /// A port's counters.
    pub fn counters(&self, port: PortId) -> Option<&PortCounters> {
        self.ports.get(port).map(|p| &p.counters)
    }

    /// The live port that owns `mac`.
    fn owner(&self, now: Instant, mac: EthernetAddress) -> Option<PortId> {
        let &id = self.fdb.get(&mac)?;
        let p = self.ports.get(id)?;
        (p.mac == Some(mac) && p.alive(now)).then_some(id)
    }

    /// Source and destination addresses of a frame, `None` when it is too short.
    fn addresses(&self, frame: &[u8]) -> Option<(EthernetAddress, EthernetAddress)> {
        let eth = frame.get(self.vnet_hdr_len..self.vnet_hdr_len + ETHERNET_HEADER_LEN)?;
        Some((
            EthernetAddress::from_bytes(&eth[6..12]),
            EthernetAddress::from_bytes(&eth[..6]),
        ))
    }

    /// Takes one frame read from `port` (vnet header included): checks its source,
    /// learns it, and says where the frame goes.
    pub fn handle_frame(&mut self, now: Instant, port: PortId, frame: &[u8]) -> Verdict {
        self.now = now;
        let Some((src, dst)) = self.addresses(frame) else {
            if let Some(p) = self.ports.get_mut(port) {
                p.counters.drop_malformed += 1;
            }
            return Verdict::Drop;
        };
        // Whose address it is matters only for a source the port has not learned: most
        // frames come from their port's own address and skip the table's lookup.
        let learned = self.ports.get(port).is_some_and(|p| p.mac == Some(src));
        let owner = if learned {
            Some(port)
        } else {
            self.owner(now, src)
        };
        let Some(p) = self.ports.get_mut(port) else {
            return Verdict::Drop;
        };
        p.counters.rx_frames += 1;
        p.counters.rx_bytes += frame.len() as u64;
        if p.mac == Some(src) {
            p.seen = now;
        } else if !src.is_unicast()
            || src == self.gateway_mac
            || p.fixed
            || owner.is_some_and(|o| o != port)
        {
            p.counters.drop_spoofed += 1;
            return Verdict::Drop;
        } else {
            // A new member address: its first frame, or it changed its address.
            if let Some(old) = p.mac.replace(src) {
                self.fdb.remove(&old);
            }
            p.seen = now;
            self.fdb.insert(src, port);
        }
        let eth = &frame[self.vnet_hdr_len..];
        if !Self::source_allowed(p, eth) || !self.advert_allowed(port, eth) {
            if let Some(p) = self.ports.get_mut(port) {
                p.counters.drop_spoofed += 1;
            }
            return Verdict::Drop;
        }
        if let Some(p) = self.ports.get_mut(port) {
            // A network's member (assigned addresses); a lone guest has nobody to fool.
            if (p.v4.is_some() || p.v6.is_some()) && router_message(eth) {
                p.counters.drop_rogue_router += 1;
                return Verdict::Rogue;
            }
        }
        if dst == self.gateway_mac {
            return Verdict::Gateway;
        }
        let to = if dst.is_unicast() {
            self.owner(now, dst)
        } else {
            None
        };
        match to {
            Some(to) if to == port => {
                // A frame back to where it came from: a switch drops it.
                Verdict::Drop
            }
            Some(to) => Verdict::Port(to),
            None => {
                if let Some(p) = self.ports.get_mut(port) {
                    p.counters.flooded += 1;
                }
                Verdict::Flood { gateway: true }
            }
        }
    }

    /// Where a frame built by the gateway goes: the member that owns its destination,
    /// or every member (broadcast, multicast, unknown).
    pub fn route(&self, frame: &[u8]) -> Verdict {
        let now = self.now;
        let Some((_, dst)) = self.addresses(frame) else {
            return Verdict::Drop;
        };
        if dst.is_unicast() {
            if let Some(to) = self.owner(now, dst) {
                return Verdict::Port(to);
            }
        }
        Verdict::Flood { gateway: false }
    }

    /// Writes `frame` to `port`, or queues it when the TAP would block (or frames are
    /// already waiting: order is kept); dropped and counted when the queue is full.
    pub fn send(&mut self, port: PortId, frame: &[u8], sink: &mut dyn FrameSink) {
        if let Some(p) = self.ports.get_mut(port) {
            p.send(port, frame, sink);
        }
    }

    /// Writes `frame` to every port but `from`.
    pub fn flood(&mut self, from: Option<PortId>, frame: &[u8], sink: &mut dyn FrameSink) {
        for (id, p) in self.ports.iter_mut() {
            if Some(id) != from {
                p.send(id, frame, sink);
            }
        }
    }

    /// Writes `frame` from the gateway to `port` now. `WouldBlock` is returned, not
    /// queued: the gateway keeps the frame and retries.
    ///
    /// # Errors
    /// `WouldBlock` when the TAP cannot take it now (frames wait in the port's queue).
    pub fn send_from_gateway(
        &mut self,
        port: PortId,
        frame: &[u8],
        sink: &mut dyn FrameSink,
    ) -> io::Result<()> {
        let Some(p) = self.ports.get_mut(port) else {
            return Ok(());
        };
        if !p.queue.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let res = sink.send_frame(port, frame);
        match &res {
            Ok(()) => {
                p.counters.tx_frames += 1;
                p.counters.tx_bytes += frame.len() as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => p.counters.tx_errors += 1,
        }
        res
    }

    /// Writes the frames waiting in every port's queue, as far as the TAPs take them.
    /// Returns false when some port still has frames waiting.
    pub fn flush(&mut self, sink: &mut dyn FrameSink) -> bool {
        let mut done = true;
        for (id, p) in self.ports.iter_mut() {
            while let Some(frame) = p.queue.front() {
                match sink.send_frame(id, frame) {
                    Ok(()) => {
                        p.counters.tx_frames += 1;
                        p.counters.tx_bytes += frame.len() as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        done = false;
                        break;
                    }
                    Err(_) => p.counters.tx_errors += 1,
                }
                p.queue.pop();
            }
        }
        done
    }

    /// Whether frames wait in some port's queue.
    pub fn has_queued(&self) -> bool {
        self.ports.iter().any(|(_, p)| !p.queue.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_explain_themselves() {
        for (name, _) in PortCounters::default().iter() {
            let why = PortCounters::explain(name).unwrap_or_default();
            assert!(why.ends_with('.') && why.len() > 10, "{name}: {why:?}");
        }
        for (name, _) in crate::Counters::default().iter() {
            let why = crate::Counters::explain(name).unwrap_or_default();
            assert!(why.ends_with('.') && why.len() > 10, "{name}: {why:?}");
        }
        assert_eq!(PortCounters::explain("no_such_counter"), None);
    }

    const GW: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
    const A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xa]);
    const B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xb]);
    const C: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 0xc]);

    fn frame(src: EthernetAddress, dst: EthernetAddress) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[..6].copy_from_slice(dst.as_bytes());
        f[6..12].copy_from_slice(src.as_bytes());
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    #[derive(Default)]
    struct Sink {
        sent: Vec<(PortId, usize)>,
        blocked: Option<PortId>,
    }

    impl FrameSink for Sink {
        fn send_frame(&mut self, port: PortId, frame: &[u8]) -> io::Result<()> {
            if self.blocked == Some(port) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.sent.push((port, frame.len()));
            Ok(())
        }
    }

    fn three() -> (Switch, [PortId; 3]) {
        let mut sw = Switch::new(GW, 0);
        let t = Instant::from_secs(1);
        let a = sw.attach(t, None).unwrap();
        let b = sw.attach(t, None).unwrap();
        let c = sw.attach(t, Some(C)).unwrap();
        (sw, [a, b, c])
    }

    #[test]
    fn learned_addresses_are_switched_unknown_ones_flooded() {
        let (mut sw, [a, b, c]) = three();
        let t = Instant::from_secs(2);
        // B is unknown yet: flooded.
        assert_eq!(
            sw.handle_frame(t, a, &frame(A, B)),
            Verdict::Flood { gateway: true }
        );
        assert_eq!(sw.handle_frame(t, b, &frame(B, A)), Verdict::Port(a));
        assert_eq!(sw.handle_frame(t, a, &frame(A, B)), Verdict::Port(b));
        assert_eq!(sw.handle_frame(t, a, &frame(A, C)), Verdict::Port(c));
        assert_eq!(sw.handle_frame(t, c, &frame(C, GW)), Verdict::Gateway);
        let bcast = EthernetAddress::BROADCAST;
        assert_eq!(
            sw.handle_frame(t, c, &frame(C, bcast)),
            Verdict::Flood { gateway: true }
        );
        let mcast = EthernetAddress([0x33, 0x33, 0xff, 0, 0, 1]);
        assert_eq!(
            sw.handle_frame(t, b, &frame(B, mcast)),
            Verdict::Flood { gateway: true }
        );
        sw.set_now(t);
        assert_eq!(sw.route(&frame(GW, A)), Verdict::Port(a));
        sw.set_now(t);
        assert_eq!(
            sw.route(&frame(GW, bcast)),
            Verdict::Flood { gateway: false }
        );
    }

    #[test]
    fn foreign_source_addresses_are_dropped_and_counted() {
        let (mut sw, [a, b, c]) = three();
        let t = Instant::from_secs(2);
        sw.handle_frame(t, a, &frame(A, GW));
        sw.handle_frame(t, b, &frame(B, GW));
        // B claims A's address, C's configured one, the gateway's, a multicast one.
        for src in [A, C, GW, EthernetAddress([0x33, 0x33, 0, 0, 0, 1])] {
            assert_eq!(sw.handle_frame(t, b, &frame(src, GW)), Verdict::Drop);
        }
        // C may not use another address than its configured one, even a fresh one.
        assert_eq!(
            sw.handle_frame(t, c, &frame(EthernetAddress([2, 9, 9, 9, 9, 9]), GW)),
            Verdict::Drop
        );
        assert_eq!(sw.counters(b).unwrap().drop_spoofed, 4);
        assert_eq!(sw.counters(c).unwrap().drop_spoofed, 1);
        // A's frames still reach A.
        assert_eq!(sw.handle_frame(t, b, &frame(B, A)), Verdict::Port(a));
        assert_eq!(sw.attach(t, Some(A)), Err(SwitchError::MacInUse(A)));
        assert_eq!(sw.attach(t, Some(GW)), Err(SwitchError::MacInUse(GW)));
    }

    #[test]
    fn learned_addresses_age_out() {
        let (mut sw, [a, b, _]) = three();
        let t = Instant::from_secs(2);
        sw.handle_frame(t, a, &frame(A, GW));
        let later = t + AGEING;
        sw.set_now(later);
        assert_eq!(sw.route(&frame(GW, A)), Verdict::Flood { gateway: false });
        // Aged: the port may learn a new address; the old one may move elsewhere.
        let a2 = EthernetAddress([2, 0, 0, 0, 0, 0xaa]);
        assert_eq!(sw.handle_frame(later, a, &frame(a2, GW)), Verdict::Gateway);
        assert_eq!(sw.handle_frame(later, b, &frame(A, GW)), Verdict::Gateway);
        sw.set_now(later);
        assert_eq!(sw.route(&frame(GW, A)), Verdict::Port(b));
        sw.set_now(later);
        assert_eq!(sw.route(&frame(GW, a2)), Verdict::Port(a));
    }

    #[test]
    fn blocked_port_queues_then_drops_without_stalling_others() {
        let (mut sw, [a, b, _]) = three();
        let mut sink = Sink {
            blocked: Some(b),
            ..Sink::default()
        };
        let f = frame(A, B);
        for _ in 0..QUEUE_SLOTS + 3 {
            sw.send(b, &f, &mut sink);
            sw.send(a, &f, &mut sink);
        }
        assert_eq!(sw.counters(b).unwrap().drop_queue_full, 3);
        assert_eq!(sw.counters(a).unwrap().tx_frames, QUEUE_SLOTS as u64 + 3);
        assert!(!sw.flush(&mut sink));
        sink.blocked = None;
        assert!(sw.flush(&mut sink));
        assert_eq!(sw.counters(b).unwrap().tx_frames, QUEUE_SLOTS as u64);
        assert!(!sw.has_queued());
    }

    #[test]
    fn truncated_frames_are_counted() {
        let (mut sw, [a, ..]) = three();
        assert_eq!(
            sw.handle_frame(Instant::from_secs(2), a, &[0u8; 13]),
            Verdict::Drop
        );
        assert_eq!(sw.counters(a).unwrap().drop_malformed, 1);
    }

    #[test]
    fn detached_port_forgets_its_address() {
        let (mut sw, [a, b, _]) = three();
        let t = Instant::from_secs(2);
        sw.handle_frame(t, a, &frame(A, GW));
        sw.detach(a);
        assert_eq!(
            sw.handle_frame(t, b, &frame(B, A)),
            Verdict::Flood { gateway: true }
        );
        assert_eq!(sw.len(), 2);
    }
}
