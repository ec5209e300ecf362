//! SPSC kernels: one producer thread pushes keys `0..ops`, one consumer pops and sums them.
//!
//! Single-item kernels share `single_item`; batched kernels share `batched`, whose
//! producer stages `BATCH_ITEMS` items in a local buffer and hands the queue a slice, and
//! whose consumer takes up to `BATCH_ITEMS` per call. Each queue only supplies adapters.

use std::sync::mpsc::{self, TryRecvError, TrySendError};

use crossbeam_queue::ArrayQueue;
use percore_engine::ring::spsc as ours_spsc;

use super::{BATCH_ITEMS, RING_CAPACITY};
use crate::harness::{Backoff, Sample, run_pair};
use crate::item::{Item, key_sum};
use crate::machine::Pins;

/// Moves `ops` items one at a time. `push` hands the item back when full.
pub fn single_item<const N: usize, Push, Pop>(
    ops: u64,
    pins: &Pins,
    mut push: Push,
    mut pop: Pop,
) -> Sample
where
    Push: FnMut(Item<N>) -> Result<(), Item<N>> + Send,
    Pop: FnMut() -> Option<Item<N>> + Send,
{
    let (elapsed, checksum) = run_pair(
        pins,
        move || {
            for key in 0..ops {
                let mut item = Item::new(key);
                let mut backoff = Backoff::new();
                while let Err(back) = push(item) {
                    item = back;
                    backoff.snooze();
                }
            }
        },
        move || {
            let (mut sum, mut received) = (0u64, 0u64);
            let mut backoff = Backoff::new();
            while received < ops {
                if let Some(item) = pop() {
                    sum = sum.wrapping_add(item.key());
                    received += 1;
                    backoff = Backoff::new();
                } else {
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

/// Moves `ops` items in batches. `push_slice` returns how many leading items it took;
/// `pop_batch` adds the keys of up to `BATCH_ITEMS` popped items to the sum and returns
/// how many it popped.
pub fn batched<const N: usize, PushSlice, PopBatch>(
    ops: u64,
    pins: &Pins,
    mut push_slice: PushSlice,
    mut pop_batch: PopBatch,
) -> Sample
where
    PushSlice: FnMut(&[Item<N>]) -> usize + Send,
    PopBatch: FnMut(&mut u64) -> usize + Send,
{
    let (elapsed, checksum) = run_pair(
        pins,
        move || {
            let mut staged = [Item::<N>::default(); BATCH_ITEMS];
            let mut next = 0u64;
            while next < ops {
                let len = (ops - next).min(BATCH_ITEMS as u64) as usize;
                for (offset, slot) in staged[..len].iter_mut().enumerate() {
                    *slot = Item::new(next + offset as u64);
                }
                let mut sent = 0;
                let mut backoff = Backoff::new();
                while sent < len {
                    let taken = push_slice(&staged[sent..len]);
                    debug_assert!(taken <= len - sent, "a push cannot take more than offered");
                    if taken == 0 {
                        backoff.snooze();
                    } else {
                        sent += taken;
                        backoff = Backoff::new();
                    }
                }
                next += len as u64;
            }
        },
        move || {
            let (mut sum, mut received) = (0u64, 0u64);
            let mut backoff = Backoff::new();
            while received < ops {
                let popped = pop_batch(&mut sum);
                debug_assert!(popped <= BATCH_ITEMS, "a batch pop is bounded");
                if popped == 0 {
                    backoff.snooze();
                } else {
                    received += popped as u64;
                    backoff = Backoff::new();
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
fn add_keys<const N: usize>(sum: &mut u64, items: &[Item<N>]) {
    for item in items {
        *sum = sum.wrapping_add(item.key());
    }
}

/// Ours: `percore_engine::ring::spsc`, `push` / `pop`.
pub fn ours_single<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx, mut rx) = ours_spsc::channel::<Item<N>>(RING_CAPACITY);
    single_item(
        ops,
        pins,
        move |item| tx.push(item).map_err(|full| full.0),
        move || rx.pop(),
    )
}

/// Ours: `push_slice` / `pop_slice` (copies through a consumer-side buffer).
pub fn ours_batch_slice<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx, mut rx) = ours_spsc::channel::<Item<N>>(RING_CAPACITY);
    let mut received = [Item::<N>::default(); BATCH_ITEMS];
    batched(
        ops,
        pins,
        move |items| tx.push_slice(items),
        move |sum| {
            let popped = rx.pop_slice(&mut received);
            add_keys(sum, &received[..popped]);
            popped
        },
    )
}

/// Ours: `push_iter` / `read_chunk` (reads in place, like rtrb's chunk API).
pub fn ours_batch_chunk<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx, mut rx) = ours_spsc::channel::<Item<N>>(RING_CAPACITY);
    batched(
        ops,
        pins,
        move |items| tx.push_iter(&mut items.iter().copied()),
        move |sum| {
            let chunk = rx.read_chunk(BATCH_ITEMS);
            let (first, second) = chunk.as_slices();
            let popped = first.len() + second.len();
            add_keys(sum, first);
            add_keys(sum, second);
            chunk.commit_all();
            popped
        },
    )
}

/// Peer: `rtrb::RingBuffer`, `push` / `pop`.
pub fn rtrb_single<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx, mut rx) = rtrb::RingBuffer::<Item<N>>::new(RING_CAPACITY);
    single_item(
        ops,
        pins,
        move |item| tx.push(item).map_err(|rtrb::PushError::Full(back)| back),
        move || rx.pop().ok(),
    )
}

/// Peer: rtrb's chunk API, `write_chunk_uninit` + `fill_from_iter` / `read_chunk` in place.
pub fn rtrb_batch_chunk<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx, mut rx) = rtrb::RingBuffer::<Item<N>>::new(RING_CAPACITY);
    batched(
        ops,
        pins,
        move |items| {
            let len = tx.slots().min(items.len());
            if len == 0 {
                return 0;
            }
            let chunk = tx
                .write_chunk_uninit(len)
                .expect("slots() said they were free");
            chunk.fill_from_iter(items[..len].iter().copied())
        },
        move |sum| {
            let len = rx.slots().min(BATCH_ITEMS);
            if len == 0 {
                return 0;
            }
            let chunk = rx.read_chunk(len).expect("slots() said they were filled");
            let (first, second) = chunk.as_slices();
            add_keys(sum, first);
            add_keys(sum, second);
            chunk.commit_all();
            len
        },
    )
}

/// Peer: `heapless::spsc::Queue` split into producer and consumer (usable capacity is
/// `RING_CAPACITY - 1`).
pub fn heapless_single<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    // Boxed: the ring lives inline in the queue (`RING_CAPACITY * N` bytes).
    let mut queue = Box::new(heapless::spsc::Queue::<Item<N>, RING_CAPACITY>::new());
    let (mut tx, mut rx) = queue.split();
    single_item(
        ops,
        pins,
        move |item| tx.enqueue(item),
        move || rx.dequeue(),
    )
}

/// Peer: `crossbeam_queue::ArrayQueue` used by exactly one producer and one consumer.
pub fn crossbeam_array_single<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let queue = ArrayQueue::<Item<N>>::new(RING_CAPACITY);
    let queue = &queue;
    single_item(ops, pins, move |item| queue.push(item), move || queue.pop())
}

/// Peer: `std::sync::mpsc::sync_channel`, non-blocking `try_send` / `try_recv` with the
/// same backoff as everyone else (the blocking calls would measure futex wake-ups).
pub fn std_sync_channel<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (tx, rx) = mpsc::sync_channel::<Item<N>>(RING_CAPACITY);
    single_item(
        ops,
        pins,
        move |item| match tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(back)) => Err(back),
            Err(TrySendError::Disconnected(_)) => panic!("consumer hung up early"),
        },
        move || match rx.try_recv() {
            Ok(item) => Some(item),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => panic!("producer hung up early"),
        },
    )
}
