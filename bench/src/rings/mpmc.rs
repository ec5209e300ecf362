//! MPMC kernels: `pairs` producers and `pairs` consumers share one queue.
//!
//! Producer `i` pushes keys `i, i + pairs, i + 2 * pairs, ...` below `ops`, so together they
//! push `0..ops` exactly once. Consumers pop until a shared counter of consumed items
//! reaches `ops`; each consumer adds to that counter in chunks of `CONSUMED_FLUSH_ITEMS`
//! (and whenever the queue looks empty), so the counter is not a second contended queue.

use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_queue::{ArrayQueue, SegQueue};
use percore_engine::ring::mpmc::Mpmc;

use super::{BATCH_ITEMS, RING_CAPACITY};
use crate::harness::{Backoff, Sample, run_group};
use crate::item::{Item, key_sum};
use crate::machine::{Pins, Role};

/// A consumer publishes its count to the shared counter at least this often.
const CONSUMED_FLUSH_ITEMS: u64 = 1_024;

/// Runs the shared-queue protocol. `pop_some` adds the keys of the items it popped (zero
/// or more) to the sum and returns how many it popped.
pub fn shared<const N: usize, Push, PopSome>(
    ops: u64,
    pins: &Pins,
    pairs: usize,
    push: Push,
    pop_some: PopSome,
) -> Sample
where
    Push: Fn(Item<N>) -> Result<(), Item<N>> + Sync,
    PopSome: Fn(&mut u64) -> u64 + Sync,
{
    assert!(pairs > 0, "at least one producer and one consumer");
    let consumed = AtomicU64::new(0);
    let (elapsed, checksum) = run_group(
        pins,
        pairs,
        pairs,
        |index| {
            for key in (index as u64..ops).step_by(pairs) {
                let mut item = Item::new(key);
                let mut backoff = Backoff::new();
                while let Err(back) = push(item) {
                    item = back;
                    backoff.snooze();
                }
            }
        },
        |_| {
            let (mut sum, mut unflushed) = (0u64, 0u64);
            let mut backoff = Backoff::new();
            loop {
                let popped = pop_some(&mut sum);
                unflushed += popped;
                if popped > 0 && unflushed < CONSUMED_FLUSH_ITEMS {
                    backoff = Backoff::new();
                    continue;
                }
                // Relaxed: the counter only decides when to stop; the items themselves were
                // synchronised by the queue, and the sums travel back through `join`.
                let total = if unflushed == 0 {
                    consumed.load(Ordering::Relaxed)
                } else {
                    consumed.fetch_add(unflushed, Ordering::Relaxed) + unflushed
                };
                unflushed = 0;
                debug_assert!(total <= ops, "consumers popped more than was pushed");
                if total >= ops {
                    break;
                }
                if popped == 0 {
                    backoff.snooze();
                }
            }
            sum
        },
    );
    Sample {
        items: ops,
        elapsed,
        checksum,
        expected: key_sum(ops),
    }
}

#[inline(always)]
fn add_key<const N: usize>(sum: &mut u64, item: Option<Item<N>>) -> u64 {
    match item {
        Some(item) => {
            *sum = sum.wrapping_add(item.key());
            1
        }
        None => 0,
    }
}

/// Ours: `percore_engine::ring::mpmc::Mpmc`, `push` / `pop`.
pub fn ours<const N: usize>(ops: u64, pins: &Pins, pairs: usize) -> Sample {
    let queue = Mpmc::<Item<N>>::new(RING_CAPACITY);
    shared(
        ops,
        pins,
        pairs,
        |item| queue.push(item).map_err(|full| full.0),
        |sum| add_key(sum, queue.pop()),
    )
}

/// Ours: `push` / `pop_batch` of up to `BATCH_ITEMS`.
pub fn ours_pop_batch<const N: usize>(ops: u64, pins: &Pins, pairs: usize) -> Sample {
    let queue = Mpmc::<Item<N>>::new(RING_CAPACITY);
    shared(
        ops,
        pins,
        pairs,
        |item| queue.push(item).map_err(|full| full.0),
        |sum| queue.pop_batch(BATCH_ITEMS, |item| *sum = sum.wrapping_add(item.key())) as u64,
    )
}

/// Peer: `crossbeam_queue::ArrayQueue`.
pub fn crossbeam_array<const N: usize>(ops: u64, pins: &Pins, pairs: usize) -> Sample {
    let queue = ArrayQueue::<Item<N>>::new(RING_CAPACITY);
    shared(
        ops,
        pins,
        pairs,
        |item| queue.push(item),
        |sum| add_key(sum, queue.pop()),
    )
}

/// Peer: `crossbeam_queue::SegQueue` (unbounded: a push never fails, so a fast producer
/// can run ahead and allocate; not a like-for-like bounded ring).
pub fn crossbeam_seg<const N: usize>(ops: u64, pins: &Pins, pairs: usize) -> Sample {
    let queue = SegQueue::<Item<N>>::new();
    shared(
        ops,
        pins,
        pairs,
        |item| {
            queue.push(item);
            Ok(())
        },
        |sum| add_key(sum, queue.pop()),
    )
}

/// Peer: `heapless::mpmc::Queue` (Vyukov's bounded queue; needs heapless's `mpmc_large`
/// feature for more than 128 slots). heapless deprecates `new` because a pre-empted thread
/// can make other threads' operations fail spuriously; the kernels retry, as advised.
pub fn heapless_mpmc<const N: usize>(ops: u64, pins: &Pins, pairs: usize) -> Sample {
    #[expect(deprecated, reason = "retry on failure is exactly the advised use")]
    let queue = Box::new(heapless::mpmc::Queue::<Item<N>, RING_CAPACITY>::new());
    shared(
        ops,
        pins,
        pairs,
        |item| queue.enqueue(item),
        |sum| add_key(sum, queue.dequeue()),
    )
}

/// Pushes only: `producers` pinned threads each push their share of `0..ops` (as in
/// [`shared`]) into a queue with room for all of them, and nobody pops, so the claim
/// counter is all they share: this measures what contention on it costs. A full queue is a
/// bug here. Timed from the first producer's start to the last one's end; `pop` drains the
/// queue afterwards, untimed, for the checksum.
fn push_only<const N: usize, Push, Pop>(
    ops: u64,
    pins: &Pins,
    producers: usize,
    push: Push,
    pop: Pop,
) -> Sample
where
    Push: Fn(Item<N>) -> Result<(), Item<N>> + Sync,
    Pop: Fn() -> Option<Item<N>>,
{
    assert!(producers > 0, "at least one producer");
    let barrier = Barrier::new(producers);
    let elapsed = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..producers)
            .map(|index| {
                let (barrier, push) = (&barrier, &push);
                scope.spawn(move || {
                    pins.pin_current(Role::Producer, index);
                    barrier.wait();
                    let start = Instant::now();
                    for key in (index as u64..ops).step_by(producers) {
                        assert!(push(Item::new(key)).is_ok(), "sized for every item");
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        let spans: Vec<(Instant, Instant)> = threads
            .into_iter()
            .map(|thread| thread.join().expect("producer thread panicked"))
            .collect();
        let start = spans.iter().map(|span| span.0).min().expect("a producer");
        let end = spans.iter().map(|span| span.1).max().expect("a producer");
        end - start
    });
    let mut checksum = 0u64;
    while add_key(&mut checksum, pop()) > 0 {}
    Sample {
        items: ops,
        elapsed,
        checksum,
        expected: key_sum(ops),
    }
}

/// Ours: `push_only` into an `Mpmc` with room for `ops` items.
pub fn ours_push_only<const N: usize>(ops: u64, pins: &Pins, producers: usize) -> Sample {
    let queue = Mpmc::<Item<N>>::new((ops as usize).next_power_of_two().max(2));
    push_only(
        ops,
        pins,
        producers,
        |item| queue.push(item).map_err(|full| full.0),
        || queue.pop(),
    )
}

/// Peer: `push_only` into a `crossbeam_queue::ArrayQueue` with room for `ops` items.
pub fn crossbeam_array_push_only<const N: usize>(
    ops: u64,
    pins: &Pins,
    producers: usize,
) -> Sample {
    let queue = ArrayQueue::<Item<N>>::new((ops as usize).max(1));
    push_only(
        ops,
        pins,
        producers,
        |item| queue.push(item),
        || queue.pop(),
    )
}
