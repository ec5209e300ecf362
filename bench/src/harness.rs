//! The measurement harness: thread launch, waiting, interleaved rounds and the report.
//!
//! A `Bench` is one row: one OURS kernel and one PEER kernel run on the same item type with
//! the same operation count. `run_bench` warms both up, then alternates them for `rounds`
//! rounds and reports the median. Kernels check nothing about time; the harness checks only
//! that every kernel moved every item (its checksum), never how fast.

use std::hint::spin_loop;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::machine::{Machine, Pins, Role};

/// Spins before a waiting thread starts yielding its core (2P/2C rows oversubscribe cores).
pub const BACKOFF_SPINS_MAX: u32 = 64;

/// Warm-up runs use this fraction of the timed operation count (page faults, caches).
pub const WARMUP_DIVISOR: u64 = 8;

/// Stack for the thread that builds the queues: heapless queues hold their ring inline
/// (`RING_CAPACITY * 128` bytes and up) and are built on the stack before being boxed.
pub const KERNEL_STACK_BYTES: usize = 64 << 20;

/// Runs `f` on a thread with a `KERNEL_STACK_BYTES` stack and returns its result.
pub fn on_big_stack<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|scope| {
        thread::Builder::new()
            .name("bench-driver".to_owned())
            .stack_size(KERNEL_STACK_BYTES)
            .spawn_scoped(scope, f)
            .expect("spawn the benchmark driver thread")
            .join()
            .expect("benchmark driver panicked")
    })
}

/// How long `spin_warmup` keeps the driver's core busy before the first row.
pub const SPIN_WARMUP_MS: u64 = 300;

/// Keeps the calling thread's core busy for `SPIN_WARMUP_MS`, so the first row does not
/// pay for a core waking from idle (frequency ramp, a halted vCPU being rescheduled).
pub fn spin_warmup() {
    let deadline = Instant::now() + Duration::from_millis(SPIN_WARMUP_MS);
    while Instant::now() < deadline {
        spin_loop();
    }
}

/// One timed run of one kernel.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Operations the rate is counted in (items moved, borrow+release cycles, one-way hops).
    pub items: u64,
    /// Wall time from the first thread's start to the last thread's finish.
    pub elapsed: Duration,
    /// Sum of the keys the kernel observed arriving.
    pub checksum: u64,
    /// What `checksum` must be if no item was lost or duplicated.
    pub expected: u64,
}

impl Sample {
    /// Items per second; zero-length runs count as one nanosecond.
    pub fn items_per_s(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A benchmark kernel: run `ops` operations with threads placed by `Pins`.
pub type Kernel = Box<dyn Fn(u64, &Pins) -> Sample>;

/// What a row's `ns_per_op` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Items through a queue per second; ns/op = 1e9 / items_per_s.
    Throughput,
    /// Ping-pong: ns/op is half a round trip (one-way latency).
    OneWayLatency,
    /// One pool borrow + release (or insert + remove, or alloc + free) cycle.
    Cycle,
}

/// One row: ours against one peer.
pub struct Bench {
    /// Row name, e.g. `spsc_single`.
    pub name: &'static str,
    /// The peer's name, e.g. `rtrb`.
    pub peer: &'static str,
    /// Size of one item in bytes.
    pub item_bytes: usize,
    /// Thread shape, e.g. `1P/1C` or `1T`.
    pub threads: &'static str,
    /// How to read `ns_per_op`.
    pub metric: Metric,
    /// Operations per timed run.
    pub ops: u64,
    /// Our kernel.
    pub ours: Kernel,
    /// The peer's kernel.
    pub peer_kernel: Kernel,
}

impl std::fmt::Debug for Bench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bench")
            .field("name", &self.name)
            .field("peer", &self.peer)
            .field("item_bytes", &self.item_bytes)
            .field("threads", &self.threads)
            .field("ops", &self.ops)
            .finish_non_exhaustive()
    }
}

/// The measured result of one row, as printed with `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct RowResult {
    /// Row name, e.g. `spsc_single`.
    pub name: &'static str,
    /// The peer's name.
    pub peer: &'static str,
    /// Size of one item in bytes.
    pub item_bytes: usize,
    /// Ours, median over rounds.
    pub items_per_s: f64,
    /// Ours: 1e9 / `items_per_s`.
    pub ns_per_op: f64,
    /// The peer, median over rounds.
    pub peer_items_per_s: f64,
    /// The peer: 1e9 / `peer_items_per_s`.
    pub peer_ns_per_op: f64,
    /// Ours / peer median throughput: above 1.0 means ours is faster.
    pub ratio_vs_peer: f64,
    /// Timed rounds per side.
    pub rounds: usize,
    /// Where it ran.
    pub machine: Machine,
    /// Thread shape, e.g. `1P/1C`.
    pub threads: &'static str,
    /// How to read `ns_per_op`.
    pub metric: Metric,
    /// Operations per timed round.
    pub ops_per_round: u64,
    /// Best round of each side and their ratio: on a shared, noisy box the best round is
    /// the one least disturbed by other tenants.
    pub best_items_per_s: f64,
    /// The peer's best round.
    pub peer_best_items_per_s: f64,
    /// Ours best / peer best.
    pub ratio_best_vs_peer: f64,
    /// Every round's throughput, in run order, to judge the noise.
    pub ours_rounds_items_per_s: Vec<f64>,
    /// The peer's rounds, in run order.
    pub peer_rounds_items_per_s: Vec<f64>,
    /// Whether threads were pinned (and no pin call failed during this row).
    pub pinned: bool,
}

/// Runs one row: a warm-up of each side, then `rounds` alternating timed rounds.
pub fn run_bench(bench: &Bench, rounds: usize, pins: &Pins, machine: &Machine) -> RowResult {
    assert!(rounds > 0, "at least one round");
    let failures_before = pins.failures();
    let warmup_ops = (bench.ops / WARMUP_DIVISOR).max(1);
    checked(&bench.ours, warmup_ops, pins, bench);
    checked(&bench.peer_kernel, warmup_ops, pins, bench);
    let mut ours = Vec::with_capacity(rounds);
    let mut peer = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        ours.push(checked(&bench.ours, bench.ops, pins, bench).items_per_s());
        peer.push(checked(&bench.peer_kernel, bench.ops, pins, bench).items_per_s());
    }
    let items_per_s = median(&ours);
    let peer_items_per_s = median(&peer);
    let best_items_per_s = ours.iter().copied().fold(0.0, f64::max);
    let peer_best_items_per_s = peer.iter().copied().fold(0.0, f64::max);
    RowResult {
        name: bench.name,
        peer: bench.peer,
        item_bytes: bench.item_bytes,
        items_per_s,
        ns_per_op: 1e9 / items_per_s,
        peer_items_per_s,
        peer_ns_per_op: 1e9 / peer_items_per_s,
        ratio_vs_peer: items_per_s / peer_items_per_s,
        rounds,
        machine: machine.clone(),
        threads: bench.threads,
        metric: bench.metric,
        ops_per_round: bench.ops,
        best_items_per_s,
        peer_best_items_per_s,
        ratio_best_vs_peer: best_items_per_s / peer_best_items_per_s,
        ours_rounds_items_per_s: ours,
        peer_rounds_items_per_s: peer,
        pinned: pins.enabled() && pins.failures() == failures_before,
    }
}

/// Runs a kernel and panics if it lost or duplicated an item: a wrong benchmark must not
/// produce a number.
fn checked(kernel: &Kernel, ops: u64, pins: &Pins, bench: &Bench) -> Sample {
    let sample = kernel(ops, pins);
    assert_eq!(
        sample.checksum, sample.expected,
        "{} vs {} ({} B): checksum mismatch, items were lost or duplicated",
        bench.name, bench.peer, bench.item_bytes
    );
    sample
}

/// The median of a non-empty list (mean of the middle two for even lengths).
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    }
}

/// The `percentile` (0..=100) of `sorted` samples; 0 for none.
pub fn percentile(sorted: &[u64], percentile: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((percentile / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Bounded spin, then yield: fair to every queue alike, and keeps oversubscribed rows
/// (more threads than cores) from burning whole time slices on a waiting thread.
#[derive(Debug, Default)]
pub struct Backoff {
    spins: u32,
}

impl Backoff {
    /// A fresh backoff that starts by spinning.
    #[inline(always)]
    pub fn new() -> Self {
        Self { spins: 0 }
    }

    /// Waits a little; longer (by yielding the core) after `BACKOFF_SPINS_MAX` calls.
    #[inline]
    pub fn snooze(&mut self) {
        if self.spins < BACKOFF_SPINS_MAX {
            self.spins += 1;
            spin_loop();
        } else {
            thread::yield_now();
        }
    }
}

/// Runs one producer and one consumer on their pinned cores, released together by a
/// barrier. The consumer returns its checksum. Elapsed time runs from the producer's
/// start to the consumer's finish.
pub fn run_pair<P, C>(pins: &Pins, producer: P, consumer: C) -> (Duration, u64)
where
    P: FnOnce() + Send,
    C: FnOnce() -> u64 + Send,
{
    let barrier = Barrier::new(2);
    thread::scope(|scope| {
        let producer = scope.spawn(|| {
            pins.pin_current(Role::Producer, 0);
            barrier.wait();
            let start = Instant::now();
            producer();
            start
        });
        let consumer = scope.spawn(|| {
            pins.pin_current(Role::Consumer, 0);
            barrier.wait();
            let checksum = consumer();
            (Instant::now(), checksum)
        });
        let start = producer.join().expect("producer thread panicked");
        let (end, checksum) = consumer.join().expect("consumer thread panicked");
        (end.saturating_duration_since(start), checksum)
    })
}

/// Runs `producers` producer threads and `consumers` consumer threads sharing one queue
/// (captured by reference). Thread `i` of each role gets `i`. The consumers' checksums
/// are summed. Elapsed time runs from the earliest start to the latest finish.
pub fn run_group<P, C>(
    pins: &Pins,
    producers: usize,
    consumers: usize,
    producer: P,
    consumer: C,
) -> (Duration, u64)
where
    P: Fn(usize) + Sync,
    C: Fn(usize) -> u64 + Sync,
{
    assert!(producers > 0 && consumers > 0, "a queue needs both ends");
    let barrier = Barrier::new(producers + consumers);
    thread::scope(|scope| {
        let producer_threads: Vec<_> = (0..producers)
            .map(|index| {
                let (barrier, producer) = (&barrier, &producer);
                scope.spawn(move || {
                    pins.pin_current(Role::Producer, index);
                    barrier.wait();
                    let start = Instant::now();
                    producer(index);
                    start
                })
            })
            .collect();
        let consumer_threads: Vec<_> = (0..consumers)
            .map(|index| {
                let (barrier, consumer) = (&barrier, &consumer);
                scope.spawn(move || {
                    pins.pin_current(Role::Consumer, index);
                    barrier.wait();
                    let checksum = consumer(index);
                    (Instant::now(), checksum)
                })
            })
            .collect();
        let start = producer_threads
            .into_iter()
            .map(|thread| thread.join().expect("producer thread panicked"))
            .min()
            .expect("at least one producer");
        let mut end = start;
        let mut checksum = 0u64;
        for thread in consumer_threads {
            let (finish, sum) = thread.join().expect("consumer thread panicked");
            end = end.max(finish);
            checksum = checksum.wrapping_add(sum);
        }
        (end.saturating_duration_since(start), checksum)
    })
}

/// Column header of the human-readable table.
pub const TABLE_HEADER: &str = "name                   | peer                     | item_bytes | threads | ours items/s | peer items/s | ours ns/op | peer ns/op | ratio_vs_peer";

/// One table line for a row.
pub fn table_line(row: &RowResult) -> String {
    format!(
        "{:<22} | {:<24} | {:>10} | {:<7} | {:>12} | {:>12} | {:>10.1} | {:>10.1} | {:>6.2}x",
        row.name,
        row.peer,
        row.item_bytes,
        row.threads,
        human_rate(row.items_per_s),
        human_rate(row.peer_items_per_s),
        row.ns_per_op,
        row.peer_ns_per_op,
        row.ratio_vs_peer,
    )
}

/// `12.3M`-style rate.
fn human_rate(per_s: f64) -> String {
    if per_s >= 1e9 {
        format!("{:.2}G", per_s / 1e9)
    } else if per_s >= 1e6 {
        format!("{:.2}M", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.2}k", per_s / 1e3)
    } else {
        format!("{per_s:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn group_sums_every_consumer() {
        let pins = Pins::none();
        let (_, checksum) = run_group(&pins, 2, 3, |_| {}, |index| index as u64 + 1);
        assert_eq!(checksum, 1 + 2 + 3);
    }
}
