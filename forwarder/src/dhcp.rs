//! A sans-IO DHCPv4 server for the guest's link.
//!
//! # Theory of operation
//!
//! Goals: containers and VMs that configure themselves with `udhcpc`, `dhclient`,
//! systemd-networkd or NetworkManager instead of slirp4netns `-c` get the same configuration
//! that `-c` would give: an address from the pool (`net+15` to `net+30` by default), the subnet
//! mask, the gateway as router and, unless `--disable-dns`, the DNS forwarder. The server
//! follows RFC 2131 as those clients exercise it:
//!
//! - DISCOVER -> OFFER of the address the client already holds or held (the table remembers
//!   the last hardware address of every slot), else the requested address if it is free, else
//!   the first never-used address, else the first expired one. The offered address is held for
//!   [`OFFER_HOLD`] so that two clients discovering at once get different offers.
//! - REQUEST -> ACK when the address (the requested-address option, else `ciaddr`) is in the
//!   pool and free or held by that client, else NAK. A REQUEST naming another server identifier
//!   (the client chose another server) frees our offer and is dropped as
//!   [`DhcpDrop::NotForUs`].
//! - RELEASE frees the address, DECLINE takes it out of use for one lease time, INFORM gets an
//!   ACK without `yiaddr` and without lease times.
//!
//! The server is a pure state machine: [`DhcpServer::handle`] takes the UDP payload of a
//! datagram the guest sent to port 67 and the current monotonic time, and writes at most one
//! reply into a caller-provided buffer. It never touches a socket or the clock, and it has no
//! timers: leases expire lazily, when a later call looks at them with a later `now`.
//!
//! Static reservations ([`DhcpServer::reserve`]): on a network, every member's address is
//! assigned when it joins, and a member that runs a DHCP client anyway is offered (and
//! acknowledged) exactly that address, which is never offered to another client; with
//! [`DhcpServer::set_reserved_only`] a client without a reservation gets no address at
//! all (a network's members all have one), so the pool never hands out an address that a
//! member was assigned or asked for (`--ip`).
//!
//! Limits: clients are told apart by `chaddr` (their MAC address); the client-identifier
//! option is echoed (RFC 6842) but not used as a key. There is no relay support (a request with
//! a non-zero `giaddr` is ignored: nothing relays on a point-to-point TAP link), no BOOTP
//! without option 53, no option overload (options in `sname`/`file`). The lease table lives
//! in memory only and is lost on restart, which is what a guest that lives as long as this
//! process sees anyway.
//!
//! Security: every byte of the input is guest-controlled. Parsing checks the length before
//! any field access (through [`DhcpPacket::new_checked`]) and walks options with bounds checks,
//! so truncated packets, huge option lengths and garbage are dropped as
//! [`DhcpDrop::Malformed`], never a panic. Memory is bounded: the lease table has one slot per
//! pool address, allocated once in [`DhcpServer::new`], and handling a packet allocates
//! nothing. A guest can exhaust the pool by inventing MAC addresses; it only denies addresses
//! to itself, since the link belongs to one guest. Replies never exceed the output buffer nor
//! the client's maximum message size.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    DhcpFlags, DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress,
};

/// How long an OFFER reserves its address for the client it was made to.
///
/// Clients send their REQUEST within a second or two; a minute covers slow ones and
/// retransmissions, and an expired offer is free again for anyone.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);

/// Offset of the options in a DHCP message: after the fixed BOOTP header and the magic cookie.
const OPTIONS_OFFSET: usize = 240;
/// The DHCP magic cookie (RFC 2131 section 3).
const MAGIC_COOKIE: u32 = 0x6382_5363;
/// BOOTP `op` of a client message.
const OP_BOOTREQUEST: u8 = 1;
/// BOOTP `op` of a server message.
const OP_BOOTREPLY: u8 = 2;
/// `htype` of Ethernet.
const HTYPE_ETHERNET: u8 = 1;
/// `hlen` of Ethernet.
const HLEN_ETHERNET: u8 = 6;
/// Replies are zero-padded to this length (RFC 1542 section 2.1: some BOOTP relays and
/// clients drop shorter messages).
const MIN_BOOTP_LEN: usize = 300;
/// The smallest maximum message size a client may announce (RFC 2132 section 9.10), and the
/// size every client must accept when it announces none (RFC 2131 section 2). It counts the
/// IPv4 and UDP headers.
const MIN_MAX_MESSAGE_SIZE: usize = 576;
/// IPv4 (without options) and UDP headers, subtracted from the maximum message size.
const IP_UDP_HEADER_LEN: usize = 28;
/// The "infinite" lease time (RFC 2131 section 3.3).
const INFINITE_LEASE: u32 = u32::MAX;

/// DHCP option codes used here (RFC 2132).
mod opt {
    pub const PAD: u8 = 0;
    pub const DOMAIN_NAME_SERVER: u8 = 6;
    pub const REQUESTED_IP: u8 = 50;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_IDENTIFIER: u8 = 54;
    pub const MAX_MESSAGE_SIZE: u8 = 57;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_IDENTIFIER: u8 = 61;
    pub const END: u8 = 255;
}

/// What the server hands out. Built once from the command line (`--cidr`, `--disable-dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The gateway address (`net+2`): the server identifier, and the source of replies.
    pub server: Ipv4Addr,
    /// Prefix length of the guest network (`--cidr`), sent as the subnet mask.
    pub prefix_len: u8,
    /// The default router sent to clients, normally the gateway.
    pub router: Ipv4Addr,
    /// The DNS server sent to clients (`net+3`), or `None` with `--disable-dns`.
    pub dns: Option<Ipv4Addr>,
    /// First address of the pool (`net+15`).
    pub pool_start: Ipv4Addr,
    /// Number of addresses in the pool (16). Addresses of the pool that are the server, the
    /// router, the DNS server, the network or broadcast address, or outside the subnet are
    /// never handed out.
    pub pool_len: u8,
    /// Lease time (24 h). Times of `u32::MAX` seconds or more are sent as infinite.
    pub lease: Duration,
}

/// A reply written by [`DhcpServer::handle`], and where to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpReply {
    /// Bytes of UDP payload written at the start of the output buffer.
    pub len: usize,
    /// Destination IPv4 address: `255.255.255.255` for a NAK, or when the client set the
    /// broadcast flag or has no address yet (`ciaddr` is zero); else the client's `ciaddr`.
    ///
    /// RFC 2131 section 4.1 allows a unicast to `yiaddr` for a client without an address, but
    /// only packet sockets see such a datagram; a broadcast reaches plain UDP sockets too, and
    /// libslirp replies the same way.
    pub dst_ip: Ipv4Addr,
    /// Destination MAC address: the client's `chaddr`.
    pub dst_mac: EthernetAddress,
}

/// Why [`DhcpServer::handle`] wrote no reply. The caller counts these per reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpDrop {
    /// Not a DHCP client message we can read: too short, bad magic cookie, unknown `op`,
    /// hardware other than Ethernet, no message type, a broadcast or zero `chaddr`, or a
    /// REQUEST that names no address.
    Malformed,
    /// A REQUEST that selects another server's offer.
    NotForUs,
    /// A DISCOVER while every pool address is leased, offered or declined.
    PoolExhausted,
    /// A DISCOVER from a client without a reservation while only reserved clients get
    /// addresses ([`DhcpServer::set_reserved_only`]).
    NoReservation,
    /// A message that needs no reply: RELEASE, DECLINE, a BOOTREPLY, a server message type, a
    /// relayed message (non-zero `giaddr`).
    Ignored,
    /// The output buffer cannot hold the reply (a caller bug: 548 bytes always suffice).
    BufferTooSmall,
}

/// One pool address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Never handed out since start.
    Free,
    /// Offered to `mac` until `until`; `None` means forever.
    Offered {
        mac: EthernetAddress,
        until: Option<Instant>,
    },
    /// Leased to `mac` until `until`; `None` means forever. A released lease stays here with
    /// `until` in the past, so that its client gets the same address back.
    Bound {
        mac: EthernetAddress,
        until: Option<Instant>,
    },
    /// Declined by a client (another host uses it) until `until`.
    Declined { until: Option<Instant> },
    /// Never handed out: the server, router or DNS address, the network or broadcast address,
    /// or outside the subnet.
    Reserved,
}

/// Whether a deadline (`None`: never) has passed.
fn expired(until: Option<Instant>, now: Instant) -> bool {
    until.is_some_and(|t| t <= now)
}

impl Slot {
    /// Whether anybody may take the address.
    fn is_free(&self, now: Instant) -> bool {
        match *self {
            Slot::Free => true,
            Slot::Offered { until, .. } | Slot::Bound { until, .. } | Slot::Declined { until } => {
                expired(until, now)
            }
            Slot::Reserved => false,
        }
    }

    /// The client that holds or last held the address, if it was offered or leased.
    fn last_holder(&self) -> Option<EthernetAddress> {
        match *self {
            Slot::Offered { mac, .. } | Slot::Bound { mac, .. } => Some(mac),
            _ => None,
        }
    }

    /// Whether `mac` may take the address: it is free, or it holds it.
    fn available_to(&self, mac: EthernetAddress, now: Instant) -> bool {
        self.is_free(now) || self.last_holder() == Some(mac)
    }
}

/// A client message, parsed. Borrows the client identifier from the payload.
#[derive(Debug, Clone, Copy)]
struct Request<'a> {
    message_type: DhcpMessageType,
    xid: u32,
    broadcast: bool,
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: EthernetAddress,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    max_size: Option<u16>,
    client_id: Option<&'a [u8]>,
}

/// Reads a 4-byte option as an address, `None` for any other length.
fn option_addr(data: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from)
}

impl<'a> Request<'a> {
    /// Parses and checks a client message.
    ///
    /// The fixed header goes through smoltcp's [`DhcpPacket`]. Options are walked here rather
    /// than through [`DhcpRepr::parse`], which rejects a whole message over a 7-byte client
    /// identifier of another type (RFC 2132 allows any type) and whose option iterator
    /// borrows from the packet view instead of the payload.
    fn parse(payload: &'a [u8]) -> Result<Self, DhcpDrop> {
        let packet = DhcpPacket::new_checked(payload).map_err(|_| DhcpDrop::Malformed)?;
        if packet.magic_number() != MAGIC_COOKIE {
            return Err(DhcpDrop::Malformed);
        }
        // `new_checked` guarantees at least OPTIONS_OFFSET bytes, so the header indexes and
        // the options slice below are in bounds.
        let header = &payload[..OPTIONS_OFFSET];
        if header[1] != HTYPE_ETHERNET || header[2] != HLEN_ETHERNET {
            return Err(DhcpDrop::Malformed);
        }
        match header[0] {
            OP_BOOTREQUEST => {}
            OP_BOOTREPLY => return Err(DhcpDrop::Ignored),
            _ => return Err(DhcpDrop::Malformed),
        }
        let chaddr = packet.client_hardware_address();
        if !chaddr.is_unicast() || chaddr == EthernetAddress([0; 6]) {
            return Err(DhcpDrop::Malformed);
        }

        let mut message_type = None;
        let mut requested_ip = None;
        let mut server_id = None;
        let mut max_size = None;
        let mut client_id = None;
        // Later copies of an option override earlier ones; a truncated option ends the walk
        // (what smoltcp's iterator does too).
        let mut rest = &payload[OPTIONS_OFFSET..];
        while let Some((&kind, tail)) = rest.split_first() {
            match kind {
                opt::PAD => {
                    rest = tail;
                    continue;
                }
                opt::END => break,
                _ => {}
            }
            let Some((&len, tail)) = tail.split_first() else {
                break;
            };
            let Some((data, tail)) = tail.split_at_checked(usize::from(len)) else {
                break;
            };
            rest = tail;
            match kind {
                opt::MESSAGE_TYPE if data.len() == 1 => {
                    message_type = Some(DhcpMessageType::from(data[0]));
                }
                opt::REQUESTED_IP => requested_ip = option_addr(data).or(requested_ip),
                opt::SERVER_IDENTIFIER => server_id = option_addr(data).or(server_id),
                opt::MAX_MESSAGE_SIZE => {
                    if let Ok(bytes) = <[u8; 2]>::try_from(data) {
                        max_size = Some(u16::from_be_bytes(bytes));
                    }
                }
                // RFC 2132 section 9.14: at least two bytes (a type and a value).
                opt::CLIENT_IDENTIFIER if data.len() >= 2 => client_id = Some(data),
                _ => {}
            }
        }

        Ok(Request {
            message_type: message_type.ok_or(DhcpDrop::Malformed)?,
            xid: packet.transaction_id(),
            broadcast: packet.flags().contains(DhcpFlags::BROADCAST),
            ciaddr: packet.client_ip(),
            giaddr: packet.relay_agent_ip(),
            chaddr,
            requested_ip,
            server_id,
            max_size,
            client_id,
        })
    }

    /// The largest reply, in bytes of UDP payload, that the client accepts.
    fn reply_limit(&self) -> usize {
        let max = self.max_size.map_or(0, usize::from);
        max.max(MIN_MAX_MESSAGE_SIZE) - IP_UDP_HEADER_LEN
    }
}

/// The reply to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Offer(Ipv4Addr),
    Ack(Ipv4Addr),
    Nak,
    /// ACK to an INFORM: configuration only, no address, no lease times.
    InformAck,
}

/// The lease table change that goes with a reply, applied once the reply is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// Hold the slot for the client (unless it is already bound to it).
    Offer(usize),
    /// Lease the slot to the client, and let go of any other slot it held.
    Bind(usize),
    /// Nothing.
    None,
}

/// A DHCPv4 server for the guest's link: a lease table and the reply logic.
///
/// Call [`handle`](Self::handle) for every UDP datagram the guest sends to port 67, and
/// transmit the reply it writes, if any, right away: there is no `poll_*` side, since the
/// server never speaks first and has no timers.
#[derive(Debug)]
pub struct DhcpServer {
    cfg: DhcpConfig,
    /// Subnet mask derived from `cfg.prefix_len`.
    mask: Ipv4Addr,
    /// Lease time sent to clients, in seconds.
    lease_secs: u32,
    /// One slot per pool address: `slots[i]` is `pool_start + i`. Allocated once.
    slots: Box<[Slot]>,
    /// Static reservations: the address of each client that has one, in or out of the
    /// pool. Changed when a member joins or leaves, never while handling a packet.
    reservations: Vec<(EthernetAddress, Ipv4Addr)>,
    /// Only clients with a reservation get an address.
    reserved_only: bool,
}

impl DhcpServer {
    /// Creates a server with an empty lease table of `cfg.pool_len` slots.
    ///
    /// Pool addresses that must not be handed out (see [`DhcpConfig::pool_len`]) are
    /// reserved here once.
    pub fn new(cfg: DhcpConfig) -> Self {
        let prefix_len = cfg.prefix_len.min(32);
        let mask_bits = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        let lease_secs = u32::try_from(cfg.lease.as_secs()).unwrap_or(INFINITE_LEASE);
        let network = u32::from(cfg.server) & mask_bits;
        let broadcast = network | !mask_bits;
        let slots = (0..u32::from(cfg.pool_len))
            .map(|i| {
                let Some(addr) = u32::from(cfg.pool_start).checked_add(i) else {
                    return Slot::Reserved;
                };
                let ip = Ipv4Addr::from(addr);
                let outside = addr & mask_bits != network;
                // A /31 or /32 has no network or broadcast address (RFC 3021).
                let edge = prefix_len <= 30 && (addr == network || addr == broadcast);
                let taken = ip == cfg.server || ip == cfg.router || Some(ip) == cfg.dns;
                if outside || edge || taken {
                    Slot::Reserved
                } else {
                    Slot::Free
                }
            })
            .collect();
        DhcpServer {
            cfg,
            mask: Ipv4Addr::from(mask_bits),
            lease_secs,
            slots,
            reservations: Vec::new(),
            reserved_only: false,
        }
    }

    /// Reserves `ip` for the client `mac`: it is offered and acknowledged that address,
    /// and nobody else is. Replaces an earlier reservation of `mac` or of `ip`.
    pub fn reserve(&mut self, mac: EthernetAddress, ip: Ipv4Addr) {
        self.reservations.retain(|&(m, a)| m != mac && a != ip);
        self.reservations.push((mac, ip));
    }

    /// Withdraws the reservation of `ip`, if there is one.
    pub fn unreserve(&mut self, ip: Ipv4Addr) {
        self.reservations.retain(|&(_, a)| a != ip);
    }

    /// With `on`, a client without a reservation gets no address (DISCOVER: no offer,
    /// REQUEST: NAK).
    pub fn set_reserved_only(&mut self, on: bool) {
        self.reserved_only = on;
    }

    /// The address reserved for `mac`.
    fn reservation(&self, mac: EthernetAddress) -> Option<Ipv4Addr> {
        self.reservations
            .iter()
            .find(|&&(m, _)| m == mac)
            .map(|&(_, a)| a)
    }

    /// Whether `ip` is reserved for another client than `mac`.
    fn reserved_for_other(&self, ip: Ipv4Addr, mac: EthernetAddress) -> bool {
        self.reservations.iter().any(|&(m, a)| a == ip && m != mac)
    }

    /// Handles the UDP payload of a datagram the guest sent to port 67.
    ///
    /// On success, a BOOTREPLY fills the first [`DhcpReply::len`] bytes of `out`; the caller
    /// wraps it in UDP/IPv4/Ethernet from `server:67` to `dst_ip:68` and `dst_mac`. `now` is
    /// monotonic time, used for lease expiry only.
    ///
    /// # Errors
    ///
    /// [`DhcpDrop`] when there is nothing to send; the lease table is then unchanged, except
    /// that RELEASE, DECLINE and [`DhcpDrop::NotForUs`] update it as RFC 2131 says.
    pub fn handle(
        &mut self,
        now: Instant,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<DhcpReply, DhcpDrop> {
        let req = Request::parse(payload)?;
        if !req.giaddr.is_unspecified() {
            log::trace!("dhcp: relayed message from {} ignored", req.giaddr);
            return Err(DhcpDrop::Ignored);
        }
        let (reply, commit) = match req.message_type {
            DhcpMessageType::Discover => match self.reservation(req.chaddr) {
                Some(ip) => (Reply::Offer(ip), Commit::None),
                None if self.reserved_only => {
                    log::trace!("dhcp: {} has no reservation, no offer", req.chaddr);
                    return Err(DhcpDrop::NoReservation);
                }
                None => {
                    let idx = self.choose_offer(now, &req)?;
                    (Reply::Offer(self.addr_of(idx)), Commit::Offer(idx))
                }
            },
            DhcpMessageType::Request => self.on_request(now, &req)?,
            DhcpMessageType::Release => {
                self.on_release(now, &req);
                return Err(DhcpDrop::Ignored);
            }
            DhcpMessageType::Decline => {
                self.on_decline(now, &req);
                return Err(DhcpDrop::Ignored);
            }
            DhcpMessageType::Inform => (Reply::InformAck, Commit::None),
            other => {
                log::trace!("dhcp: message type {other:?} from a client ignored");
                return Err(DhcpDrop::Ignored);
            }
        };
        let len = self.emit(&req, reply, out)?;
        self.commit(now, req.chaddr, commit);
        let dst_ip = if reply == Reply::Nak || req.broadcast || req.ciaddr.is_unspecified() {
            Ipv4Addr::BROADCAST
        } else {
            req.ciaddr
        };
        Ok(DhcpReply {
            len,
            dst_ip,
            dst_mac: req.chaddr,
        })
    }

    /// The address of slot `idx`. Only called with indexes of the table, whose addresses
    /// did not overflow in [`new`](Self::new).
    fn addr_of(&self, idx: usize) -> Ipv4Addr {
        let offset = u32::try_from(idx).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.cfg.pool_start).wrapping_add(offset))
    }

    /// The slot of `addr`, if `addr` is in the pool.
    fn index_of(&self, addr: Ipv4Addr) -> Option<usize> {
        let offset = u32::from(addr).checked_sub(u32::from(self.cfg.pool_start))?;
        let idx = usize::try_from(offset).ok()?;
        (idx < self.slots.len()).then_some(idx)
    }

    /// Picks the address to offer to a DISCOVER from a client without a reservation.
    fn choose_offer(&self, now: Instant, req: &Request<'_>) -> Result<usize, DhcpDrop> {
        let mac = req.chaddr;
        // Never an address reserved for another client.
        let open = |idx: usize| !self.reserved_for_other(self.addr_of(idx), mac);
        // At most one slot has `mac` as last holder: binding lets go of the others.
        if let Some(idx) = self.slots.iter().position(|s| s.last_holder() == Some(mac)) {
            if open(idx) {
                return Ok(idx);
            }
        }
        if let Some(idx) = req.requested_ip.and_then(|ip| self.index_of(ip)) {
            if self.slots[idx].is_free(now) && open(idx) {
                return Ok(idx);
            }
        }
        // Prefer never-used addresses, so that expired and released ones stay with their
        // previous client as long as possible.
        let slots = self.slots.iter().enumerate();
        slots
            .clone()
            .position(|(i, s)| *s == Slot::Free && open(i))
            .or_else(|| slots.clone().position(|(i, s)| s.is_free(now) && open(i)))
            .ok_or_else(|| {
                log::trace!("dhcp: pool exhausted, no offer for {mac}");
                DhcpDrop::PoolExhausted
            })
    }

    /// Decides the reply to a REQUEST.
    fn on_request(&mut self, now: Instant, req: &Request<'_>) -> Result<(Reply, Commit), DhcpDrop> {
        if let Some(server_id) = req.server_id {
            if server_id != self.cfg.server {
                // SELECTING another server: our offer, if any, is free again.
                for slot in self.slots.iter_mut() {
                    if let Slot::Offered { mac, .. } = *slot {
                        if mac == req.chaddr {
                            *slot = Slot::Offered {
                                mac,
                                until: Some(now),
                            };
                        }
                    }
                }
                log::trace!("dhcp: {} selected server {server_id}", req.chaddr);
                return Err(DhcpDrop::NotForUs);
            }
        }
        // SELECTING and INIT-REBOOT name the address in option 50, RENEWING and REBINDING
        // in `ciaddr`.
        let addr = match req.requested_ip {
            Some(ip) => ip,
            None if !req.ciaddr.is_unspecified() => req.ciaddr,
            None => return Err(DhcpDrop::Malformed),
        };
        match self.reservation(req.chaddr) {
            Some(ip) if ip == addr => return Ok((Reply::Ack(addr), Commit::None)),
            Some(_) => return Ok((Reply::Nak, Commit::None)),
            None if self.reserved_only || self.reserved_for_other(addr, req.chaddr) => {
                log::trace!("dhcp: {} requested reserved {addr}, NAK", req.chaddr);
                return Ok((Reply::Nak, Commit::None));
            }
            None => {}
        }
        match self.index_of(addr) {
            Some(idx) if self.slots[idx].available_to(req.chaddr, now) => {
                Ok((Reply::Ack(addr), Commit::Bind(idx)))
            }
            _ => {
                log::trace!("dhcp: {} requested {addr}, NAK", req.chaddr);
                Ok((Reply::Nak, Commit::None))
            }
        }
    }

    /// Frees the client's lease on RELEASE. The slot remembers the client.
    fn on_release(&mut self, now: Instant, req: &Request<'_>) {
        if req.server_id.is_some_and(|id| id != self.cfg.server) {
            return;
        }
        if let Some(idx) = self.index_of(req.ciaddr) {
            if let Some(mac) = self.slots[idx].last_holder().filter(|m| *m == req.chaddr) {
                self.slots[idx] = Slot::Bound {
                    mac,
                    until: Some(now),
                };
            }
        }
    }

    /// Takes the address out of use for a lease time on DECLINE from its holder.
    fn on_decline(&mut self, now: Instant, req: &Request<'_>) {
        if req.server_id.is_some_and(|id| id != self.cfg.server) {
            return;
        }
        let Some(idx) = req.requested_ip.and_then(|ip| self.index_of(ip)) else {
            return;
        };
        if self.slots[idx].last_holder() == Some(req.chaddr) {
            log::trace!("dhcp: {} declined {}", req.chaddr, self.addr_of(idx));
            self.slots[idx] = Slot::Declined {
                until: self.lease_deadline(now),
            };
        }
    }

    /// When a lease given at `now` ends; `None` for an infinite lease.
    fn lease_deadline(&self, now: Instant) -> Option<Instant> {
        if self.lease_secs == INFINITE_LEASE {
            None
        } else {
            now.checked_add(self.cfg.lease)
        }
    }

    /// Applies the table change of a reply that was written.
    fn commit(&mut self, now: Instant, mac: EthernetAddress, commit: Commit) {
        match commit {
            Commit::Offer(idx) => {
                let slot = &mut self.slots[idx];
                let bound = matches!(*slot, Slot::Bound { until, .. } if !expired(until, now));
                if !bound {
                    let hold = OFFER_HOLD.min(self.cfg.lease);
                    *slot = Slot::Offered {
                        mac,
                        until: now.checked_add(hold),
                    };
                }
            }
            Commit::Bind(idx) => {
                let until = self.lease_deadline(now);
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    if i == idx {
                        *slot = Slot::Bound { mac, until };
                    } else if slot.last_holder() == Some(mac) {
                        *slot = Slot::Free;
                    }
                }
            }
            Commit::None => {}
        }
    }

    /// Writes the reply into `out` and returns its length.
    fn emit(&self, req: &Request<'_>, reply: Reply, out: &mut [u8]) -> Result<usize, DhcpDrop> {
        let (message_type, yiaddr, ciaddr) = match reply {
            Reply::Offer(ip) => (DhcpMessageType::Offer, ip, Ipv4Addr::UNSPECIFIED),
            Reply::Ack(ip) => (DhcpMessageType::Ack, ip, req.ciaddr),
            Reply::Nak => (
                DhcpMessageType::Nak,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
            ),
            Reply::InformAck => (DhcpMessageType::Ack, Ipv4Addr::UNSPECIFIED, req.ciaddr),
        };
        let leased = matches!(reply, Reply::Offer(_) | Reply::Ack(_));
        let configured = reply != Reply::Nak;

        // Options smoltcp's Repr does not emit itself, in a fixed array: no allocation.
        let secs = u64::from(self.lease_secs);
        let t1 = u32::try_from(secs / 2)
            .unwrap_or(INFINITE_LEASE)
            .to_be_bytes();
        let t2 = u32::try_from(secs * 7 / 8)
            .unwrap_or(INFINITE_LEASE)
            .to_be_bytes();
        let dns = self.cfg.dns.map(|ip| ip.octets());
        let mut extra = [DhcpOption {
            kind: opt::PAD,
            data: &[],
        }; 4];
        let mut n = 0;
        if leased && self.lease_secs != INFINITE_LEASE {
            extra[n] = DhcpOption {
                kind: opt::RENEWAL_TIME,
                data: &t1,
            };
            extra[n + 1] = DhcpOption {
                kind: opt::REBINDING_TIME,
                data: &t2,
            };
            n += 2;
        }
        if let (true, Some(dns)) = (configured, dns.as_ref()) {
            extra[n] = DhcpOption {
                kind: opt::DOMAIN_NAME_SERVER,
                data: dns,
            };
            n += 1;
        }
        let echo_at = n;
        if let Some(id) = req.client_id {
            extra[n] = DhcpOption {
                kind: opt::CLIENT_IDENTIFIER,
                data: id,
            };
            n += 1;
        }

        let mut repr = DhcpRepr {
            message_type,
            transaction_id: req.xid,
            secs: 0,
            client_hardware_address: req.chaddr,
            client_ip: ciaddr,
            your_ip: yiaddr,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: configured.then_some(self.cfg.router),
            subnet_mask: configured.then_some(self.mask),
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: req.broadcast,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.cfg.server),
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: leased.then_some(self.lease_secs),
            renew_duration: None,
            rebind_duration: None,
            additional_options: &extra[..n],
        };
        let limit = req.reply_limit().min(out.len());
        if repr.buffer_len() > limit {
            // The echoed client identifier is the only part of variable size: give it up
            // before giving up the reply.
            repr.additional_options = &extra[..echo_at];
        }
        let len = repr.buffer_len();
        if len > limit {
            log::trace!("dhcp: reply of {len} bytes does not fit in {limit}");
            return Err(DhcpDrop::BufferTooSmall);
        }
        let total = len.max(MIN_BOOTP_LEN.min(limit));
        let (body, padding) = out[..total].split_at_mut(len);
        repr.emit(&mut DhcpPacket::new_unchecked(body))
            .map_err(|_| DhcpDrop::BufferTooSmall)?;
        padding.fill(0);
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: [u8; 3] = [10, 0, 2];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(NET[0], NET[1], NET[2], last)
    }

    fn mac(n: u8) -> EthernetAddress {
        EthernetAddress([0x02, 0x42, 0xac, 0x11, 0x00, n])
    }

    fn cfg() -> DhcpConfig {
        DhcpConfig {
            server: SERVER,
            prefix_len: 24,
            router: SERVER,
            dns: Some(DNS),
            pool_start: ip(15),
            pool_len: 16,
            lease: DAY,
        }
    }

    fn server() -> DhcpServer {
        DhcpServer::new(cfg())
    }

    /// A client message as smoltcp emits it.
    fn client_repr(message_type: DhcpMessageType, chaddr: EthernetAddress) -> DhcpRepr<'static> {
        DhcpRepr {
            message_type,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: chaddr,
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: None,
            client_identifier: Some(chaddr),
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6]),
            dns_servers: None,
            max_size: Some(1500),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        }
    }

    fn bytes(repr: &DhcpRepr<'_>) -> Vec<u8> {
        let mut buf = vec![0; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .unwrap();
        buf
    }

    fn discover(chaddr: EthernetAddress) -> Vec<u8> {
        bytes(&client_repr(DhcpMessageType::Discover, chaddr))
    }

    /// A REQUEST in SELECTING state.
    fn request_selecting(chaddr: EthernetAddress, addr: Ipv4Addr, server: Ipv4Addr) -> Vec<u8> {
        let mut repr = client_repr(DhcpMessageType::Request, chaddr);
        repr.requested_ip = Some(addr);
        repr.server_identifier = Some(server);
        bytes(&repr)
    }

    /// What a test checks in a reply.
    #[derive(Debug)]
    struct Parsed {
        message_type: DhcpMessageType,
        xid: u32,
        yiaddr: Ipv4Addr,
        ciaddr: Ipv4Addr,
        broadcast: bool,
        server_id: Option<Ipv4Addr>,
        mask: Option<Ipv4Addr>,
        router: Option<Ipv4Addr>,
        dns: Option<Vec<Ipv4Addr>>,
        lease: Option<u32>,
        t1: Option<u32>,
        t2: Option<u32>,
        client_id: Option<EthernetAddress>,
    }

    fn parse_reply(buf: &[u8]) -> Parsed {
        let packet = DhcpPacket::new_checked(buf).unwrap();
        assert_eq!(buf[0], OP_BOOTREPLY);
        let repr = DhcpRepr::parse(&packet).unwrap();
        Parsed {
            message_type: repr.message_type,
            xid: repr.transaction_id,
            yiaddr: repr.your_ip,
            ciaddr: repr.client_ip,
            broadcast: repr.broadcast,
            server_id: repr.server_identifier,
            mask: repr.subnet_mask,
            router: repr.router,
            dns: repr.dns_servers.map(|v| v.iter().copied().collect()),
            lease: repr.lease_duration,
            t1: repr.renew_duration,
            t2: repr.rebind_duration,
            client_id: repr.client_identifier,
        }
    }

    /// Runs `payload` through `server` and parses the reply.
    fn exchange(
        server: &mut DhcpServer,
        now: Instant,
        payload: &[u8],
    ) -> Result<(DhcpReply, Parsed), DhcpDrop> {
        let mut out = [0xa5; 1500];
        let reply = server.handle(now, payload, &mut out)?;
        Ok((reply, parse_reply(&out[..reply.len])))
    }

    /// DISCOVER then REQUEST; returns the address acknowledged.
    fn lease(server: &mut DhcpServer, now: Instant, chaddr: EthernetAddress) -> Ipv4Addr {
        let (_, offer) = exchange(server, now, &discover(chaddr)).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        let (_, ack) = exchange(
            server,
            now,
            &request_selecting(chaddr, offer.yiaddr, SERVER),
        )
        .unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.yiaddr, offer.yiaddr);
        ack.yiaddr
    }

    /// A DISCOVER as busybox udhcpc 1.36 sends it (`udhcpc -i eth0`, no broadcast flag),
    /// padded to 300 bytes like udhcpc pads it.
    #[rustfmt::skip]
    static UDHCPC_DISCOVER: [u8; 300] = [
        // op=BOOTREQUEST htype=Ethernet hlen=6 hops=0
        0x01, 0x01, 0x06, 0x00,
        // xid
        0x5a, 0x3c, 0x9e, 0x01,
        // secs=0, flags=0 (no broadcast flag)
        0x00, 0x00, 0x00, 0x00,
        // ciaddr, yiaddr, siaddr, giaddr: all 0.0.0.0
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // chaddr: 02:42:ac:11:00:02 then 10 bytes of padding
        0x02, 0x42, 0xac, 0x11, 0x00, 0x02, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // sname: 64 zero bytes
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // file: 128 zero bytes
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // magic cookie
        0x63, 0x82, 0x53, 0x63,
        // option 53, message type: DISCOVER
        0x35, 0x01, 0x01,
        // option 61, client identifier: type 1 (Ethernet), 02:42:ac:11:00:02
        0x3d, 0x07, 0x01, 0x02, 0x42, 0xac, 0x11, 0x00, 0x02,
        // option 57, maximum message size: 576
        0x39, 0x02, 0x02, 0x40,
        // option 55, parameter request list: mask, router, dns, hostname, domain, broadcast, ntp
        0x37, 0x07, 0x01, 0x03, 0x06, 0x0c, 0x0f, 0x1c, 0x2a,
        // option 60, vendor class: "udhcp 1.36.1"
        0x3c, 0x0c, b'u', b'd', b'h', b'c', b'p', b' ', b'1', b'.', b'3', b'6', b'.', b'1',
        // end
        0xff,
        // padding to 300 bytes
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// A small deterministic generator (xorshift64) for mutation tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    // ---- DISCOVER -> OFFER ----

    #[test]
    fn discover_fresh_client_offers_first_pool_address() {
        let mut s = server();
        let (reply, offer) = exchange(&mut s, Instant::now(), &discover(mac(1))).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        assert_eq!(offer.yiaddr, ip(15));
        assert_eq!(offer.xid, 0x1234_5678);
        assert_eq!(reply.dst_mac, mac(1));
    }

    #[test]
    fn discover_udhcpc_bytes_offers_first_pool_address() {
        let mut s = server();
        let (reply, offer) = exchange(&mut s, Instant::now(), &UDHCPC_DISCOVER).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        assert_eq!(offer.xid, 0x5a3c_9e01);
        assert_eq!(offer.yiaddr, ip(15));
        assert_eq!(offer.client_id, Some(mac(2)), "RFC 6842 echo");
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!(reply.dst_mac, mac(2));
        // udhcpc announced 576 bytes: the reply fits, and is padded to the BOOTP minimum.
        assert!(reply.len <= 576 - 28);
        assert_eq!(reply.len, MIN_BOOTP_LEN);
    }

    #[test]
    fn discover_offer_carries_configuration_options() {
        let mut s = server();
        let (_, offer) = exchange(&mut s, Instant::now(), &discover(mac(1))).unwrap();
        assert_eq!(offer.server_id, Some(SERVER));
        assert_eq!(offer.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(offer.router, Some(SERVER));
        assert_eq!(offer.dns, Some(vec![DNS]));
        assert_eq!(offer.lease, Some(86_400));
        assert_eq!(offer.t1, Some(43_200));
        assert_eq!(offer.t2, Some(75_600));
        assert_eq!(offer.ciaddr, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn discover_dns_disabled_omits_dns_option() {
        let mut s = DhcpServer::new(DhcpConfig { dns: None, ..cfg() });
        let (_, offer) = exchange(&mut s, Instant::now(), &discover(mac(1))).unwrap();
        assert_eq!(offer.dns, None);
        assert_eq!(offer.router, Some(SERVER));
    }

    #[test]
    fn discover_requested_free_address_offered() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.requested_ip = Some(ip(20));
        let (_, offer) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(20));
    }

    #[test]
    fn discover_requested_address_outside_pool_offers_first() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.requested_ip = Some(ip(100));
        let (_, offer) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn discover_requested_taken_address_offers_another() {
        let mut s = server();
        let now = Instant::now();
        assert_eq!(lease(&mut s, now, mac(1)), ip(15));
        let mut repr = client_repr(DhcpMessageType::Discover, mac(2));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(16));
    }

    #[test]
    fn discover_leased_client_offered_same_address() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        assert_eq!(lease(&mut s, now, mac(2)), ip(16));
        let (_, offer) = exchange(&mut s, now, &discover(mac(2))).unwrap();
        assert_eq!(offer.yiaddr, ip(16));
        // The lease is still bound: a REQUEST from another client for it is refused.
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(3), ip(16), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn discover_concurrent_clients_get_distinct_offers() {
        let mut s = server();
        let now = Instant::now();
        let (_, a) = exchange(&mut s, now, &discover(mac(1))).unwrap();
        let (_, b) = exchange(&mut s, now, &discover(mac(2))).unwrap();
        let (_, a2) = exchange(&mut s, now, &discover(mac(1))).unwrap();
        assert_eq!(a.yiaddr, ip(15));
        assert_eq!(b.yiaddr, ip(16));
        assert_eq!(
            a2.yiaddr,
            ip(15),
            "retransmitted DISCOVER gets the same offer"
        );
    }

    #[test]
    fn discover_offer_hold_expires() {
        let mut s = server();
        let now = Instant::now();
        exchange(&mut s, now, &discover(mac(1))).unwrap();
        let later = now + OFFER_HOLD;
        let mut repr = client_repr(DhcpMessageType::Discover, mac(2));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, later, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn discover_pool_skips_reserved_addresses() {
        // A pool over .0-.5 must skip the network address, the gateway and the DNS server.
        let mut s = DhcpServer::new(DhcpConfig {
            pool_start: ip(0),
            pool_len: 6,
            ..cfg()
        });
        let now = Instant::now();
        let got: Vec<_> = (1..=3).map(|n| lease(&mut s, now, mac(n))).collect();
        assert_eq!(got, [ip(1), ip(4), ip(5)]);
        assert_eq!(
            exchange(&mut s, now, &discover(mac(9))).unwrap_err(),
            DhcpDrop::PoolExhausted
        );
    }

    // ---- REQUEST -> ACK / NAK ----

    #[test]
    fn request_selecting_offered_address_acks() {
        let mut s = server();
        let now = Instant::now();
        let (_, offer) = exchange(&mut s, now, &discover(mac(1))).unwrap();
        let (reply, ack) = exchange(
            &mut s,
            now,
            &request_selecting(mac(1), offer.yiaddr, SERVER),
        )
        .unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.yiaddr, ip(15));
        assert_eq!(ack.server_id, Some(SERVER));
        assert_eq!(ack.lease, Some(86_400));
        assert_eq!(ack.t1, Some(43_200));
        assert_eq!(ack.t2, Some(75_600));
        assert_eq!(ack.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(ack.router, Some(SERVER));
        assert_eq!(ack.dns, Some(vec![DNS]));
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn request_selecting_other_server_not_for_us() {
        let mut s = server();
        let now = Instant::now();
        exchange(&mut s, now, &discover(mac(1))).unwrap();
        let other = Ipv4Addr::new(10, 0, 2, 1);
        assert_eq!(
            exchange(&mut s, now, &request_selecting(mac(1), ip(15), other)).unwrap_err(),
            DhcpDrop::NotForUs
        );
        // Our offer is free again.
        let mut repr = client_repr(DhcpMessageType::Discover, mac(2));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn request_taken_address_naks() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        let (reply, nak) =
            exchange(&mut s, now, &request_selecting(mac(2), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        assert_eq!(nak.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(nak.server_id, Some(SERVER));
        assert_eq!(nak.lease, None);
        assert_eq!(nak.router, None);
        assert_eq!(nak.dns, None);
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn request_offered_to_another_client_naks() {
        let mut s = server();
        let now = Instant::now();
        exchange(&mut s, now, &discover(mac(1))).unwrap();
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(2), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn request_outside_pool_naks() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.requested_ip = Some(Ipv4Addr::new(192, 168, 1, 50));
        let (_, nak) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn request_init_reboot_free_address_acks() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.requested_ip = Some(ip(22));
        let (reply, ack) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.yiaddr, ip(22));
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn request_renewing_ciaddr_acks_unicast() {
        let mut s = server();
        let now = Instant::now();
        let addr = lease(&mut s, now, mac(1));
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.client_ip = addr;
        let later = now + DAY / 2;
        let (reply, ack) = exchange(&mut s, later, &bytes(&repr)).unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.yiaddr, addr);
        assert_eq!(ack.ciaddr, addr);
        assert_eq!(reply.dst_ip, addr);
        // The renewal extended the lease past the first lease's end.
        let (_, nak) = exchange(
            &mut s,
            now + DAY + Duration::from_secs(1),
            &request_selecting(mac(2), addr, SERVER),
        )
        .unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn request_new_address_frees_previous_one() {
        let mut s = server();
        let now = Instant::now();
        assert_eq!(lease(&mut s, now, mac(1)), ip(15));
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.requested_ip = Some(ip(20));
        let (_, ack) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(ack.yiaddr, ip(20));
        assert_eq!(lease(&mut s, now, mac(2)), ip(15));
    }

    #[test]
    fn request_without_address_malformed() {
        let mut s = server();
        let repr = client_repr(DhcpMessageType::Request, mac(1));
        assert_eq!(
            exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap_err(),
            DhcpDrop::Malformed
        );
    }

    // ---- pool and leases ----

    #[test]
    fn pool_exhausted_seventeenth_client_refused() {
        let mut s = server();
        let now = Instant::now();
        for n in 0..16 {
            assert_eq!(lease(&mut s, now, mac(n)), ip(15 + n));
        }
        assert_eq!(
            exchange(&mut s, now, &discover(mac(16))).unwrap_err(),
            DhcpDrop::PoolExhausted
        );
    }

    #[test]
    fn lease_expiry_frees_address() {
        let mut s = server();
        let now = Instant::now();
        for n in 0..16 {
            lease(&mut s, now, mac(n));
        }
        let before = now + DAY - Duration::from_secs(1);
        assert_eq!(
            exchange(&mut s, before, &discover(mac(16))).unwrap_err(),
            DhcpDrop::PoolExhausted
        );
        let after = now + DAY;
        assert_eq!(lease(&mut s, after, mac(16)), ip(15));
    }

    #[test]
    fn lease_expired_client_gets_same_address_back() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        assert_eq!(lease(&mut s, now, mac(2)), ip(16));
        assert_eq!(lease(&mut s, now + 2 * DAY, mac(2)), ip(16));
    }

    #[test]
    fn lease_infinite_never_expires() {
        let mut s = DhcpServer::new(DhcpConfig {
            pool_len: 1,
            lease: Duration::MAX,
            ..cfg()
        });
        let now = Instant::now();
        let (_, offer) = exchange(&mut s, now, &discover(mac(1))).unwrap();
        assert_eq!(offer.lease, Some(u32::MAX));
        assert_eq!(offer.t1, None);
        assert_eq!(offer.t2, None);
        lease(&mut s, now, mac(1));
        let much_later = now + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(
            exchange(&mut s, much_later, &discover(mac(2))).unwrap_err(),
            DhcpDrop::PoolExhausted
        );
    }

    // ---- RELEASE, DECLINE, INFORM ----

    #[test]
    fn release_frees_address() {
        let mut s = server();
        let now = Instant::now();
        for n in 0..16 {
            lease(&mut s, now, mac(n));
        }
        let mut repr = client_repr(DhcpMessageType::Release, mac(3));
        repr.client_ip = ip(18);
        repr.server_identifier = Some(SERVER);
        assert_eq!(
            exchange(&mut s, now, &bytes(&repr)).unwrap_err(),
            DhcpDrop::Ignored
        );
        assert_eq!(lease(&mut s, now, mac(16)), ip(18));
    }

    #[test]
    fn release_by_other_client_keeps_lease() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        let mut repr = client_repr(DhcpMessageType::Release, mac(2));
        repr.client_ip = ip(15);
        assert_eq!(
            exchange(&mut s, now, &bytes(&repr)).unwrap_err(),
            DhcpDrop::Ignored
        );
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(2), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn release_then_discover_same_client_same_address() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        assert_eq!(lease(&mut s, now, mac(2)), ip(16));
        let mut repr = client_repr(DhcpMessageType::Release, mac(2));
        repr.client_ip = ip(16);
        assert!(exchange(&mut s, now, &bytes(&repr)).is_err());
        assert_eq!(
            lease(&mut s, now, mac(3)),
            ip(17),
            "never-used addresses first"
        );
        assert_eq!(lease(&mut s, now, mac(2)), ip(16));
    }

    #[test]
    fn decline_blocks_address_for_lease_time() {
        let mut s = server();
        let now = Instant::now();
        assert_eq!(lease(&mut s, now, mac(1)), ip(15));
        let mut repr = client_repr(DhcpMessageType::Decline, mac(1));
        repr.requested_ip = Some(ip(15));
        repr.server_identifier = Some(SERVER);
        assert_eq!(
            exchange(&mut s, now, &bytes(&repr)).unwrap_err(),
            DhcpDrop::Ignored
        );
        // The declining client gets another address, and nobody gets .15 for a lease time.
        assert_eq!(lease(&mut s, now, mac(1)), ip(16));
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(2), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        let mut repr = client_repr(DhcpMessageType::Discover, mac(2));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(17));
        let (_, offer) = exchange(&mut s, now + DAY, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(17), "same client keeps its offer");
        let mut repr = client_repr(DhcpMessageType::Discover, mac(3));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, now + DAY, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn decline_by_other_client_ignored() {
        let mut s = server();
        let now = Instant::now();
        lease(&mut s, now, mac(1));
        let mut repr = client_repr(DhcpMessageType::Decline, mac(2));
        repr.requested_ip = Some(ip(15));
        assert!(exchange(&mut s, now, &bytes(&repr)).is_err());
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.client_ip = ip(15);
        let (_, ack) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
    }

    #[test]
    fn inform_acks_without_yiaddr() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Inform, mac(1));
        repr.client_ip = ip(100);
        let (reply, ack) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.ciaddr, ip(100));
        assert_eq!(ack.lease, None);
        assert_eq!(ack.t1, None);
        assert_eq!(ack.t2, None);
        assert_eq!(ack.mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(ack.router, Some(SERVER));
        assert_eq!(ack.dns, Some(vec![DNS]));
        assert_eq!(reply.dst_ip, ip(100));
        // No lease was made.
        assert_eq!(lease(&mut s, Instant::now(), mac(2)), ip(15));
    }

    // ---- destination of replies ----

    #[test]
    fn broadcast_flag_set_reply_broadcast() {
        let mut s = server();
        let now = Instant::now();
        let addr = lease(&mut s, now, mac(1));
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.client_ip = addr;
        repr.broadcast = true;
        let (reply, ack) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert!(ack.broadcast, "flag copied into the reply");
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!(reply.dst_mac, mac(1));
    }

    #[test]
    fn broadcast_flag_clear_with_ciaddr_reply_unicast() {
        let mut s = server();
        let now = Instant::now();
        let addr = lease(&mut s, now, mac(1));
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.client_ip = addr;
        let (reply, ack) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert!(!ack.broadcast);
        assert_eq!(reply.dst_ip, addr);
    }

    #[test]
    fn broadcast_flag_clear_without_address_reply_broadcast() {
        let mut s = server();
        let (reply, offer) = exchange(&mut s, Instant::now(), &discover(mac(1))).unwrap();
        assert!(!offer.broadcast);
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    #[test]
    fn nak_renewing_reply_broadcast() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Request, mac(1));
        repr.client_ip = Ipv4Addr::new(192, 168, 1, 50);
        let (reply, nak) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        assert_eq!(reply.dst_ip, Ipv4Addr::BROADCAST);
    }

    // ---- output buffer and message size ----

    #[test]
    fn out_too_small_buffer_too_small_and_no_lease() {
        let mut s = server();
        let now = Instant::now();
        let mut out = [0; 200];
        assert_eq!(
            s.handle(now, &discover(mac(1)), &mut out).unwrap_err(),
            DhcpDrop::BufferTooSmall
        );
        // Nothing was offered: another client gets the first address.
        let (_, offer) = exchange(&mut s, now, &discover(mac(2))).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn out_without_room_for_padding_reply_unpadded() {
        let mut s = server();
        let mut out = [0; 290];
        let reply = s
            .handle(Instant::now(), &discover(mac(1)), &mut out)
            .unwrap();
        assert!(reply.len < MIN_BOOTP_LEN);
        assert_eq!(parse_reply(&out[..reply.len]).yiaddr, ip(15));
    }

    #[test]
    fn long_client_id_dropped_when_reply_too_large() {
        let mut s = server();
        // A 255-byte client identifier of type 0 (a name).
        let mut id = [b'x'; 255];
        id[0] = 0;
        let extra = [DhcpOption {
            kind: opt::CLIENT_IDENTIFIER,
            data: &id,
        }];
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.client_identifier = None;
        repr.max_size = Some(576);
        repr.additional_options = &extra;
        let echoed = |out: &[u8]| out.windows(3).any(|w| w == [61, 255, 0]);
        // Even with the echo, the reply fits in the 548 bytes every client accepts.
        let mut out = [0; 1500];
        let reply = s.handle(Instant::now(), &bytes(&repr), &mut out).unwrap();
        assert!(reply.len <= 576 - 28);
        assert!(echoed(&out[..reply.len]));
        // Without room for the echo, the reply goes without it.
        let mut out = [0; 400];
        let reply = s.handle(Instant::now(), &bytes(&repr), &mut out).unwrap();
        assert_eq!(reply.len, MIN_BOOTP_LEN);
        assert!(!echoed(&out[..reply.len]));
        assert_eq!(parse_reply(&out[..reply.len]).yiaddr, ip(15));
    }

    #[test]
    fn max_size_below_minimum_treated_as_576() {
        let mut s = server();
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.max_size = Some(100);
        let (reply, _) = exchange(&mut s, Instant::now(), &bytes(&repr)).unwrap();
        assert_eq!(reply.len, MIN_BOOTP_LEN);
    }

    // ---- bad input ----

    #[test]
    fn garbage_every_prefix_no_panic() {
        let mut request = client_repr(DhcpMessageType::Request, mac(1));
        request.requested_ip = Some(ip(15));
        request.server_identifier = Some(SERVER);
        let request = bytes(&request);
        for packet in [&UDHCPC_DISCOVER[..], &request[..]] {
            for len in 0..=packet.len() {
                let mut s = server();
                let mut out = [0; 1500];
                let result = s.handle(Instant::now(), &packet[..len], &mut out);
                // The message type is the first option, at 240..243.
                if len < OPTIONS_OFFSET + 3 {
                    assert_eq!(result.unwrap_err(), DhcpDrop::Malformed, "prefix {len}");
                }
            }
        }
    }

    #[test]
    fn garbage_mutated_bytes_no_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut s = server();
        let mut out = [0; 1500];
        let mut now = Instant::now();
        let mut request = client_repr(DhcpMessageType::Request, mac(1));
        request.requested_ip = Some(ip(15));
        let seeds = [UDHCPC_DISCOVER.to_vec(), bytes(&request)];
        for i in 0..20_000 {
            let mut packet = seeds[i % seeds.len()].clone();
            for _ in 0..1 + rng.below(8) {
                let at = OPTIONS_OFFSET.min(packet.len() - 1) + rng.below(packet.len() / 4);
                let at = if rng.below(4) == 0 {
                    rng.below(packet.len())
                } else {
                    at
                };
                if let Some(b) = packet.get_mut(at) {
                    *b = rng.next() as u8;
                }
            }
            packet.truncate(
                rng.below(packet.len() + 1)
                    .max(packet.len() - rng.below(64)),
            );
            now += Duration::from_secs(rng.below(4000) as u64);
            if let Ok(reply) = s.handle(now, &packet, &mut out) {
                assert!(reply.len <= 548);
                assert_eq!(out[0], OP_BOOTREPLY);
            }
            // Short output buffers too.
            let cut = rng.below(out.len());
            let _ = s.handle(now, &packet, &mut out[..cut]);
        }
    }

    #[test]
    fn garbage_random_bytes_no_panic() {
        let mut rng = Rng(42);
        let mut s = server();
        let mut out = [0; 600];
        for _ in 0..5_000 {
            let len = rng.below(600);
            let mut packet: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if len >= OPTIONS_OFFSET {
                // Past the header checks, into the option walk.
                packet[..3].copy_from_slice(&[1, 1, 6]);
                packet[28] = 0x02;
                packet[236..240].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            }
            let _ = s.handle(Instant::now(), &packet, &mut out);
        }
    }

    #[test]
    fn garbage_huge_option_length_no_panic() {
        let mut packet = UDHCPC_DISCOVER[..OPTIONS_OFFSET].to_vec();
        packet.extend_from_slice(&[53, 1, 1, 61, 255, 1, 2, 3]);
        let (_, offer) = exchange(&mut server(), Instant::now(), &packet).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        let mut packet = UDHCPC_DISCOVER[..OPTIONS_OFFSET].to_vec();
        packet.extend_from_slice(&[61, 255, 53, 1, 1]);
        assert_eq!(
            exchange(&mut server(), Instant::now(), &packet).unwrap_err(),
            DhcpDrop::Malformed
        );
        let mut packet = UDHCPC_DISCOVER[..OPTIONS_OFFSET].to_vec();
        packet.extend_from_slice(&[53]);
        assert_eq!(
            exchange(&mut server(), Instant::now(), &packet).unwrap_err(),
            DhcpDrop::Malformed
        );
    }

    #[test]
    fn garbage_hlen_not_six_malformed() {
        let mut packet = UDHCPC_DISCOVER;
        packet[2] = 16;
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Malformed)
        );
        let mut packet = UDHCPC_DISCOVER;
        packet[1] = 6; // IEEE 802
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Malformed)
        );
    }

    #[test]
    fn garbage_bad_magic_malformed() {
        let mut packet = UDHCPC_DISCOVER;
        packet[239] ^= 1;
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Malformed)
        );
    }

    #[test]
    fn garbage_wrong_op() {
        let mut packet = UDHCPC_DISCOVER;
        packet[0] = OP_BOOTREPLY;
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Ignored)
        );
        packet[0] = 3;
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Malformed)
        );
    }

    #[test]
    fn garbage_no_message_type_malformed() {
        let mut packet = UDHCPC_DISCOVER;
        packet[240] = opt::PAD; // 53 -> pad, then "01 01" reads as option 1, length 1
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Malformed)
        );
    }

    #[test]
    fn garbage_group_or_zero_chaddr_malformed() {
        for chaddr in [[0xff; 6], [0x01, 0, 0x5e, 0, 0, 1], [0; 6]] {
            let mut packet = UDHCPC_DISCOVER;
            packet[28..34].copy_from_slice(&chaddr);
            assert_eq!(
                server().handle(Instant::now(), &packet, &mut [0; 600]),
                Err(DhcpDrop::Malformed)
            );
        }
    }

    #[test]
    fn server_message_type_ignored() {
        let mut packet = UDHCPC_DISCOVER;
        packet[242] = 2; // OFFER in a BOOTREQUEST
        assert_eq!(
            server().handle(Instant::now(), &packet, &mut [0; 600]),
            Err(DhcpDrop::Ignored)
        );
    }

    #[test]
    fn relayed_message_ignored() {
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.relay_agent_ip = Ipv4Addr::new(192, 168, 0, 1);
        assert_eq!(
            exchange(&mut server(), Instant::now(), &bytes(&repr)).unwrap_err(),
            DhcpDrop::Ignored
        );
    }

    #[test]
    fn reservation_offered_and_acked_to_its_client_only() {
        let mut s = server();
        let now = Instant::now();
        // mac(1) holds a pool address (the first one) and mac(2) one outside the pool.
        s.reserve(mac(1), ip(15));
        s.reserve(mac(2), ip(100));
        assert_eq!(lease(&mut s, now, mac(1)), ip(15));
        assert_eq!(lease(&mut s, now, mac(2)), ip(100));
        // Another client is never offered them, even when it asks.
        let mut repr = client_repr(DhcpMessageType::Discover, mac(3));
        repr.requested_ip = Some(ip(15));
        let (_, offer) = exchange(&mut s, now, &bytes(&repr)).unwrap();
        assert_eq!(offer.yiaddr, ip(16));
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(3), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        // Nor may a reserved client take another address.
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(1), ip(17), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        // Withdrawn: the address is the pool's again.
        s.unreserve(ip(15));
        let (_, offer) = exchange(&mut s, now, &discover(mac(4))).unwrap();
        assert_eq!(offer.yiaddr, ip(15));
    }

    #[test]
    fn reserved_only_refuses_clients_without_reservation() {
        let mut s = server();
        let now = Instant::now();
        s.set_reserved_only(true);
        s.reserve(mac(1), ip(100));
        assert_eq!(lease(&mut s, now, mac(1)), ip(100));
        assert_eq!(
            exchange(&mut s, now, &discover(mac(2))).unwrap_err(),
            DhcpDrop::NoReservation
        );
        let (_, nak) = exchange(&mut s, now, &request_selecting(mac(2), ip(15), SERVER)).unwrap();
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
    }

    #[test]
    fn client_id_of_other_type_accepted() {
        // A 7-byte identifier of type 0, which smoltcp's Repr::parse would reject.
        let id = [0, b'g', b'u', b'e', b's', b't', b'1'];
        let extra = [DhcpOption {
            kind: opt::CLIENT_IDENTIFIER,
            data: &id,
        }];
        let mut repr = client_repr(DhcpMessageType::Discover, mac(1));
        repr.client_identifier = None;
        repr.additional_options = &extra;
        let mut out = [0; 600];
        let reply = server()
            .handle(Instant::now(), &bytes(&repr), &mut out)
            .unwrap();
        assert!(out[..reply.len]
            .windows(9)
            .any(|w| w[..2] == [61, 7] && w[2..] == id));
    }
}
