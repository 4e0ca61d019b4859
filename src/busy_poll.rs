//! Adaptive busy polling: the event loop polls epoll for a few microseconds before it
//! sleeps, while traffic is interactive.
//!
//! # Why
//!
//! A request that crosses usernet wakes three sleepers in turn: usernet, the peer, usernet
//! again. When usernet's CPU went idle while it waited, its wake-up costs an
//! inter-processor interrupt and the CPU's exit from idle; in a virtual machine whose idle
//! vCPUs halt (haltpoll with `guest_halt_poll_ns=0`, as on the benchmark machine) that is a
//! VM exit and re-entry, tens of microseconds each. Measured there (2 vCPUs, MTU 1500,
//! `sockperf pp` and `crr` through usernet to host loopback): blocking waits gave 50 µs per
//! round trip and 4,300 connections/s; polling for up to 50 µs before sleeping gave 21 µs
//! and 8,000/s (kernel veth: 38 µs, 10,000/s).
//!
//! # How much it spins
//!
//! Like the kernel's haltpoll governor, the window adapts to the gaps between events:
//!
//! - a wait that was over within `max` (an event came soon after we slept, or while we
//!   spun) sets the window to `max`: spinning pays off;
//! - a wait longer than `max` halves the window, down to zero below `max / 8`.
//!
//! So an idle or sporadic flow costs no spinning at all (after at most `2 * max` of it
//! once traffic stops), and a ping-pong whose peer answers within `max` is served
//! without sleeping, at the price of one busy CPU while it lasts.
//!
//! Streams are not spun for at all ([`BulkMeter`]: 32 KiB or more through the TAP within
//! the last one to two milliseconds): buffers on both sides hide the wake-up, and the CPU
//! is better left to the peers. Measured (medians of 3): a 65520-MTU TCP download used
//! 0.31 CPU s/GiB with `--busy-poll=0` and 0.42 spinning on every wait; a 1.2 Gbit/s
//! UDP stream towards the container, whose turns each carry one datagram, 2.4-3.0 without
//! spinning and 5.2 spinning. `--busy-poll=0` turns it off.

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

/// What the loop's waits did, for `get_stats` (section `loop`): the tests assert these,
/// which the loop controls, rather than the CPU time or sleeps the scheduler decides.
#[derive(Debug, Default, Clone, Copy)]
pub struct WaitStats {
    /// Waits that went to sleep in `epoll_wait` (possibly after spinning).
    pub sleeps: u64,
    /// Non-blocking polls made while spinning.
    pub spin_polls: u64,
    /// Waits that an event ended while spinning (a wake-up saved).
    pub spun_wakeups: u64,
    /// Time spent spinning, in microseconds.
    pub spin_us: u64,
}

/// The adaptive spin window.
#[derive(Debug)]
pub struct BusyPoll {
    max: Duration,
    window: Duration,
    stats: WaitStats,
}

impl BusyPoll {
    /// Spins at most `max` per wait; zero never spins.
    pub fn new(max: Duration) -> BusyPoll {
        BusyPoll {
            max,
            window: Duration::ZERO,
            stats: WaitStats::default(),
        }
    }

    /// What the waits so far did.
    pub fn stats(&self) -> WaitStats {
        self.stats
    }

    /// How long the next wait may spin.
    #[cfg(test)]
    fn window(&self) -> Duration {
        self.window
    }

    /// Waits like [`Poll::poll`]: first polls without blocking for up to the window
    /// (never past `timeout`), then sleeps for the rest of `timeout`. With `spin` false
    /// it just sleeps (the caller knows the traffic is bulk), leaving the window as is.
    ///
    /// # Errors
    /// What `epoll_wait` returns (`Interrupted` included).
    pub fn wait(
        &mut self,
        poll: &mut Poll,
        events: &mut Events,
        timeout: Option<Duration>,
        spin: bool,
    ) -> io::Result<()> {
        if !spin || self.max.is_zero() || timeout == Some(Duration::ZERO) {
            if timeout != Some(Duration::ZERO) {
                self.stats.sleeps += 1;
            }
            return poll.poll(events, timeout);
        }
        let start = Instant::now();
        let spin = timeout.map_or(self.window, |t| t.min(self.window));
        if !spin.is_zero() {
            loop {
                self.stats.spin_polls += 1;
                let polled = poll.poll(events, Some(Duration::ZERO));
                if polled.is_ok() && events.is_empty() && start.elapsed() < spin {
                    continue;
                }
                self.stats.spin_us += start.elapsed().as_micros() as u64;
                polled?;
                if !events.is_empty() {
                    self.stats.spun_wakeups += 1;
                    return Ok(());
                }
                break;
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                // A timer is due: the caller has work, nothing to learn.
                return Ok(());
            }
        }
        let rest = timeout.map(|t| t.saturating_sub(start.elapsed()));
        self.stats.sleeps += 1;
        poll.poll(events, rest)?;
        self.learn(start.elapsed());
        Ok(())
    }

    /// Adapts the window to a wait that spun in vain and then slept for `idle` in all.
    fn learn(&mut self, idle: Duration) {
        self.window = if idle <= self.max {
            self.max
        } else if self.window / 2 < self.max / 8 {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }
}

/// Bytes within a [`BulkMeter`] period and the one before it from which traffic is a
/// stream: 32 KiB per 1-2 ms, 130-260 Mbit/s. A 1-byte ping-pong moves about 8 KiB/ms
/// of frames, a connect/close loop less.
const BULK_BYTES: u64 = 32 << 10;

/// Length of a [`BulkMeter`] period.
const PERIOD: Duration = Duration::from_millis(1);

/// Tells streams (no spinning) from interactive traffic by the bytes moved lately. Per
/// turn is not enough: a stream that usernet keeps up with comes one datagram per turn.
#[derive(Debug)]
pub struct BulkMeter {
    period_start: Instant,
    /// Bytes in the current period and in the one before.
    current: u64,
    previous: u64,
    /// The running total last seen.
    total: u64,
}

impl BulkMeter {
    /// A meter that has seen nothing.
    pub fn new(now: Instant) -> BulkMeter {
        BulkMeter {
            period_start: now,
            current: 0,
            previous: 0,
            total: 0,
        }
    }

    /// Takes `total`, a running count of bytes moved, at `now`; true when the bytes of
    /// this period and the last reach [`BULK_BYTES`].
    pub fn is_bulk(&mut self, now: Instant, total: u64) -> bool {
        let moved = total.saturating_sub(self.total);
        self.total = total;
        let elapsed = now.saturating_duration_since(self.period_start);
        if elapsed >= PERIOD {
            self.previous = if elapsed >= 2 * PERIOD {
                0
            } else {
                self.current
            };
            self.current = 0;
            self.period_start = now;
        }
        self.current += moved;
        self.current + self.previous >= BULK_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_of_single_datagrams_is_bulk() {
        let t0 = Instant::now();
        let mut m = BulkMeter::new(t0);
        let mut total = 0;
        let mut bulk = Vec::new();
        // 1.2 Gbit/s of 1428-byte frames, one per turn: one every 9.5 µs, 2 ms long.
        for i in 0..210u32 {
            total += 1428;
            bulk.push(m.is_bulk(t0 + Duration::from_nanos(9_500) * i, total));
        }
        let first = bulk.iter().position(|&b| b).expect("never bulk");
        assert!(
            first <= 23,
            "bulk only after {first} datagrams (32 KiB is 23)"
        );
        assert!(
            bulk[first..].iter().all(|&b| b),
            "a steady stream left bulk"
        );
    }

    #[test]
    fn a_ping_pong_is_not_bulk() {
        let t0 = Instant::now();
        let mut m = BulkMeter::new(t0);
        let mut total = 0;
        // A 1-byte TCP ping-pong: 67-byte frames each way, a round trip every 20 µs.
        for i in 0..1000u32 {
            total += 2 * 67;
            assert!(
                !m.is_bulk(t0 + Duration::from_micros(20) * i, total),
                "turn {i}"
            );
        }
    }

    #[test]
    fn a_stream_that_stops_is_soon_forgotten() {
        let t0 = Instant::now();
        let mut m = BulkMeter::new(t0);
        assert!(m.is_bulk(t0, 1 << 20), "1 MiB in one turn");
        assert!(
            m.is_bulk(t0 + Duration::from_micros(1500), 1 << 20),
            "the period after"
        );
        assert!(
            !m.is_bulk(t0 + Duration::from_micros(2500), (1 << 20) + 100),
            "two periods on"
        );
        assert!(
            !m.is_bulk(t0 + Duration::from_secs(1), (1 << 20) + 200),
            "long idle, then a small turn"
        );
    }

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn short_gaps_open_the_window() {
        let mut b = BusyPoll::new(MAX);
        assert_eq!(b.window(), Duration::ZERO);
        b.learn(Duration::from_micros(30));
        assert_eq!(b.window(), MAX);
    }

    #[test]
    fn long_gaps_close_it_in_a_few_waits() {
        let mut b = BusyPoll::new(MAX);
        b.learn(Duration::from_micros(10));
        let mut wasted = Duration::ZERO;
        let mut waits = 0;
        while !b.window().is_zero() {
            wasted += b.window();
            b.learn(Duration::from_millis(5));
            waits += 1;
        }
        assert_eq!(waits, 4, "50 -> 25 -> 12.5 -> 6.25 -> 0");
        assert!(wasted <= 2 * MAX, "spun {wasted:?} in vain");
        b.learn(Duration::from_secs(1));
        assert_eq!(b.window(), Duration::ZERO, "idle stays idle");
    }

    #[test]
    fn zero_never_spins() {
        let mut b = BusyPoll::new(Duration::ZERO);
        b.learn(Duration::ZERO);
        assert_eq!(b.window(), Duration::ZERO);
    }

    /// The event is there before the wait: the first non-blocking poll of the spin takes
    /// it, whenever this thread runs (asserted on the counters, not on the time).
    #[test]
    fn a_spin_that_catches_an_event_returns_it() {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let (mut a, b) = mio::net::UnixStream::pair().unwrap();
        poll.registry()
            .register(&mut a, mio::Token(7), mio::Interest::READABLE)
            .unwrap();
        let mut bp = BusyPoll::new(Duration::from_secs(10));
        bp.learn(Duration::ZERO);
        use std::io::Write;
        (&b).write_all(b"x").unwrap();
        bp.wait(&mut poll, &mut events, Some(Duration::from_secs(60)), true)
            .unwrap();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(mio::Token(7)));
        let st = bp.stats();
        assert_eq!(
            (st.spin_polls, st.spun_wakeups, st.sleeps),
            (1, 1, 0),
            "one spin poll took the event, no sleep"
        );
        assert_eq!(bp.window(), Duration::from_secs(10), "window kept");
    }

    #[test]
    fn a_timer_ends_the_spin() {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let mut bp = BusyPoll::new(Duration::from_secs(10));
        bp.learn(Duration::ZERO);
        let start = Instant::now();
        bp.wait(&mut poll, &mut events, Some(Duration::from_millis(2)), true)
            .unwrap();
        let took = start.elapsed();
        assert!(events.is_empty());
        // At the timer, not at the 10 s window; the bound is far from both.
        assert!(
            took >= Duration::from_millis(2) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    /// Asserted on the waits' own counts, not on CPU time, which depends on how busy the
    /// machine is.
    #[test]
    fn a_bulk_wait_sleeps_at_once() {
        let mut poll = Poll::new().unwrap();
        let mut events = Events::with_capacity(8);
        let mut bp = BusyPoll::new(Duration::from_secs(10));
        bp.learn(Duration::ZERO);
        let wait = Duration::from_millis(30);

        let before = bp.stats();
        bp.wait(&mut poll, &mut events, Some(wait), false).unwrap();
        let bulk = bp.stats();
        assert_eq!(
            bulk.spin_polls, before.spin_polls,
            "a bulk wait polled without blocking"
        );
        assert_eq!(bulk.sleeps, before.sleeps + 1);

        bp.wait(&mut poll, &mut events, Some(wait), true).unwrap();
        let spun = bp.stats();
        assert!(
            spun.spin_polls > bulk.spin_polls,
            "an interactive wait did not spin"
        );
        assert!(
            spun.spin_us - bulk.spin_us >= wait.as_micros() as u64,
            "spun for {} µs of a {wait:?} wait",
            spun.spin_us - bulk.spin_us
        );
        assert_eq!(
            spun.sleeps, bulk.sleeps,
            "the spin used the whole timeout: no sleep"
        );
        assert_eq!(bp.window(), Duration::from_secs(10), "window kept");
    }

    /// The sporadic traffic of tests/options.rs on a scripted timeline: an event every
    /// 2 ms against a 1 ms window. A wait spins for its whole window in vain (the event
    /// comes later), sleeps, and learns the whole wait: after a short gap opened the window,
    /// it spins for at most twice the window in all, where a fixed spin would take half of
    /// every gap. A gap shorter than the window (the scheduler bunched two events) opens it
    /// again, at the same cost.
    #[test]
    fn sporadic_events_cost_two_windows_of_spinning_per_short_gap() {
        let max = Duration::from_millis(1);
        let mut b = BusyPoll::new(max);
        let mut spun = Duration::ZERO;
        let mut short_gaps = 0u32;
        for i in 0..500u32 {
            spun += b.window();
            // Every 50th gap 0.3 ms; the others 2 to 4.5 ms.
            let gap = if i % 50 == 0 {
                short_gaps += 1;
                Duration::from_micros(300)
            } else {
                Duration::from_micros(2000 + u64::from(i % 6) * 500)
            };
            if gap <= b.window() {
                // The spin caught the event: a wake-up saved, the window kept.
                continue;
            }
            b.learn(gap);
        }
        assert!(
            spun <= 2 * max * short_gaps,
            "spun {spun:?} over 500 gaps, {short_gaps} of them short"
        );
        assert_eq!(b.window(), Duration::ZERO, "the last gaps were long");
    }

    /// The stream of tests/options.rs on a scripted timeline: bursts of 40 frames of 1442
    /// bytes (1400-byte datagrams), 5 µs apart, one burst every 1 to 3 ms (the sender
    /// sleeps 1 ms between them, longer on a busy machine). From the 23rd frame of every
    /// burst (32 KiB) on, the meter says bulk, so the wait that follows a burst, which
    /// lasts until the next one, is never spun.
    #[test]
    fn bursts_of_a_stream_are_bulk_by_their_end() {
        let t0 = Instant::now();
        let mut m = BulkMeter::new(t0);
        let (mut at, mut total) = (t0, 0u64);
        for burst in 0..200u32 {
            at += Duration::from_micros(1000 + u64::from(burst % 5) * 500);
            for frame in 0..40u32 {
                total += 1442;
                let bulk = m.is_bulk(at + Duration::from_micros(5) * frame, total);
                assert!(bulk || frame < 22, "burst {burst}, frame {frame}: not bulk");
            }
        }
    }
}
