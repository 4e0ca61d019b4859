//! The egress policy in the forwarder, over the in-memory host (see `common`): a denied
//! flow opens no host socket at all and is answered "administratively prohibited"; the
//! DNS forwarder answers names the policy does not allow itself and learns the addresses
//! of those it allows from the answers it relays; a changed policy resets the open flows
//! it denies, a RST both ways.

mod common;

use std::net::SocketAddr;

use common::pair::Pair;
use common::*;
use etherparse::{Icmpv4Type, PacketBuilder, TransportSlice};
use forwarder::egress::{Action, RuleKind, Spec};
use forwarder::{Close, FrameSink, Io, PortId};
use smoltcp::socket::tcp::State;

const WORLD: [u8; 4] = [203, 0, 113, 1];
const NS: [u8; 4] = [192, 0, 2, 53];

fn spec(rules: &[&str], default: Action) -> Spec {
    let mut s = Spec {
        default,
        ..Spec::default()
    };
    for r in rules {
        s.push(RuleKind::parse(r).unwrap()).unwrap();
    }
    s
}

/// The ICMPv4 destination-unreachable codes the guest was sent, with their source.
fn unreachables(frames: &[Vec<u8>]) -> Vec<([u8; 4], u8)> {
    seen(frames, |ip, t| match t {
        TransportSlice::Icmpv4(icmp) => match icmp.icmp_type() {
            Icmpv4Type::DestinationUnreachable(h) => Some((ip.header().source(), h.code_u8())),
            _ => None,
        },
        _ => None,
    })
}

/// The UDP payloads sent to the guest.
fn udp_payloads(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    seen(frames, |_, t| match t {
        TransportSlice::Udp(u) => Some(u.payload().to_vec()),
        _ => None,
    })
}

/// A query for `name` A with ID `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The answer to `query` with one A record.
fn answer(query: &[u8], addr: [u8; 4], ttl: u32) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[7] = 1;
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&[0, 4]);
    r.extend_from_slice(&addr);
    r
}

#[test]
fn denied_syn_datagram_and_echo_open_no_host_socket() {
    let mut sim = Sim::new(true);
    sim.host.tcp(SocketAddr::from((WORLD, 80)), Remote::Accept);
    sim.fwd
        .set_egress(&[], Some(&spec(&["deny 203.0.113.0/24"], Action::Allow)));
    let mut p = Pair::new(sim);
    let h = p.connect((WORLD, 80), 40000);
    // Long enough for the guest's stack, which takes no notice of the ICMP error, to
    // send its SYN again.
    p.drive(3000);
    assert_ne!(p.tcp(h).state(), State::Established);
    p.sim.send(&udp_frame(WORLD, 5000, 53, b"x"));
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GUEST, WORLD, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    p.sim.send(&echo);
    assert_eq!(p.sim.host.opened, 0, "a host socket was opened");
    let mut seen = p.seen.clone();
    seen.append(&mut p.sim.wire.0);
    let codes = unreachables(&seen);
    assert!(codes.len() >= 3, "{codes:?}");
    assert!(codes.iter().all(|&c| c == (GW, 13)), "{codes:?}");
    let c = p.sim.fwd.counters();
    assert_eq!((c.tcp_opened, c.udp_opened, c.icmp_opened), (0, 0, 0));
    assert!(c.tcp_denied >= 2, "the SYN was not sent again");
    assert_eq!((c.udp_denied, c.icmp_denied), (1, 1));
    // The SYN sent again is the same attempt: counted once.
    assert_eq!(c.egress_denied, 3);
    let policy = p.sim.fwd.egress(None).unwrap();
    assert_eq!(policy.rules()[0].hits, 3);
}

#[test]
fn names_not_allowed_never_reach_the_resolver_allowed_ones_open_their_addresses() {
    let mut cfg = Sim::config(true);
    cfg.nameservers = vec![SocketAddr::from((NS, 53))];
    let mut sim = Sim::with_config(cfg);
    sim.host.tcp(SocketAddr::from((WORLD, 443)), Remote::Accept);
    sim.fwd.set_egress(
        &[],
        Some(&spec(&["allow-domain *.example.org"], Action::Deny)),
    );
    // Not allowed: NXDOMAIN from the DNS address, no socket to the resolver.
    sim.send(&udp_frame([10, 0, 2, 3], 4444, 53, &query(1, "evil.test")));
    assert_eq!(sim.host.opened, 0);
    let replies = udp_payloads(&sim.wire.0);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0][3] & 0xf, 3, "NXDOMAIN");
    assert_eq!(sim.fwd.counters().egress_names_refused, 1);
    // Before any answer, the address is denied.
    let mut p = Pair::new(sim);
    let h = p.connect((WORLD, 443), 40001);
    p.drive(100);
    assert!(p
        .sim
        .host
        .stream_to(SocketAddr::from((WORLD, 443)))
        .is_none());
    p.sockets.remove(h);
    // Allowed: relayed, and the answer teaches the address.
    let q = query(2, "www.example.org");
    p.sim.send(&udp_frame([10, 0, 2, 3], 4445, 53, &q));
    let sock = p
        .sim
        .host
        .dgram_to(SocketAddr::from((NS, 53)))
        .expect("asked");
    assert_eq!(p.sim.host.take_sent(sock), std::slice::from_ref(&q));
    p.sim.host.dgram_reply(sock, &answer(&q, WORLD, 300));
    p.drive(100);
    assert_eq!(p.sim.fwd.egress(None).unwrap().learned_total(), 1);
    let h = p.connect((WORLD, 443), 40002);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Established);
    let rules = p.sim.fwd.egress(None).unwrap().rules();
    assert_eq!(rules[0].hits, 1, "the name's rule let it through");
}

#[test]
fn a_changed_policy_resets_the_open_flows_it_denies() {
    let mut sim = Sim::new(true);
    sim.host.tcp(SocketAddr::from((WORLD, 80)), Remote::Accept);
    sim.fwd.set_egress(&[], Some(&Spec::default()));
    let mut p = Pair::new(sim);
    let h = p.connect((WORLD, 80), 40000);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Established);
    let conn = p.sim.host.stream_to(SocketAddr::from((WORLD, 80))).unwrap();
    let rule = RuleKind::parse("deny 203.0.113.1 tcp:80").unwrap();
    p.sim
        .fwd
        .egress_mut(None)
        .unwrap()
        .insert(None, rule)
        .unwrap();
    // New rules leave open flows alone until asked.
    p.drive(10);
    assert_eq!(p.tcp(h).state(), State::Established);
    let n = p.sim.with_io(|fwd, io| fwd.reset_denied_flows(io));
    assert_eq!(n, 1);
    p.drive(10);
    assert_eq!(p.tcp(h).state(), State::Closed, "the guest got a RST");
    let closed = p.sim.host.closed.last().unwrap();
    assert_eq!((closed.id, closed.how), (conn, Close::Reset));
    assert_eq!(p.sim.fwd.counters().egress_reset, 1);
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
}

#[test]
fn dns_flows_opened_before_a_policy_change_learn_into_the_policy_in_force() {
    const WORLD2: [u8; 4] = [203, 0, 113, 2];
    let mut cfg = Sim::config(true);
    cfg.nameservers = vec![SocketAddr::from((NS, 53))];
    let mut sim = Sim::with_config(cfg);
    sim.host.tcp(SocketAddr::from((WORLD, 443)), Remote::Accept);
    sim.host
        .tcp(SocketAddr::from((WORLD2, 443)), Remote::Accept);
    let org = spec(&["allow-domain www.example.org"], Action::Deny);
    sim.fwd.set_egress(&[], Some(&org));
    // The DNS flow opens under the first policy.
    sim.send(&udp_frame(
        [10, 0, 2, 3],
        4445,
        53,
        &query(1, "www.example.org"),
    ));
    let sock = sim
        .host
        .dgram_to(SocketAddr::from((NS, 53)))
        .expect("asked");
    sim.host.take_sent(sock);
    let mut p = Pair::new(sim);
    // The network's policy is replaced: the answer comes on the flow opened before.
    let com = spec(&["allow-domain www.example.com"], Action::Deny);
    p.sim.fwd.set_egress(&[], Some(&com));
    let q = query(2, "www.example.com");
    p.sim.send(&udp_frame([10, 0, 2, 3], 4445, 53, &q));
    assert_eq!(p.sim.host.take_sent(sock), std::slice::from_ref(&q));
    p.sim.host.dgram_reply(sock, &answer(&q, WORLD, 300));
    p.drive(100);
    assert_eq!(p.sim.fwd.egress(None).unwrap().learned_total(), 1);
    // Over 1 s: the guest's stack asks ARP for the DNS address first (to answer the
    // datagrams to its port 4445, which has no socket) and waits a second before asking
    // for the gateway's.
    let h = p.connect((WORLD, 443), 40001);
    p.drive(2000);
    assert_eq!(p.tcp(h).state(), State::Established);
    // A member's policy made at run time learns from the same flow.
    p.sim.fwd.set_egress(&[], None);
    let guest = std::net::IpAddr::from(GUEST);
    let net = spec(&["allow-domain api.example.net"], Action::Deny);
    p.sim.fwd.set_egress(&[guest], Some(&net));
    let q = query(3, "api.example.net");
    p.sim.send(&udp_frame([10, 0, 2, 3], 4445, 53, &q));
    assert_eq!(p.sim.host.take_sent(sock), std::slice::from_ref(&q));
    p.sim.host.dgram_reply(sock, &answer(&q, WORLD2, 300));
    p.drive(100);
    assert_eq!(p.sim.fwd.egress(Some(guest)).unwrap().learned_total(), 1);
    let h = p.connect((WORLD2, 443), 40002);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Established);
    assert_eq!(p.sim.host.opened, 3, "one DNS flow, two connections");
}

/// A guest link that takes no frame: the gateway's transmit queue fills.
struct Stuck;

impl FrameSink for Stuck {
    fn send_frame(&mut self, _port: PortId, _frame: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
}

#[test]
fn allowed_queries_go_upstream_while_the_guest_link_is_full() {
    let mut cfg = Sim::config(true);
    cfg.nameservers = vec![SocketAddr::from((NS, 53))];
    let mut sim = Sim::with_config(cfg);
    sim.fwd.set_egress(
        &[],
        Some(&spec(&["allow-domain www.example.org"], Action::Deny)),
    );
    let now = sim.now();
    let mut io = Io {
        host: &mut sim.host,
        tap: &mut Stuck,
    };
    // NXDOMAIN answers the guest does not take, until they no longer fit.
    let mut id = 0;
    while sim.fwd.counters().udp_send_dropped == 0 {
        id += 1;
        assert!(id < 10_000, "the transmit queue never fills");
        let mut f = udp_frame([10, 0, 2, 3], 4444, 53, &query(id, "evil.test"));
        sim.fwd.handle_frame(now, &mut f, &mut io);
        sim.fwd.flush(io.tap);
    }
    let refused = sim.fwd.counters().egress_names_refused;
    // An allowed query still goes to the resolver.
    let q = query(id + 1, "www.example.org");
    sim.fwd
        .handle_frame(now, &mut udp_frame([10, 0, 2, 3], 4445, 53, &q), &mut io);
    sim.fwd.poll_flows(now, &mut io);
    let sock = sim
        .host
        .dgram_to(SocketAddr::from((NS, 53)))
        .expect("the allowed query was dropped");
    assert_eq!(sim.host.take_sent(sock), std::slice::from_ref(&q));
    let c = sim.fwd.counters();
    assert_eq!((c.udp_send_dropped, c.egress_names_refused), (1, refused));
}
