//! `percore-bench threads`: many application threads enqueueing into one consumer.
//!
//! This is the shape of the embedding API's ingest ring ([`percore_shards::ingest`]): 1 to
//! 1,024 unpinned producer threads (far more than cores) push 8-byte handles into one
//! bounded queue that one consumer drains. Five sides run in the same process, rounds
//! interleaved (ours, lanes, ingest, crossbeam, std, ours, ...), medians reported:
//!
//! * **ours**: the engine's [`Mpmc`] ring; a full ring is retried with the ingest back-off
//!   ([`Waiters::retry`]: spin, then yield, then park on a condvar that the consumer
//!   notifies after each batch it pops, lock-free when nobody is parked);
//! * **lanes**: the engine's [`Lanes`], the same capacity split over `--lanes` MPMC rings
//!   (by default [`lane_count_for`](percore_engine::ring::lanes::lane_count_for) the cores:
//!   one per two cores, at most 8), producer `p` pushing into lane `p % lanes` with that
//!   lane's back-off, the consumer draining the lanes in turn;
//! * **ingest**: the embedding API's real path, [`Submitter::submit_wait`] into an
//!   [`Ingress`] of one shard with `--lanes` lanes, the consumer standing in for the shard
//!   ([`Ingress::drain`], then [`Ingress::abort`] of each handle). Each submission also
//!   takes a completion slot from its lane's free list and writes its record into the
//!   slot; the producer drops its ticket, so the consumer's abort returns the slot (unless
//!   the drop came second and returned it). It does more per item than the other sides:
//!   it is what a validator's thread pays;
//! * **crossbeam**: `crossbeam_queue::ArrayQueue` with the *same* back-off and notification;
//! * **std**: `std::sync::mpsc::sync_channel` (its own blocking `send`).
//!
//! Two layouts (`--consumer-core`), the same for every side:
//!
//! * **shared** (default): the consumer and the producers float over every core, so with as
//!   many producers as cores the consumer competes with them for CPU;
//! * **reserved consumer core**: the consumer is pinned to the last allowed core and the
//!   producers float over the others, as on a node whose shard cores the application keeps
//!   its own threads off (operations, "Cores").
//!
//! Two more knobs, off by default: `--drain-pause-ns` makes the consumer pause after a take
//! that emptied the queue, as a shard goes off to seal and replicate between drains (every
//! side alike: an eager consumer right behind one producer fights it for the same lines);
//! `--ingest-batch N` has the ingest side's producers submit `N` records per
//! [`Submitter::submit_batch_wait`] call, its latency then per record.
//!
//! Every side reports throughput (items/s from release to the consumer's last item) and the
//! latency of one enqueue (p50/p99 over every `LATENCY_SAMPLE_EVERY`-th enqueue, all rounds
//! pooled), including any back-off it had to do. The consumer checks the sum of the items;
//! a side that loses or duplicates an item panics instead of reporting a number.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use percore_engine::checksum::Digest256;
use percore_engine::ring::lanes::Lanes;
use percore_engine::ring::mpmc::Mpmc;
use percore_engine::state_machine::{Outbound, RestoreError, StateMachine};
use percore_shards::affinity;
use percore_shards::ingest::{
    INGEST_DRAIN_BATCH_MAX, INGEST_RING_CAPACITY_DEFAULT, INGEST_SLOTS_DEFAULT, IngestConfig,
    Ingress, Submitter, WAKE_PER_NOTIFY_MAX, Waiters, until,
};
use serde::Serialize;

use crate::harness::{Backoff, median, percentile};
use crate::machine::Machine;

/// Capacity of every side's queue: the ingest ring's default.
pub const QUEUE_CAPACITY: usize = INGEST_RING_CAPACITY_DEFAULT;
/// Items the consumer takes per batch (ours and crossbeam), as a shard drains its ring.
pub const CONSUMER_BATCH_MAX: usize = INGEST_DRAIN_BATCH_MAX;
/// Items per timed round, all producers together.
pub const ITEMS_DEFAULT: u64 = 1 << 20;
/// Every this-many-th enqueue is timed (timing every one would double the cost of the
/// cheap ones).
pub const LATENCY_SAMPLE_EVERY: u64 = 8;
/// Largest producer count measured by default.
pub const THREADS_MAX_DEFAULT: usize = 1_024;
/// A producer never waits longer than this for room (a stuck benchmark fails loudly).
pub const ENQUEUE_DEADLINE_S: u64 = 60;
/// Stack of each producer thread: they run a small loop.
pub const PRODUCER_STACK_BYTES: usize = 128 << 10;

const _: () = assert!(CONSUMER_BATCH_MAX <= QUEUE_CAPACITY);

/// The sides, in the order they run in each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// percore `Mpmc` + ingest back-off.
    Ours,
    /// percore `Lanes`: several `Mpmc`s, each with its own back-off.
    Lanes,
    /// percore `Submitter` into an `Ingress`: slots, lanes, the real submit path.
    Ingest,
    /// `crossbeam_queue::ArrayQueue` + the same back-off.
    Crossbeam,
    /// `std::sync::mpsc::sync_channel`.
    Std,
}

impl Side {
    /// Every side, in run order.
    pub const ALL: [Side; 5] = [
        Side::Ours,
        Side::Lanes,
        Side::Ingest,
        Side::Crossbeam,
        Side::Std,
    ];

    /// This side's place in [`Side::ALL`] (and in a row's `sides`).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// How a row runs: where the consumer and the producers run (see the module
/// documentation), and the waking and lane settings of the sides that use them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// The core the consumer is pinned to, if it has one of its own.
    pub consumer_core: Option<usize>,
    /// The cores the producers float over; empty: wherever they were started.
    pub producer_cores: Vec<usize>,
    /// Most sleeping producers one notification wakes (ours and crossbeam).
    pub wake_max: usize,
    /// Lanes of the lanes and ingest sides.
    pub lanes: usize,
    /// After a take that emptied the queue (fewer than [`CONSUMER_BATCH_MAX`] items), the
    /// consumer waits this long before it looks again (ns; 0: at once), as a shard goes
    /// off to seal, replicate and apply between two drains. The same for every side.
    pub drain_pause_ns: u64,
    /// Records per `Submitter::submit_batch_wait` call of the ingest side's producers (1:
    /// `submit_wait` per record, as the other sides enqueue). Its enqueue latency is then
    /// each call's time divided by its records.
    pub ingest_batch: usize,
}

impl Layout {
    /// Everything floats over every allowed core.
    pub fn shared() -> Self {
        Self {
            consumer_core: None,
            producer_cores: Vec::new(),
            wake_max: WAKE_PER_NOTIFY_MAX,
            lanes: 1,
            drain_pause_ns: 0,
            ingest_batch: 1,
        }
    }

    /// The last of `allowed` for the consumer, the rest for the producers; `None` with
    /// fewer than two cores.
    pub fn reserved_consumer_core(allowed: &[usize]) -> Option<Self> {
        let (&consumer, producers) = allowed.split_last()?;
        (!producers.is_empty()).then(|| Self {
            consumer_core: Some(consumer),
            producer_cores: producers.to_vec(),
            ..Self::shared()
        })
    }
}

/// One round of one side.
#[derive(Clone, Debug)]
pub struct Round {
    /// Items per second from release to the consumer's last item.
    pub items_per_s: f64,
    /// Sampled enqueue latencies (ns), unsorted.
    pub enqueue_ns: Vec<u64>,
}

/// One side's result at one producer count.
#[derive(Clone, Debug, Serialize)]
pub struct SideResult {
    /// Which side.
    pub side: Side,
    /// Median throughput over rounds (items/s).
    pub items_per_s: f64,
    /// Median enqueue latency (ns), samples of all rounds pooled.
    pub enqueue_p50_ns: u64,
    /// 99th percentile enqueue latency (ns).
    pub enqueue_p99_ns: u64,
    /// Every round's throughput, in run order, to judge the noise.
    pub rounds_items_per_s: Vec<f64>,
}

/// One row: every side at one producer count, as printed with `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct ThreadsRow {
    /// Row name.
    pub name: &'static str,
    /// Producer threads (one consumer).
    pub producers: usize,
    /// Items per timed round.
    pub items_per_round: u64,
    /// Timed rounds per side.
    pub rounds: usize,
    /// Where the consumer and the producers ran.
    pub layout: Layout,
    /// Ours, lanes, ingest, crossbeam, std ([`Side::ALL`] order).
    pub sides: Vec<SideResult>,
    /// Ours / crossbeam median throughput (>1: ours faster).
    pub ratio_vs_crossbeam: f64,
    /// Ours / std median throughput.
    pub ratio_vs_std: f64,
    /// Lanes / crossbeam median throughput.
    pub lanes_vs_crossbeam: f64,
    /// Lanes / std median throughput.
    pub lanes_vs_std: f64,
    /// Ingest / crossbeam median throughput.
    pub ingest_vs_crossbeam: f64,
    /// Ingest / std median throughput.
    pub ingest_vs_std: f64,
    /// Where it ran.
    pub machine: Machine,
}

/// Producer counts: 1, 2, 4, ... up to `max` (and `max` itself).
pub fn producer_counts(max: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = (0..usize::BITS)
        .map(|shift| 1usize << shift)
        .take_while(|&count| count <= max)
        .collect();
    if counts.last() != Some(&max) && max > 0 {
        counts.push(max);
    }
    counts
}

/// Item `seq` of producer `producer`: unique, so the checksum catches loss and duplication.
fn item(producer: usize, seq: u64) -> u64 {
    ((producer as u64) << 32) | (seq + 1)
}

/// The sum every consumer must see for `producers` producers of `per_producer` items.
fn expected_sum(producers: usize, per_producer: u64) -> u64 {
    (0..producers)
        .flat_map(|producer| (0..per_producer).map(move |seq| item(producer, seq)))
        .fold(0u64, u64::wrapping_add)
}

/// The ingest side's state machine: its records are the benchmark's 8-byte items. Nothing
/// is ever applied: the consumer stands in for the shard and aborts every handle.
#[derive(Debug)]
pub struct Items;

impl StateMachine for Items {
    type Operation = u16;
    type Record = u64;
    type Result = u64;

    fn client_operation(_: u16) -> Option<u16> {
        None
    }

    fn route(_: u16, _: &u64, _: u32) -> u32 {
        0
    }

    fn prepare(&mut self, _: u16, _: u64, _: &mut [u64]) {}

    fn apply(&mut self, _: u64, _: u16, _: &[u64], _: &mut [u64]) {
        unreachable!("the threads benchmark applies nothing");
    }

    fn poll_outbound(&mut self) -> Option<Outbound<u16, u64>> {
        None
    }

    fn snapshot(&self, _: &mut Vec<u8>) {}

    fn restore(&mut self, _: &[u8]) -> Result<(), RestoreError> {
        Ok(())
    }

    fn digest(&self) -> Digest256 {
        [0; 32]
    }
}

/// The ingest side's only operation code.
const ITEMS_OPERATION: u16 = 1;

/// The queue each side uses, built fresh for every round.
enum Queue {
    Ours(Mpmc<u64>, Waiters),
    Lanes(Lanes<u64>),
    Ingest(Submitter<Items>),
    Crossbeam(ArrayQueue<u64>, Waiters),
    /// The sender; the receiver stays with the consumer (it is not `Sync`).
    Std(SyncSender<u64>),
}

impl Queue {
    fn new(side: Side, layout: &Layout) -> (Self, Option<Receiver<u64>>) {
        let waiters = Waiters::with_wake_max(layout.wake_max);
        match side {
            Side::Ours => (Queue::Ours(Mpmc::new(QUEUE_CAPACITY), waiters), None),
            Side::Lanes => (
                Queue::Lanes(Lanes::with_total_capacity(layout.lanes, QUEUE_CAPACITY)),
                None,
            ),
            Side::Ingest => {
                let config = IngestConfig {
                    ring_capacity: QUEUE_CAPACITY,
                    slots: INGEST_SLOTS_DEFAULT,
                    lanes: layout.lanes,
                };
                let stop = Arc::new(AtomicBool::new(false));
                let ingress = Ingress::new(config, 1, stop).expect("a valid ingest config");
                (Queue::Ingest(Submitter::new(Arc::new(ingress))), None)
            }
            Side::Crossbeam => (
                Queue::Crossbeam(ArrayQueue::new(QUEUE_CAPACITY), waiters),
                None,
            ),
            Side::Std => {
                let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
                (Queue::Std(sender), Some(receiver))
            }
        }
    }

    /// Enqueues one item of `producer`, waiting for room.
    #[inline]
    fn enqueue(&self, producer: usize, value: u64, deadline: Instant) {
        let sent = match self {
            Queue::Ours(ring, waiters) => {
                waiters.retry(until(deadline), || ring.push(value)).is_ok()
            }
            Queue::Lanes(lanes) => lanes.push_wait(producer, value, until(deadline)).is_ok(),
            // Dropping the ticket leaves the slot to whoever finishes it second.
            Queue::Ingest(submitter) => submitter
                .submit_wait(ITEMS_OPERATION, value, deadline)
                .is_ok(),
            Queue::Crossbeam(queue, waiters) => {
                waiters.retry(until(deadline), || queue.push(value)).is_ok()
            }
            Queue::Std(sender) => sender.send(value).is_ok(),
        };
        assert!(sent, "an enqueue waited past its deadline");
    }

    /// Enqueues `values` of the ingest side with `submit_batch_wait` (a refused record
    /// waits for room, then the batch goes on), dropping every ticket.
    fn enqueue_batch(&self, values: &[u64], deadline: Instant) {
        let Queue::Ingest(submitter) = self else {
            unreachable!("only the ingest side submits batches");
        };
        if let Err(error) = submitter.submit_batch_wait(ITEMS_OPERATION, values, deadline, drop) {
            panic!("the ingest side refused a batch: {error}");
        }
    }

    /// Takes up to `CONSUMER_BATCH_MAX` items into `sum`; returns the count.
    #[inline]
    fn dequeue_batch(&self, receiver: Option<&Receiver<u64>>, sum: &mut u64) -> usize {
        match self {
            Queue::Ours(ring, waiters) => {
                let taken = ring.pop_batch(CONSUMER_BATCH_MAX, |value| {
                    *sum = sum.wrapping_add(value);
                });
                waiters.notify(taken);
                taken
            }
            Queue::Lanes(lanes) => lanes.pop_batch(CONSUMER_BATCH_MAX, |value| {
                *sum = sum.wrapping_add(value);
            }),
            Queue::Ingest(submitter) => {
                let ingress = submitter.ingress();
                ingress.drain(0, CONSUMER_BATCH_MAX, |_, value, slot, generation| {
                    *sum = sum.wrapping_add(*value);
                    ingress.abort(slot, generation);
                })
            }
            Queue::Crossbeam(queue, waiters) => {
                let mut taken = 0;
                while taken < CONSUMER_BATCH_MAX {
                    let Some(value) = queue.pop() else { break };
                    *sum = sum.wrapping_add(value);
                    taken += 1;
                }
                waiters.notify(taken);
                taken
            }
            Queue::Std(_) => {
                let receiver = receiver.expect("std side has a receiver");
                let mut taken = 0;
                while taken < CONSUMER_BATCH_MAX {
                    match receiver.try_recv() {
                        Ok(value) => {
                            *sum = sum.wrapping_add(value);
                            taken += 1;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                taken
            }
        }
    }
}

/// Spins for `ns` nanoseconds (the consumer's pause between drains: no sleep, whose
/// wake-up takes tens of microseconds).
fn pause(ns: u64) {
    let until = Instant::now() + Duration::from_nanos(ns);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Runs one round: `producers` threads (confined to the layout's producer cores, if any)
/// enqueue `per_producer` items each into a fresh queue of `side`; one consumer, the calling
/// thread, drains them all.
pub fn run_round(side: Side, producers: usize, per_producer: u64, layout: &Layout) -> Round {
    let producer_cores = &layout.producer_cores[..];
    let (queue, receiver) = Queue::new(side, layout);
    let total = producers as u64 * per_producer;
    let barrier = Barrier::new(producers + 1);
    let deadline = Instant::now() + Duration::from_secs(ENQUEUE_DEADLINE_S);
    let (elapsed, sum, enqueue_ns) = thread::scope(|scope| {
        let threads: Vec<_> = (0..producers)
            .map(|producer| {
                let (queue, barrier) = (&queue, &barrier);
                thread::Builder::new()
                    .stack_size(PRODUCER_STACK_BYTES)
                    .spawn_scoped(scope, move || {
                        affinity::confine_current(producer_cores)
                            .expect("confine a producer to the layout's cores");
                        let mut samples =
                            Vec::with_capacity((per_producer / LATENCY_SAMPLE_EVERY + 1) as usize);
                        let batch = layout.ingest_batch.max(1);
                        if side == Side::Ingest && batch > 1 {
                            let mut values = Vec::with_capacity(batch);
                            barrier.wait();
                            let mut seq = 0;
                            while seq < per_producer {
                                let end = (seq + batch as u64).min(per_producer);
                                values.clear();
                                values.extend((seq..end).map(|seq| item(producer, seq)));
                                let started = Instant::now();
                                queue.enqueue_batch(&values, deadline);
                                let ns = started.elapsed().as_nanos() as u64;
                                samples.push(ns / values.len() as u64);
                                seq = end;
                            }
                            return samples;
                        }
                        barrier.wait();
                        for seq in 0..per_producer {
                            let value = item(producer, seq);
                            if seq % LATENCY_SAMPLE_EVERY == 0 {
                                let started = Instant::now();
                                queue.enqueue(producer, value, deadline);
                                samples.push(started.elapsed().as_nanos() as u64);
                            } else {
                                queue.enqueue(producer, value, deadline);
                            }
                        }
                        samples
                    })
                    .expect("spawn a producer")
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        let mut sum = 0u64;
        let mut received = 0u64;
        let mut backoff = Backoff::new();
        while received < total {
            let taken = queue.dequeue_batch(receiver.as_ref(), &mut sum);
            if taken == 0 {
                backoff.snooze();
                assert!(
                    Instant::now() < deadline,
                    "the consumer waited past its deadline"
                );
            } else {
                backoff = Backoff::new();
                received += taken as u64;
                if taken < CONSUMER_BATCH_MAX && layout.drain_pause_ns > 0 {
                    pause(layout.drain_pause_ns);
                }
            }
        }
        let elapsed = started.elapsed();
        let mut enqueue_ns = Vec::new();
        for thread in threads {
            enqueue_ns.extend(thread.join().expect("producer thread panicked"));
        }
        (elapsed, sum, enqueue_ns)
    });
    assert_eq!(
        sum,
        expected_sum(producers, per_producer),
        "{side:?} with {producers} producers: items lost or duplicated"
    );
    Round {
        items_per_s: total as f64 / elapsed.as_secs_f64().max(1e-9),
        enqueue_ns,
    }
}

/// Measures every side at `producers` producers: one warm-up round each, then `rounds`
/// interleaved timed rounds.
/// The caller has already put itself (the consumer) where `layout` says.
pub fn run_row(
    producers: usize,
    items: u64,
    rounds: usize,
    layout: &Layout,
    machine: &Machine,
) -> ThreadsRow {
    assert!(producers >= 1 && rounds >= 1);
    let per_producer = (items / producers as u64).max(LATENCY_SAMPLE_EVERY);
    for side in Side::ALL {
        run_round(side, producers, (per_producer / 8).max(1), layout);
    }
    let mut measured: Vec<Vec<Round>> = Side::ALL.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (index, side) in Side::ALL.into_iter().enumerate() {
            measured[index].push(run_round(side, producers, per_producer, layout));
        }
    }
    let sides: Vec<SideResult> = Side::ALL
        .into_iter()
        .zip(measured)
        .map(|(side, rounds)| {
            let rates: Vec<f64> = rounds.iter().map(|round| round.items_per_s).collect();
            let mut samples: Vec<u64> = rounds
                .into_iter()
                .flat_map(|round| round.enqueue_ns)
                .collect();
            samples.sort_unstable();
            SideResult {
                side,
                items_per_s: median(&rates),
                enqueue_p50_ns: percentile(&samples, 50.0),
                enqueue_p99_ns: percentile(&samples, 99.0),
                rounds_items_per_s: rates,
            }
        })
        .collect();
    let rate = |side: Side| sides[side.index()].items_per_s;
    let (ours, lanes, ingest) = (rate(Side::Ours), rate(Side::Lanes), rate(Side::Ingest));
    let (crossbeam, std) = (rate(Side::Crossbeam), rate(Side::Std));
    ThreadsRow {
        name: "threads_into_one",
        producers,
        items_per_round: per_producer * producers as u64,
        rounds,
        layout: layout.clone(),
        ratio_vs_crossbeam: ours / crossbeam,
        ratio_vs_std: ours / std,
        lanes_vs_crossbeam: lanes / crossbeam,
        lanes_vs_std: lanes / std,
        ingest_vs_crossbeam: ingest / crossbeam,
        ingest_vs_std: ingest / std,
        sides,
        machine: machine.clone(),
    }
}

/// Column header of the human-readable table.
pub const TABLE_HEADER: &str = "producers | ours items/s | lanes       | ingest      | crossbeam   | std         | ours p50/p99 ns | lanes p50/p99   | ingest p50/p99  | crossbeam p50/p99 | std p50/p99      | ours vs crossbeam, std | lanes vs crossbeam, std | ingest vs crossbeam, std";

/// One table line.
pub fn table_line(row: &ThreadsRow) -> String {
    let side = |side: Side| &row.sides[side.index()];
    let rate = |which: Side| human_rate(side(which).items_per_s);
    let latency = |which: Side| {
        format!(
            "{}/{}",
            side(which).enqueue_p50_ns,
            side(which).enqueue_p99_ns
        )
    };
    format!(
        "{:>9} | {:>12} | {:>11} | {:>11} | {:>11} | {:>11} | {:>15} | {:>15} | {:>15} | {:>17} | {:>16} | {:>10.2}x, {:>9.2}x | {:>10.2}x, {:>10.2}x | {:>11.2}x, {:>10.2}x",
        row.producers,
        rate(Side::Ours),
        rate(Side::Lanes),
        rate(Side::Ingest),
        rate(Side::Crossbeam),
        rate(Side::Std),
        latency(Side::Ours),
        latency(Side::Lanes),
        latency(Side::Ingest),
        latency(Side::Crossbeam),
        latency(Side::Std),
        row.ratio_vs_crossbeam,
        row.ratio_vs_std,
        row.lanes_vs_crossbeam,
        row.lanes_vs_std,
        row.ingest_vs_crossbeam,
        row.ingest_vs_std,
    )
}

/// Whether the goals were met, judged from the rows measured (reported, never
/// asserted: benchmarks report, they do not judge).
pub fn goals(rows: &[ThreadsRow]) -> Vec<String> {
    let mut lines = Vec::new();
    let ingest_batch = rows.first().map_or(1, |row| row.layout.ingest_batch);
    // Batches are not what the goals compare (one enqueue against one push): say so.
    let ingest_name = if ingest_batch > 1 {
        format!("ingest (batches of {ingest_batch}, per record)")
    } else {
        "ingest".to_owned()
    };
    for (which, name) in [
        (Side::Ours, "one ring"),
        (Side::Lanes, "lanes"),
        (Side::Ingest, ingest_name.as_str()),
    ] {
        let at = |producers: usize| {
            rows.iter()
                .find(|row| row.producers == producers)
                .map(|row| row.sides[which.index()].clone())
        };
        if let (Some(two), Some(many)) = (at(2), at(256)) {
            let ratio = many.items_per_s / two.items_per_s;
            lines.push(format!(
                "{name}: 256 producers at {:.0}% of the 2-producer rate (goal >= 50%): {}",
                ratio * 100.0,
                if ratio >= 0.5 { "met" } else { "NOT met" }
            ));
        }
        let behind: Vec<String> = rows
            .iter()
            .filter(|row| {
                let (crossbeam, std) = match which {
                    Side::Lanes => (row.lanes_vs_crossbeam, row.lanes_vs_std),
                    Side::Ingest => (row.ingest_vs_crossbeam, row.ingest_vs_std),
                    _ => (row.ratio_vs_crossbeam, row.ratio_vs_std),
                };
                crossbeam <= 1.0 || std <= 1.0
            })
            .map(|row| row.producers.to_string())
            .collect();
        lines.push(if behind.is_empty() {
            format!("{name}: ahead of both peers at every count: met")
        } else {
            format!(
                "{name}: ahead of both peers at every count: NOT met (behind at {})",
                behind.join(", ")
            )
        });
        if let Some(one) = at(1) {
            lines.push(format!(
                "{name}: uncontended enqueue p99 {} ns (goal < 500 ns): {}",
                one.enqueue_p99_ns,
                if one.enqueue_p99_ns < 500 {
                    "met"
                } else {
                    "NOT met"
                }
            ));
        }
    }
    lines
}

/// `12.3M`-style rate.
fn human_rate(per_s: f64) -> String {
    if per_s >= 1e6 {
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
    fn counts_double_up_to_the_maximum() {
        assert_eq!(producer_counts(8), vec![1, 2, 4, 8]);
        assert_eq!(producer_counts(6), vec![1, 2, 4, 6]);
    }

    #[test]
    fn a_reserved_consumer_core_is_the_last_allowed_one() {
        let layout = Layout::reserved_consumer_core(&[0, 1, 2, 3]).unwrap();
        assert_eq!(layout.consumer_core, Some(3));
        assert_eq!(layout.producer_cores, vec![0, 1, 2]);
        assert_eq!(Layout::reserved_consumer_core(&[5]), None);
        assert_eq!(Layout::reserved_consumer_core(&[]), None);
    }

    /// Producers confined to one core still move every item (the layout is applied).
    #[test]
    fn confined_producers_move_every_item() {
        let core = *affinity::current().unwrap().first().unwrap();
        let layout = Layout {
            producer_cores: vec![core],
            wake_max: 1,
            ..Layout::shared()
        };
        let round = run_round(Side::Ours, 3, 1_000, &layout);
        assert_eq!(
            round.enqueue_ns.len(),
            3 * 1_000 / LATENCY_SAMPLE_EVERY as usize
        );
    }

    /// Every side, with one lane and with three (the lanes and ingest sides split their
    /// capacity; the ingest side its slots too): nothing lost or duplicated (`run_round`
    /// checks the sum), every sampled enqueue timed.
    #[test]
    fn every_side_moves_every_item() {
        for lanes in [1, 3] {
            let layout = Layout {
                lanes,
                ..Layout::shared()
            };
            for side in Side::ALL {
                let round = run_round(side, 4, 2_000, &layout);
                assert!(round.items_per_s > 0.0);
                assert_eq!(
                    round.enqueue_ns.len(),
                    4 * 2_000 / LATENCY_SAMPLE_EVERY as usize
                );
            }
        }
    }

    /// The ingest side in batches (the last one short), with the consumer pausing: every
    /// item arrives once (`run_round` checks the sum), one latency sample per call.
    #[test]
    fn the_ingest_side_moves_every_item_in_batches() {
        let layout = Layout {
            ingest_batch: 64,
            drain_pause_ns: 1_000,
            ..Layout::shared()
        };
        let round = run_round(Side::Ingest, 3, 1_000, &layout);
        assert!(round.items_per_s > 0.0);
        assert_eq!(round.enqueue_ns.len(), 3 * 1_000usize.div_ceil(64));
    }

    #[test]
    fn percentiles_pick_ranks() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), 51);
        assert_eq!(percentile(&samples, 99.0), 99);
    }
}
