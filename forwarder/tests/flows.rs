//! Deterministic simulation of flows end to end: a guest (smoltcp, or frames built with
//! etherparse), the forwarder, and the in-memory host, on a fake clock (see `common`).
//! No socket, no sleep: timeouts of seconds run in microseconds, every run is the same.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::pair::Pair;
use common::*;
use etherparse::{Icmpv4Type, PacketBuilder, TransportSlice};
use forwarder::port::Proto;
use forwarder::Close;
use smoltcp::socket::tcp::State;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A guest connected through the gateway to the host's loopback port 8080, established;
/// returns the pair, the guest socket and the host stream.
fn established() -> (Pair, smoltcp::iface::SocketHandle, usize) {
    let mut sim = Sim::new(true);
    sim.host.tcp(loopback(8080), Remote::Accept);
    let mut p = Pair::new(sim);
    let h = p.connect((GW, 8080), 40000);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Established);
    let conn = p.sim.host.stream_to(loopback(8080)).expect("host stream");
    (p, h, conn)
}

/// The ICMPv4 messages the guest was sent, with their source.
fn icmp_seen(frames: &[Vec<u8>]) -> Vec<([u8; 4], Icmpv4Type)> {
    seen(frames, |ip, t| match t {
        TransportSlice::Icmpv4(icmp) => Some((ip.header().source(), icmp.icmp_type())),
        _ => None,
    })
}

/// The UDP datagrams in `frames`: (source, destination, payload).
fn udp_seen(frames: &[Vec<u8>]) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
    seen(frames, |ip, t| {
        let TransportSlice::Udp(u) = t else {
            return None;
        };
        let h = ip.header();
        Some((
            SocketAddr::from((h.source(), u.source_port())),
            SocketAddr::from((h.destination(), u.destination_port())),
            u.payload().to_vec(),
        ))
    })
}

/// The TCP segments in `frames` sent to the guest: (payload, FIN, RST).
fn tcp_seen(frames: &[Vec<u8>]) -> Vec<(Vec<u8>, bool, bool)> {
    seen(frames, |_, t| match t {
        TransportSlice::Tcp(t) => Some((t.payload().to_vec(), t.fin(), t.rst())),
        _ => None,
    })
}

#[test]
fn tcp_data_both_ways_then_both_close() {
    let (mut p, h, conn) = established();
    p.tcp(h).send_slice(b"hello host").unwrap();
    p.drive(10);
    assert_eq!(p.sim.host.peer_read_all(conn), b"hello host");
    p.sim.host.peer_write(conn, b"hello guest");
    p.drive(10);
    let mut buf = [0u8; 64];
    let n = p.tcp(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello guest");

    p.tcp(h).close();
    p.drive(10);
    assert!(
        p.sim.host.stream(conn).fwd_fin,
        "the guest's FIN reaches the host"
    );
    p.sim.host.peer_fin(conn);
    p.drive(10);
    assert!(matches!(p.tcp(h).state(), State::TimeWait | State::Closed));
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    let closed = p.sim.host.closed.last().unwrap();
    assert_eq!(
        (closed.id, closed.how, closed.fin),
        (conn, Close::Clean, true)
    );
    let c = p.sim.fwd.counters();
    assert_eq!((c.tcp_opened, c.tcp_closed), (1, 1));
}

#[test]
fn guest_half_close_host_keeps_sending() {
    let (mut p, h, conn) = established();
    p.tcp(h).close();
    p.drive(10);
    assert!(p.sim.host.stream(conn).fwd_fin);
    assert_eq!(p.tcp(h).state(), State::FinWait2);
    // The host's side is still open: its data reaches the guest.
    let data = vec![0x42u8; 100_000];
    let mut sent = 0;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < data.len() {
        sent += p.sim.host.peer_write(conn, &data[sent..]);
        p.drive(5);
        while let Ok(n) = p.tcp(h).recv_slice(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, data);
    p.sim.host.peer_fin(conn);
    p.drive(10);
    assert!(matches!(p.tcp(h).state(), State::TimeWait | State::Closed));
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
}

#[test]
fn host_half_close_guest_keeps_sending() {
    let (mut p, h, conn) = established();
    p.sim.host.peer_fin(conn);
    p.drive(10);
    assert_eq!(
        p.tcp(h).state(),
        State::CloseWait,
        "the host's FIN reaches the guest"
    );
    assert!(!p.sim.host.stream(conn).fwd_fin);
    p.tcp(h).send_slice(b"after your FIN").unwrap();
    p.drive(10);
    assert_eq!(p.sim.host.peer_read_all(conn), b"after your FIN");
    p.tcp(h).close();
    p.drive(10);
    assert!(matches!(p.tcp(h).state(), State::Closed | State::TimeWait));
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(p.sim.host.closed.last().unwrap().how, Close::Clean);
}

#[test]
fn host_reset_resets_the_guest() {
    let (mut p, h, conn) = established();
    p.sim.host.peer_reset(conn);
    p.drive(10);
    assert_eq!(p.tcp(h).state(), State::Closed, "RST to the guest");
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(p.sim.host.closed.last().unwrap().how, Close::Reset);
}

/// The host's last data and its FIN come in one event: one read takes both (a short read
/// after the peer's FIN can only be followed by the end of stream), and the guest gets
/// them in one segment.
#[test]
fn host_data_and_fin_take_one_read_and_one_segment() {
    let (mut p, h, conn) = established();
    p.seen.clear();
    let reads = p.sim.host.stream(conn).reads;
    p.sim.host.peer_write(conn, b"last words");
    p.sim.host.peer_fin(conn);
    p.drive(10);
    assert_eq!(p.sim.host.stream(conn).reads - reads, 1, "one read");
    assert_eq!(
        tcp_seen(&p.seen),
        vec![(b"last words".to_vec(), true, false)],
        "data and FIN in one segment"
    );
    let mut buf = [0u8; 64];
    let n = p.tcp(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"last words");
    assert_eq!(p.tcp(h).state(), State::CloseWait);
}

/// Data then a reset in one event: the short read is not taken for an end of stream, the
/// reset is read and passed on.
#[test]
fn host_data_then_reset_is_still_a_reset() {
    let (mut p, h, conn) = established();
    p.seen.clear();
    p.sim.host.peer_write(conn, b"partial");
    p.sim.host.peer_reset(conn);
    p.drive(10);
    let seen = tcp_seen(&p.seen);
    assert!(seen.iter().all(|&(_, fin, _)| !fin), "no FIN: {seen:?}");
    assert!(seen.iter().any(|&(_, _, rst)| rst), "RST: {seen:?}");
    assert_eq!(p.tcp(h).state(), State::Closed);
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(p.sim.host.closed.last().unwrap().how, Close::Reset);
}

#[test]
fn guest_reset_resets_the_host() {
    let (mut p, h, conn) = established();
    p.tcp(h).abort();
    p.drive(10);
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    let closed = p.sim.host.closed.last().unwrap();
    assert_eq!((closed.id, closed.how), (conn, Close::Reset));
}

#[test]
fn refused_connect_is_a_rst_to_the_guest() {
    let mut sim = Sim::new(true);
    sim.host.tcp(loopback(8080), Remote::Refuse);
    let mut p = Pair::new(sim);
    let h = p.connect((GW, 8080), 40000);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Closed);
    assert_eq!(p.sim.fwd.counters().tcp_refused, 1);
    assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(p.sim.host.open_sockets(), 0);
}

#[test]
fn unreachable_connects_are_icmp_errors_from_the_gateway() {
    for (remote, code) in [
        (Remote::Unreachable, 1u8),
        (Remote::FailNow(libc::ENETUNREACH), 0),
        (Remote::FailNow(libc::EACCES), 13),
    ] {
        let mut sim = Sim::new(true);
        sim.host.tcp(loopback(8080), remote);
        let mut p = Pair::new(sim);
        p.connect((GW, 8080), 40000);
        p.drive(100);
        let icmp = icmp_seen(&p.seen);
        let unreachable: Vec<_> = icmp
            .iter()
            .filter_map(|(src, t)| match t {
                Icmpv4Type::DestinationUnreachable(h) => Some((*src, h.code_u8())),
                _ => None,
            })
            .collect();
        assert_eq!(unreachable, [(GW, code)], "{remote:?}");
        assert_eq!(p.sim.fwd.counters().tcp_unreachable, 1, "{remote:?}");
        assert_eq!(p.sim.fwd.flow_counts(), (0, 0, 0));
        assert_eq!(p.sim.host.open_sockets(), 0);
    }
}

#[test]
fn syn_flood_into_a_black_hole_drains_on_the_fake_clock() {
    let mut cfg = Sim::config(true);
    cfg.limits.tcp_half_open = 8;
    let mut sim = Sim::with_config(cfg);
    sim.host.default_tcp = Remote::Silent;
    for i in 0..20u16 {
        sim.send(&tcp_frame(GW, 10_000 + i, 80, 1, |b| b.syn(), &[]));
    }
    assert_eq!(sim.fwd.half_open(), 8);
    assert_eq!(
        sim.fwd.counters().tcp_table_full,
        12,
        "refused beyond the limit"
    );
    assert_eq!(sim.host.open_sockets(), 8);
    // Just before the connect timeout nothing gave up; just after, everything did.
    sim.run_for(forwarder::tcp::CONNECT_TIMEOUT.total_millis() - 10);
    assert_eq!(sim.fwd.half_open(), 8);
    sim.run_for(20);
    assert_eq!(sim.fwd.half_open(), 0);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(sim.fwd.counters().tcp_unreachable, 8);
    assert_eq!(sim.host.open_sockets(), 0);
    // The table takes new flows again.
    sim.send(&tcp_frame(GW, 30_000, 80, 1, |b| b.syn(), &[]));
    assert_eq!(sim.fwd.half_open(), 1);
}

#[test]
fn tcp_table_full_is_a_rst() {
    let mut cfg = Sim::config(true);
    cfg.limits.tcp_flows = 2;
    let mut sim = Sim::with_config(cfg);
    sim.host.default_tcp = Remote::Accept;
    for i in 0..3u16 {
        sim.send(&tcp_frame(GW, 10_000 + i, 80, 1, |b| b.syn(), &[]));
    }
    let rst = sim
        .wire
        .0
        .iter()
        .filter_map(|f| tcp_of(f))
        .filter(|(t, _, _)| t.rst);
    assert_eq!(
        rst.map(|(t, _, _)| t.destination_port).collect::<Vec<_>>(),
        [10_002]
    );
    assert_eq!(sim.fwd.counters().tcp_table_full, 1);
    assert_eq!(sim.fwd.flow_counts().0, 2);
}

#[test]
fn udp_association_lives_while_used_and_expires_when_idle() {
    let mut sim = Sim::new(true);
    let idle = Sim::config(true).udp_idle.total_millis();
    sim.send(&udp_frame(GW, 4444, 5353, b"one"));
    let sock = sim.host.dgram_to(loopback(5353)).unwrap();
    sim.run_for(idle / 2);
    sim.send(&udp_frame(GW, 4444, 5353, b"two"));
    assert_eq!(sim.host.take_sent(sock), [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(sim.fwd.counters().udp_opened, 1, "one association");
    // A reply keeps it too.
    sim.run_for(idle / 2);
    sim.host.dgram_reply(sock, b"back");
    sim.run_for(idle - 10);
    assert_eq!(
        sim.fwd.flow_counts(),
        (0, 1, 0),
        "alive: used {idle} ms ago at most"
    );
    sim.run_for(20);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0), "idle: closed");
    assert_eq!(sim.fwd.counters().udp_closed, 1);
    assert_eq!(sim.host.closed.last().unwrap().peer, Some(loopback(5353)));
    let replies = udp_seen(&sim.wire.0);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].2, b"back");
}

#[test]
fn host_icmp_errors_for_udp_reach_the_guest() {
    let mut sim = Sim::new(true);
    // The host's socket hears port unreachable for an earlier datagram.
    sim.send(&udp_frame(GW, 4444, 5353, b"anyone?"));
    let sock = sim.host.dgram_to(loopback(5353)).unwrap();
    sim.host.dgram_error(sock, libc::ECONNREFUSED);
    sim.run_for(1);
    // The host has no route to another destination at all.
    let far = [203, 0, 113, 7];
    sim.host
        .unreachable
        .insert(IpAddr::from(far), libc::ENETUNREACH);
    sim.send(&udp_frame(far, 4445, 53, b"q"));
    let icmp = icmp_seen(&sim.wire.0);
    let codes: Vec<_> = icmp
        .iter()
        .filter_map(|(src, t)| match t {
            Icmpv4Type::DestinationUnreachable(h) => Some((*src, h.code_u8())),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        [(GW, 3), (GW, 0)],
        "port unreachable, network unreachable"
    );
    assert_eq!(sim.fwd.counters().udp_host_errors, 1);
}

/// A DNS query with ID `id` for `example.org A`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x07example\x03org\x00\x00\x01\x00\x01");
    q
}

#[test]
fn dns_fails_over_after_a_second_and_answers_servfail_at_four() {
    let (a, b) = (
        SocketAddr::from(([192, 0, 2, 1], 53)),
        SocketAddr::from(([192, 0, 2, 2], 53)),
    );
    let mut cfg = Sim::config(true);
    cfg.nameservers = vec![a, b];
    let mut sim = Sim::with_config(cfg);
    sim.send(&udp_frame([10, 0, 2, 3], 4444, 53, &dns_query(0x1234)));
    let sock = sim.host.dgram_to(a).expect("asked the first nameserver");
    assert_eq!(sim.host.take_sent(sock), [dns_query(0x1234)]);
    let per_server = forwarder::dns_relay::PER_SERVER.total_millis();
    sim.run_for(per_server - 1);
    assert!(sim.host.take_sent(sock).is_empty());
    sim.run_for(2);
    assert_eq!(sim.host.dgram_to(b), Some(sock), "the flow moved on");
    assert_eq!(sim.host.take_sent(sock), [dns_query(0x1234)], "asked again");
    assert_eq!(sim.fwd.counters().dns_failovers, 1);
    // Nobody answers: SERVFAIL 4 s after the query, not before.
    let total = forwarder::dns_relay::TOTAL.total_millis();
    sim.run_for(total - per_server - 10);
    assert!(udp_seen(&sim.wire.0).is_empty());
    sim.run_for(20);
    let replies = udp_seen(&sim.wire.0);
    assert_eq!(replies.len(), 1);
    let (from, to, reply) = &replies[0];
    assert_eq!(
        (*from, *to),
        (
            SocketAddr::from(([10, 0, 2, 3], 53)),
            SocketAddr::from((GUEST, 4444))
        )
    );
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(reply[3] & 0xf, 2, "SERVFAIL");
    assert_eq!(sim.fwd.counters().dns_servfail, 1);
}

#[test]
fn dns_answer_from_the_second_nameserver_reaches_the_guest() {
    let (a, b) = (
        SocketAddr::from(([192, 0, 2, 1], 53)),
        SocketAddr::from(([192, 0, 2, 2], 53)),
    );
    let mut cfg = Sim::config(true);
    cfg.nameservers = vec![a, b];
    let mut sim = Sim::with_config(cfg);
    sim.send(&udp_frame([10, 0, 2, 3], 4444, 53, &dns_query(7)));
    let sock = sim.host.dgram_to(a).unwrap();
    sim.run_for(1001);
    assert_eq!(sim.host.dgram_to(b), Some(sock));
    let mut answer = dns_query(7);
    answer[2] |= 0x80;
    sim.host.dgram_reply(sock, &answer);
    sim.run_for(5000);
    let replies = udp_seen(&sim.wire.0);
    assert_eq!(replies.len(), 1, "the answer, and no SERVFAIL after it");
    assert_eq!(replies[0].2, answer);
    assert_eq!(sim.fwd.counters().dns_answers, 1);
    assert_eq!(sim.fwd.counters().dns_servfail, 0);
}

#[test]
fn published_tcp_port_brings_a_connection_in() {
    let mut p = Pair::new(Sim::new(true));
    let addr = SocketAddr::from(([0, 0, 0, 0], 2222));
    let rule = p
        .sim
        .fwd
        .add_port(Proto::Tcp, addr, None, 22, &mut p.sim.host)
        .unwrap();
    assert_eq!(rule.guest.port(), 22);
    let h = p.listen(22);
    let client = SocketAddr::from(([203, 0, 113, 9], 5555));
    p.sim.host.connect_in(addr, client);
    p.drive(100);
    assert_eq!(p.tcp(h).state(), State::Established);
    let remote = p.tcp(h).remote_endpoint().unwrap();
    assert_eq!(
        (remote.addr, remote.port),
        (smoltcp::wire::IpAddress::v4(203, 0, 113, 9), 5555),
        "the guest sees the client as it is"
    );
    let conn = p.sim.host.stream_to(client).unwrap();
    p.sim.host.peer_write(conn, b"SSH-2.0-client\r\n");
    p.drive(10);
    let mut buf = [0u8; 64];
    let n = p.tcp(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"SSH-2.0-client\r\n");
    p.tcp(h).send_slice(b"SSH-2.0-guest\r\n").unwrap();
    p.drive(10);
    assert_eq!(p.sim.host.peer_read_all(conn), b"SSH-2.0-guest\r\n");
    // Unpublished: the connection made through it keeps going, the listener is closed.
    p.sim
        .with_io(|fwd, io| fwd.remove_port(rule.id, io))
        .unwrap();
    assert!(p.sim.host.port_at(addr).is_none());
    p.sim.host.peer_write(conn, b"more");
    p.drive(10);
    let n = p.tcp(h).recv_slice(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"more");
}

#[test]
fn published_udp_port_association_and_replies() {
    let mut sim = Sim::new(true);
    let addr = SocketAddr::from(([0, 0, 0, 0], 5353));
    sim.fwd
        .add_port(Proto::Udp, addr, None, 53, &mut sim.host)
        .unwrap();
    // The guest has spoken (its MAC address is known).
    sim.send(&udp_frame(GW, 1, 9, b"hi"));
    let client = SocketAddr::from(([203, 0, 113, 9], 4000));
    let local = IpAddr::from([192, 0, 2, 10]);
    sim.host.datagram_in(addr, client, Some(local), b"query");
    sim.run_for(1);
    let got = udp_seen(&sim.wire.0);
    assert_eq!(
        got,
        [(client, SocketAddr::from((GUEST, 53)), b"query".to_vec())]
    );
    sim.send(&udp_frame([203, 0, 113, 9], 53, 4000, b"answer"));
    assert_eq!(
        sim.host.port_sent(addr),
        [(Some(client), Some(local), b"answer".to_vec())],
        "the reply leaves from the address the client used"
    );
    assert_eq!(sim.fwd.counters().udp_opened, 2);
}

/// A loopback `client`'s datagram to the spliced `port`, arriving on `local`: it leaves on
/// its association's socket to `to`, whose answer comes back to the client through `port`,
/// from `local`. Returns the association's socket.
fn spliced_exchange(
    sim: &mut Sim,
    port: SocketAddr,
    (client, local): (SocketAddr, Option<IpAddr>),
    to: SocketAddr,
) -> usize {
    sim.host.datagram_in(port, client, local, b"q1");
    sim.run_for(1);
    let id = sim.host.dgram_to(to).expect("the association's socket");
    assert_eq!(sim.host.take_sent(id), [b"q1".to_vec()]);
    sim.host.dgram_reply(id, b"answer");
    sim.run_for(1);
    assert_eq!(
        sim.host.port_sent(port),
        [(Some(client), local, b"answer".to_vec())],
        "the reply leaves from the address the client sent to"
    );
    id
}

#[test]
fn loopback_datagrams_are_spliced_until_the_association_idles() {
    let udp = loopback(5353);
    let (mut sim, _) = splicing_port(Proto::Udp, udp, 53, None);
    let client = loopback(40000);
    let id = spliced_exchange(&mut sim, udp, (client, None), loopback(53));
    assert_eq!(sim.fwd.spliced_flows(), 1);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0), "not a guest flow");
    // The client's next datagram takes the same association.
    sim.host.datagram_in(udp, client, None, b"q2");
    sim.run_for(1);
    assert_eq!(sim.host.take_sent(id), [b"q2".to_vec()]);
    let c = sim.fwd.counters();
    assert_eq!((c.udp_handed_off, c.splice_bytes), (2, 10));
    assert!(sim.wire.0.is_empty(), "nothing crossed the guest link");
    // A reply keeps it alive too; it ends 180 s after the last datagram.
    let idle = forwarder::splice::UDP_IDLE.total_millis();
    sim.run_for(idle - 1000);
    sim.host.dgram_reply(id, b"late");
    sim.run_for(idle - 1000);
    assert_eq!(sim.fwd.spliced_flows(), 1, "kept by the reply");
    sim.run_for(2000);
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert!(
        sim.host.dgram_to(loopback(53)).is_none(),
        "its socket closed"
    );
    assert_eq!(sim.fwd.counters().splice_closed, 1);
}

/// A loopback client of a port published on the wildcard address gets the replies of its
/// spliced association from the local address its datagrams arrived on (127.0.0.2 here),
/// not the one the route picks: a `connect()`ed client only takes datagrams from its peer.
#[test]
fn spliced_replies_leave_from_the_address_the_client_sent_to() {
    let udp = SocketAddr::from(([0, 0, 0, 0], 5353));
    let (mut sim, _) = splicing_port(Proto::Udp, udp, 53, None);
    let local = IpAddr::from([127, 0, 0, 2]);
    spliced_exchange(&mut sim, udp, (loopback(40000), Some(local)), loopback(53));
    assert_eq!(sim.fwd.spliced_flows(), 1);
}

/// One client socket sending to two of the host's loopback addresses through a port
/// published on the wildcard address has an association for each, as a kernel NAT has a
/// connection for each: every reply leaves from the address its request went to, whatever
/// the order the replies come in.
#[test]
fn spliced_client_sending_to_two_local_addresses_gets_each_reply_from_its_own() {
    let udp = SocketAddr::from(([0, 0, 0, 0], 5353));
    let (mut sim, _) = splicing_port(Proto::Udp, udp, 53, None);
    let client = loopback(40000);
    let (one, two) = (IpAddr::from([127, 0, 0, 1]), IpAddr::from([127, 0, 0, 2]));
    sim.host.datagram_in(udp, client, Some(one), b"q1");
    sim.host.datagram_in(udp, client, Some(two), b"q2");
    sim.run_for(1);
    assert_eq!(
        sim.fwd.spliced_flows(),
        2,
        "an association per local address"
    );
    let ids = sim.host.dgrams_to(loopback(53));
    assert_eq!(ids.len(), 2);
    assert_eq!(sim.host.take_sent(ids[0]), [b"q1".to_vec()]);
    assert_eq!(sim.host.take_sent(ids[1]), [b"q2".to_vec()]);
    sim.host.dgram_reply(ids[1], b"a2");
    sim.run_for(1);
    sim.host.dgram_reply(ids[0], b"a1");
    sim.run_for(1);
    assert_eq!(
        sim.host.port_sent(udp),
        [
            (Some(client), Some(two), b"a2".to_vec()),
            (Some(client), Some(one), b"a1".to_vec())
        ]
    );
}

/// A published UDP port's spliced associations end with its rule: no socket of the rule
/// stays open (a socket kept for their replies would hold the host port), and the same
/// port is published again at once.
#[test]
fn spliced_associations_close_with_their_rule() {
    let udp = loopback(5353);
    let (mut sim, rule) = splicing_port(Proto::Udp, udp, 53, None);
    let mut seen = Vec::new();
    for (i, client) in [loopback(40000), loopback(40001)].into_iter().enumerate() {
        sim.host.datagram_in(udp, client, None, b"query");
        sim.run_for(1);
        // The association's socket: the one datagram socket not seen before.
        let id = (0..sim.host.socks.len())
            .find(|&i| {
                matches!(sim.host.socks[i], Some(common::host::Sock::Dgram(_)))
                    && !seen.contains(&i)
            })
            .expect("the association's socket");
        seen.push(id);
        assert_eq!(sim.host.take_sent(id), [b"query".to_vec()]);
        sim.host.dgram_reply(id, &[b'a', i as u8]);
        sim.run_for(1);
        assert_eq!(
            sim.host.port_sent(udp),
            [(Some(client), None, vec![b'a', i as u8])]
        );
    }
    assert_eq!(sim.fwd.spliced_flows(), 2);
    assert_eq!(sim.host.open_sockets(), 3, "the port and two associations");
    sim.with_io(|fwd, io| fwd.remove_port(rule.id, io)).unwrap();
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert_eq!(
        sim.host.open_sockets(),
        0,
        "the associations closed with the rule"
    );
    assert_eq!(sim.fwd.counters().splice_closed, 2);
    // Published again: a client's datagram opens a new association, whose reply leaves
    // through the new rule's socket.
    let rule = sim
        .fwd
        .add_port(Proto::Udp, udp, None, 53, &mut sim.host)
        .unwrap();
    sim.host.datagram_in(udp, loopback(40000), None, b"again");
    sim.run_for(1);
    let id = sim.host.dgram_to(loopback(53)).expect("a new association");
    assert_eq!(sim.host.take_sent(id), [b"again".to_vec()]);
    sim.host.dgram_reply(id, b"back");
    sim.run_for(1);
    assert_eq!(
        sim.host.port_sent(udp),
        [(Some(loopback(40000)), None, b"back".to_vec())]
    );
    sim.with_io(|fwd, io| fwd.remove_port(rule.id, io)).unwrap();
    assert_eq!(sim.host.open_sockets(), 0);
}

#[test]
fn spliced_associations_beyond_their_limit_are_dropped() {
    let udp = loopback(5353);
    let (mut sim, _) = splicing_port(Proto::Udp, udp, 53, Some(1));
    sim.host.datagram_in(udp, loopback(40000), None, b"a");
    sim.host.datagram_in(udp, loopback(40001), None, b"b");
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 1);
    assert_eq!(sim.fwd.counters().splice_table_full, 1);
    assert_eq!(sim.host.open_sockets(), 2, "the port and one association");
}

/// A simulation in pasta mode with a `-t` port on the host's loopback 2222 -> 22;
/// returns it and the port's address.
fn splicing(limit: usize) -> (Sim, SocketAddr) {
    let tcp = loopback(2222);
    let (sim, _) = splicing_port(Proto::Tcp, tcp, 22, Some(limit));
    (sim, tcp)
}

/// A simulation whose loopback clients are spliced (pasta mode), with `host` published to
/// the guest's `port`, and at most `limit` spliced flows if given; and the rule.
fn splicing_port(
    proto: Proto,
    host: SocketAddr,
    port: u16,
    limit: Option<usize>,
) -> (Sim, forwarder::port::PortRule) {
    let mut cfg = Sim::config(true);
    cfg.loopback_handoff = true;
    if let Some(limit) = limit {
        cfg.limits.spliced = limit;
    }
    let mut sim = Sim::with_config(cfg);
    let rule = sim
        .fwd
        .add_port(proto, host, None, port, &mut sim.host)
        .unwrap();
    (sim, rule)
}

#[test]
fn loopback_client_is_spliced_and_relayed_both_ways() {
    let (mut sim, tcp) = splicing(8);
    let client = loopback(40000);
    sim.host.connect_in(tcp, client);
    sim.run_for(1);
    let ids = sim.host.pairs();
    assert_eq!(ids.len(), 1, "one spliced flow");
    let id = ids[0];
    let pair = sim.host.pair(id);
    assert_eq!(pair.client, client);
    assert_eq!(pair.to, forwarder::SpliceTo::Guest { client, port: 22 });
    assert_eq!(sim.fwd.spliced_flows(), 1);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0), "not a guest flow");
    sim.host.client_write(id, b"ssh-hello");
    sim.run_for(1);
    sim.host.ns_write(id, b"welcome");
    sim.run_for(1);
    let pair = sim.host.pair(id);
    assert_eq!(pair.to_ns, b"ssh-hello");
    assert_eq!(pair.to_client, b"welcome");
    let c = sim.fwd.counters();
    assert_eq!((c.tcp_handed_off, c.splice_bytes), (1, 16));
    assert!(sim.wire.0.is_empty(), "nothing crossed the guest link");
}

#[test]
fn spliced_flow_half_closes_then_ends() {
    let (mut sim, tcp) = splicing(8);
    sim.host.connect_in(tcp, loopback(40000));
    sim.run_for(1);
    let id = sim.host.pairs()[0];
    sim.host.client_write(id, b"request");
    sim.host.client_fin(id);
    sim.run_for(1);
    let pair = sim.host.pair(id);
    assert_eq!(pair.to_ns, b"request");
    assert!(pair.ns_got_fin && !pair.client_got_fin, "half-closed");
    // The server answers after the client's FIN, then closes.
    sim.host.ns_write(id, b"reply");
    sim.run_for(1);
    assert_eq!(sim.host.pair(id).to_client, b"reply");
    assert_eq!(sim.fwd.spliced_flows(), 1, "open while the server sends");
    sim.host.ns_fin(id);
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert!(sim.host.pairs().is_empty());
    assert_eq!(
        sim.host.closed.last().map(|c| (c.id, c.how)),
        Some((id, Close::Clean))
    );
    assert_eq!(sim.fwd.counters().splice_closed, 1);
}

#[test]
fn spliced_flow_ends_on_a_reset() {
    let (mut sim, tcp) = splicing(8);
    sim.host.connect_in(tcp, loopback(40000));
    sim.run_for(1);
    let id = sim.host.pairs()[0];
    sim.host.client_reset(id);
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert!(sim.host.pairs().is_empty());
}

#[test]
fn spliced_flows_beyond_their_limit_are_refused() {
    let (mut sim, tcp) = splicing(2);
    for port in 40000..40003 {
        sim.host.connect_in(tcp, loopback(port));
    }
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 2);
    assert_eq!(sim.host.pairs().len(), 2);
    let c = sim.fwd.counters();
    assert_eq!((c.tcp_handed_off, c.splice_table_full), (3, 1));
    assert_eq!(sim.host.open_sockets(), 3, "the listener and two pairs");
    // A flow that ends makes room.
    let id = sim.host.pairs()[0];
    sim.host.client_reset(id);
    sim.run_for(1);
    sim.host.connect_in(tcp, loopback(40010));
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 2);
    assert_eq!(sim.fwd.counters().splice_table_full, 1);
}

#[test]
fn splice_that_cannot_reach_the_namespace_closes_the_client() {
    let (mut sim, tcp) = splicing(8);
    sim.host.splice_error = Some(libc::ECONNREFUSED);
    sim.host.connect_in(tcp, loopback(40000));
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert_eq!(sim.host.open_sockets(), 1, "only the listener");
    // The id is free again: the next connection takes it.
    sim.host.splice_error = None;
    sim.host.connect_in(tcp, loopback(40001));
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 1);
}

#[test]
fn ping_through_a_ping_socket() {
    let mut sim = Sim::new(true);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
        .ipv4(GUEST, [203, 0, 113, 1], 64)
        .icmpv4_echo_request(0x55, 1)
        .write(&mut frame, b"ping!")
        .unwrap();
    sim.send(&frame);
    sim.run_for(1);
    let replies: Vec<_> = icmp_seen(&sim.wire.0);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, [203, 0, 113, 1]);
    assert!(matches!(replies[0].1, Icmpv4Type::EchoReply(e) if e.id == 0x55 && e.seq == 1));
    // Idle ping flows close.
    sim.run_for(forwarder::icmp::IDLE.total_millis() + 10);
    assert_eq!(sim.fwd.flow_counts(), (0, 0, 0));
    assert_eq!(sim.fwd.counters().icmp_closed, 1);
}

#[test]
fn udp_table_full_drops_and_counts() {
    let mut cfg = Sim::config(true);
    cfg.limits.udp_flows = 3;
    let mut sim = Sim::with_config(cfg);
    for i in 0..5u16 {
        sim.send(&udp_frame(GW, 4000 + i, 5353, b"x"));
    }
    assert_eq!(sim.fwd.flow_counts().1, 3);
    assert_eq!(sim.fwd.counters().udp_table_full, 2);
    assert_eq!(sim.host.open_sockets(), 3);
}

/// A `-T` listener on the namespace's 127.0.0.1:3000 relayed to the host's port 4000.
#[test]
fn namespace_listener_splices_connections_to_the_host() {
    let mut sim = Sim::new(true);
    let ns = loopback(3000);
    let to = loopback(4000);
    let l = sim
        .with_io(|fwd, io| fwd.add_splice_listener(Proto::Tcp, ns, to, io))
        .unwrap();
    let client = loopback(45000);
    sim.host.connect_in(ns, client);
    sim.run_for(1);
    let id = sim.host.pairs()[0];
    assert_eq!(sim.host.pair(id).to, forwarder::SpliceTo::Host(to));
    sim.host.client_write(id, b"GET");
    sim.host.ns_write(id, b"200");
    sim.run_for(1);
    assert_eq!(sim.host.pair(id).to_ns, b"GET");
    assert_eq!(sim.host.pair(id).to_client, b"200");
    sim.host.client_fin(id);
    sim.host.ns_fin(id);
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 0, "both sides closed");
    let c = sim.fwd.counters();
    assert_eq!(
        (c.splice_bytes, c.splice_closed, c.tcp_handed_off),
        (6, 1, 0)
    );
    // Removed: the listener is closed.
    sim.with_io(|fwd, io| fwd.remove_splice_listener(l, io));
    assert!(sim.host.port_at(ns).is_none());
}

/// A `-U` socket on the namespace's 127.0.0.1:5300 relayed to the host's port 53: one
/// association per client, replies back through the listener, expiry on the fake clock,
/// and the associations end with their listener.
#[test]
fn namespace_udp_listener_keeps_an_association_per_client() {
    let mut sim = Sim::new(true);
    let ns = loopback(5300);
    let to = loopback(53);
    let l = sim
        .with_io(|fwd, io| fwd.add_splice_listener(Proto::Udp, ns, to, io))
        .unwrap();
    let client = loopback(46000);
    let a = spliced_exchange(&mut sim, ns, (client, None), to);
    sim.host.datagram_in(ns, client, None, b"again");
    sim.run_for(1);
    assert_eq!(
        sim.host.take_sent(a),
        [b"again".to_vec()],
        "the same association"
    );
    assert_eq!(sim.fwd.spliced_flows(), 1);
    // Idle for UDP_IDLE: gone.
    sim.run_for(forwarder::splice::UDP_IDLE.total_millis() + 10);
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert!(sim.host.dgram_to(to).is_none());
    // A new association ends with its listener.
    sim.host.datagram_in(ns, client, None, b"late");
    sim.run_for(1);
    assert_eq!(sim.fwd.spliced_flows(), 1);
    sim.with_io(|fwd, io| fwd.remove_splice_listener(l, io));
    assert_eq!(sim.fwd.spliced_flows(), 0);
    assert_eq!(sim.host.open_sockets(), 0);
    assert_eq!(sim.fwd.counters().splice_closed, 2);
}
