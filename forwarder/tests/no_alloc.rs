//! No allocation per packet: a counting global allocator watches the forwarder carry
//! steady-state TCP (both directions) and UDP (round trips) after a warm-up, over the
//! in-memory host (whose buffers are sized when a socket opens).
//! Our stand-in for passt's seccomp-blocked `brk`/`mmap`.
#![expect(
    unsafe_code,
    reason = "a counting global allocator needs `unsafe impl GlobalAlloc`"
)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Counting is on for this thread only: the test harness's other threads allocate.
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if ARMED.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only an atomic and a const thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One turn of the event loop without keeping the frames: the sink only notes the end
/// of the data the guest was sent (to acknowledge it) and UDP replies.
struct Tally {
    data_end: u32,
    udp_replies: usize,
}

impl forwarder::FrameSink for Tally {
    fn send_frame(&mut self, _port: forwarder::PortId, frame: &[u8]) -> std::io::Result<()> {
        if let Ok(p) = SlicedPacket::from_ethernet(frame) {
            match p.transport {
                Some(TransportSlice::Tcp(t)) if !t.payload().is_empty() => {
                    let end = t.sequence_number().wrapping_add(t.payload().len() as u32);
                    if end.wrapping_sub(self.data_end) as i32 > 0 {
                        self.data_end = end;
                    }
                }
                Some(TransportSlice::Udp(_)) => self.udp_replies += 1,
                _ => {}
            }
        }
        Ok(())
    }
}

fn turn(sim: &mut Sim, tally: &mut Tally) {
    sim.micros += 1000;
    let now = sim.now();
    finish_turn(&mut sim.fwd, &mut sim.host, now, tally);
}

fn guest_frame(sim: &mut Sim, frame: &mut [u8], tally: &mut Tally) {
    let now = sim.now();
    let mut io = forwarder::Io {
        host: &mut sim.host,
        tap: tally,
    };
    sim.fwd.handle_frame(now, frame, &mut io);
}

#[test]
fn steady_state_tcp_and_udp_allocate_nothing() {
    let (port, uport) = (8080, 7);
    let mut sim = Sim::new(true);
    sim.host
        .tcp(SocketAddr::from(([127, 0, 0, 1], port)), Remote::Accept);
    sim.send(&tcp_frame(GW, 40001, port, 1000, |b| b.syn(), &[]));
    let synack = sim
        .run_until(2000, |f| tcp_of(f).is_some_and(|(t, _, _)| t.syn && t.ack))
        .expect("SYN-ACK");
    let server_isn = tcp_of(&synack).unwrap().0.sequence_number;
    let host = sim
        .host
        .stream_to(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    let mut echo = None;

    const SEG: usize = 512;
    let chunk = [0x5au8; SEG];
    let mut seq = 1001u32;
    let mut tally = Tally {
        data_end: server_isn.wrapping_add(1),
        udp_replies: 0,
    };
    let mut frame = Vec::with_capacity(2048);
    let mut udp = Vec::with_capacity(256);
    let mut received = 0usize;

    let mut step = |sim: &mut Sim, tally: &mut Tally, seq: &mut u32| {
        // Guest -> host: one data segment acknowledging everything sent to the guest.
        frame.clear();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
            .ipv4(GUEST, GW, 64)
            .tcp(40001, port, *seq, 65535)
            .ack(tally.data_end)
            .psh()
            .write(&mut frame, &chunk)
            .unwrap();
        guest_frame(sim, &mut frame, tally);
        *seq = seq.wrapping_add(SEG as u32);
        // Guest -> host UDP datagram; the host echoes it.
        udp.clear();
        PacketBuilder::ethernet2(GUEST_MAC, GW_MAC)
            .ipv4(GUEST, GW, 64)
            .udp(5555, uport)
            .write(&mut udp, b"ping")
            .unwrap();
        guest_frame(sim, &mut udp, tally);
        turn(sim, tally);
        let echo = *echo.get_or_insert_with(|| {
            sim.host
                .dgram_to(SocketAddr::from(([127, 0, 0, 1], uport)))
                .unwrap()
        });
        sim.host.dgram_echo(echo);
        // Host -> guest: some data back; host reads what arrived.
        sim.host.peer_write(host, &chunk);
        received += sim.host.peer_discard(host);
        turn(sim, tally);
    };

    // Warm-up: buffers, tables and the timer heap reach their working size.
    for _ in 0..300 {
        step(&mut sim, &mut tally, &mut seq);
    }
    let replies_before = tally.udp_replies;
    let data_before = tally.data_end;

    ARMED.with(|a| a.set(true));
    for _ in 0..2000 {
        step(&mut sim, &mut tally, &mut seq);
    }
    ARMED.with(|a| a.set(false));
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);

    assert!(received >= 2000 * SEG, "host got {received} bytes");
    assert!(
        tally.udp_replies > replies_before + 1000,
        "UDP replies flowed"
    );
    assert!(
        tally.data_end.wrapping_sub(data_before) as usize > 1000 * SEG,
        "host data reached the guest"
    );
    assert_eq!(
        allocations, 0,
        "allocations while carrying steady-state traffic"
    );
}
