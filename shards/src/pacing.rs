//! Open-loop pacing for `percore bench --rate` and `--load`: when each request is due, and
//! a sleep precise enough for sub-millisecond intervals.
//!
//! A paced client thread sends request `k` at `start + k × interval` whether or not earlier
//! replies came back (the window of requests in flight still bounds it), and its latency is
//! measured from that intended time, so a client that falls behind records the wait instead
//! of hiding it (no coordinated omission). This module owns only the schedule and the
//! sleeping; it never touches a socket.
//!
//! Sleeping: Linux wakes a sleeping thread late, by a little more than its timer slack (50 µs
//! by default), so a thread sleeps until [`PACE_WAKE_EARLY_US`] before the due time and then
//! yields the core until it passes. Yielding rather than pure
//! spinning lets the shards sharing a small machine run. The spin costs up to
//! `PACE_WAKE_EARLY_US / interval` of a core, so it is used only when the interval is at
//! least [`PACE_SPIN_INTERVAL_US_MIN`]; below that a thread sleeps straight to the due
//! time and sends every request then due at once (their latency still counts from their
//! own intended times).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long before a request is due a paced thread stops sleeping and starts yielding (µs):
/// just above the OS's usual lateness in waking a sleeper.
pub const PACE_WAKE_EARLY_US: u64 = 100;
/// Shortest interval between one thread's requests at which it spins before each (µs):
/// the spin then takes at most a quarter of a core.
pub const PACE_SPIN_INTERVAL_US_MIN: u64 = 4 * PACE_WAKE_EARLY_US;
/// Longest single sleep, so that a thread with a long interval still notices its stop flag
/// (ms).
pub const PACE_STOP_POLL_MS: u64 = 20;

/// When each request of one client thread is due.
#[derive(Debug, Clone, Copy)]
pub struct PaceSchedule {
    start: Instant,
    interval_ns: f64,
}

impl PaceSchedule {
    /// The schedule of thread `thread` of `threads` that together offer `rate_tx_per_s`
    /// transfers per second in requests of `records_per_request`: each thread offers an
    /// equal share, and thread `i` starts `i / threads` of an interval after `start` so
    /// that the threads' requests interleave instead of arriving together.
    pub fn for_thread(
        rate_tx_per_s: f64,
        threads: usize,
        thread: usize,
        records_per_request: usize,
        start: Instant,
    ) -> Self {
        assert!(
            rate_tx_per_s.is_finite() && rate_tx_per_s > 0.0,
            "a positive rate"
        );
        assert!(threads > 0 && thread < threads && records_per_request > 0);
        let interval_ns = 1e9 * (threads * records_per_request) as f64 / rate_tx_per_s;
        let offset_ns = interval_ns * thread as f64 / threads as f64;
        Self {
            start: start + Duration::from_nanos(offset_ns.round() as u64),
            interval_ns,
        }
    }

    /// When request `k` (counting from 0) is due. Computed from the start each time, so
    /// rounding never accumulates into drift.
    pub fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_nanos((k as f64 * self.interval_ns).round() as u64)
    }

    /// How many requests are due before `at`: the `k` with `due(k) < at`, which are
    /// `0..count` since due times only grow.
    pub fn due_before(&self, at: Instant) -> u64 {
        if at <= self.start {
            return 0;
        }
        let elapsed_ns = (at - self.start).as_nanos() as f64;
        // The estimate is off by at most one either way (rounding in `due`); each loop
        // moves it at most a step or two.
        let mut count = (elapsed_ns / self.interval_ns).ceil().max(0.0) as u64;
        while count > 0 && self.due(count - 1) >= at {
            count -= 1;
        }
        while self.due(count) < at {
            count += 1;
        }
        count
    }

    /// Time between two of this thread's requests.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns.round() as u64)
    }

    /// Whether waiting for a request should end in a short spin ([`PACE_SPIN_INTERVAL_US_MIN`]).
    pub fn spins(&self) -> bool {
        self.interval_ns >= (PACE_SPIN_INTERVAL_US_MIN * 1_000) as f64
    }
}

/// Waits until `deadline`: sleeps until [`PACE_WAKE_EARLY_US`] before it (in steps of at
/// most [`PACE_STOP_POLL_MS`]), then, if `spin`, yields the core until it passes; without
/// `spin` it sleeps to the deadline itself and may return a little late. Never returns
/// early. Returns `false`, at once, if `stop` is set before the deadline.
pub fn sleep_until(deadline: Instant, spin: bool, stop: &AtomicBool) -> bool {
    let early = if spin {
        Duration::from_micros(PACE_WAKE_EARLY_US)
    } else {
        Duration::ZERO
    };
    let poll = Duration::from_millis(PACE_STOP_POLL_MS);
    // Bounded: each pass sleeps until the wake time or for a whole poll step.
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        let left = deadline - now;
        if left <= early {
            break;
        }
        std::thread::sleep((left - early).min(poll));
    }
    while Instant::now() < deadline {
        std::thread::yield_now();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_split_evenly_and_the_threads_interleave() {
        let start = Instant::now();
        // 30,000 tx/s from 3 threads in requests of 100: 100 requests/s each, 10 ms apart.
        let first = PaceSchedule::for_thread(30_000.0, 3, 0, 100, start);
        let third = PaceSchedule::for_thread(30_000.0, 3, 2, 100, start);
        assert_eq!(first.interval(), Duration::from_millis(10));
        assert_eq!(third.interval(), Duration::from_millis(10));
        assert_eq!(first.due(0), start);
        assert_eq!(first.due(7), start + Duration::from_millis(70));
        // Thread 2 of 3 runs two thirds of an interval behind thread 0.
        let lag = third.due(7) - first.due(7);
        assert!(lag.abs_diff(Duration::from_micros(6_667)) <= Duration::from_micros(1));
    }

    #[test]
    fn due_times_do_not_drift_over_a_long_run() {
        let start = Instant::now();
        // 1/3 µs per request: rounding each step would drift by a third of it per request.
        let schedule = PaceSchedule::for_thread(3_000_000.0, 1, 0, 1, start);
        let k = 3_000_000_000u64; // a thousand seconds of requests
        let expected = Duration::from_secs(1_000);
        assert!((schedule.due(k) - start).abs_diff(expected) <= Duration::from_micros(1));
        assert!(!schedule.spins(), "a 0.33 µs interval must not spin");
        let slow = PaceSchedule::for_thread(1_000.0, 1, 0, 1, start);
        assert!(slow.spins(), "a 1 ms interval spins");
    }

    #[test]
    fn due_before_counts_the_requests_due_before_an_instant() {
        let start = Instant::now();
        // 1,000 transfers a request at 3,000 tx/s: one every 333,333,333.3 ns, so the due times
        // round both ways.
        let schedule = PaceSchedule::for_thread(3_000.0, 1, 0, 1_000, start);
        assert_eq!(schedule.due_before(start), 0);
        assert_eq!(schedule.due_before(start - Duration::from_secs(1)), 0);
        for k in 0..10_000u64 {
            let due = schedule.due(k);
            assert_eq!(schedule.due_before(due), k, "request {k}");
            assert_eq!(schedule.due_before(due + Duration::from_nanos(1)), k + 1);
        }
    }

    #[test]
    fn sleeping_never_returns_before_the_deadline() {
        let stop = AtomicBool::new(false);
        for spin in [true, false] {
            for wait_us in [0, 30, 150, 700] {
                let deadline = Instant::now() + Duration::from_micros(wait_us);
                assert!(sleep_until(deadline, spin, &stop));
                assert!(
                    Instant::now() >= deadline,
                    "woke early: spin {spin}, {wait_us} µs"
                );
            }
        }
    }

    #[test]
    fn a_stop_ends_a_long_sleep() {
        let stop = AtomicBool::new(true);
        let deadline = Instant::now() + Duration::from_secs(3_600);
        assert!(!sleep_until(deadline, true, &stop));
    }
}
