//! Criterion micro-benchmarks of the rings, single-threaded: the cost of the operations
//! themselves with no cross-core traffic (the `percore-bench rings` binary measures that).
//!
//! Each group puts ours and the peers side by side on the same item type and capacity.

use std::hint::black_box;
use std::sync::mpsc;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use crossbeam_queue::{ArrayQueue, SegQueue};
use percore_bench::Item;
use percore_bench::rings::RING_CAPACITY;
use percore_engine::ring::{mpmc::Mpmc, spsc};

/// Items per batched iteration.
const BATCH_ITEMS: usize = 1_000;
const _: () = assert!(BATCH_ITEMS < RING_CAPACITY);

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
    bytes: usize,
    elements: u64,
) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(format!("{name}/{bytes}B"));
    group.throughput(Throughput::Elements(elements));
    group
}

/// One push then one pop on an empty SPSC ring.
fn spsc_push_pop<const N: usize>(c: &mut Criterion) {
    let mut group = group(c, "spsc_push_pop", N, 1);
    let item = Item::<N>::new(7);
    let (mut tx, mut rx) = spsc::channel::<Item<N>>(RING_CAPACITY);
    group.bench_function("ours", |b| {
        b.iter(|| {
            tx.push(black_box(item)).ok();
            black_box(rx.pop())
        })
    });
    let (mut tx, mut rx) = rtrb::RingBuffer::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("rtrb", |b| {
        b.iter(|| {
            tx.push(black_box(item)).ok();
            black_box(rx.pop().ok())
        })
    });
    let mut queue = Box::new(heapless::spsc::Queue::<Item<N>, RING_CAPACITY>::new());
    let (mut tx, mut rx) = queue.split();
    group.bench_function("heapless::spsc", |b| {
        b.iter(|| {
            tx.enqueue(black_box(item)).ok();
            black_box(rx.dequeue())
        })
    });
    let queue = ArrayQueue::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("crossbeam::ArrayQueue", |b| {
        b.iter(|| {
            queue.push(black_box(item)).ok();
            black_box(queue.pop())
        })
    });
    let (tx, rx) = mpsc::sync_channel::<Item<N>>(RING_CAPACITY);
    group.bench_function("std::sync_channel", |b| {
        b.iter(|| {
            tx.try_send(black_box(item)).ok();
            black_box(rx.try_recv().ok())
        })
    });
    group.finish();
}

/// Push `BATCH_ITEMS` then pop them, batched where the queue allows it.
fn spsc_batch<const N: usize>(c: &mut Criterion) {
    let mut group = group(c, "spsc_batch1000", N, BATCH_ITEMS as u64);
    let items: Vec<Item<N>> = (0..BATCH_ITEMS as u64).map(Item::new).collect();
    let mut received = vec![Item::<N>::default(); BATCH_ITEMS];
    let (mut tx, mut rx) = spsc::channel::<Item<N>>(RING_CAPACITY);
    group.bench_function("ours push_slice+pop_slice", |b| {
        b.iter(|| {
            let pushed = tx.push_slice(black_box(&items));
            let popped = rx.pop_slice(&mut received);
            debug_assert_eq!((pushed, popped), (BATCH_ITEMS, BATCH_ITEMS));
            black_box(&received);
        })
    });
    let (mut tx, mut rx) = rtrb::RingBuffer::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("rtrb chunk", |b| {
        b.iter(|| {
            let chunk = tx.write_chunk_uninit(BATCH_ITEMS).expect("ring is empty");
            chunk.fill_from_iter(black_box(&items).iter().copied());
            let chunk = rx.read_chunk(BATCH_ITEMS).expect("batch was pushed");
            let (first, second) = chunk.as_slices();
            black_box((first, second));
            chunk.commit_all();
        })
    });
    group.bench_function("rtrb single", |b| {
        b.iter(|| {
            for item in black_box(&items) {
                tx.push(*item).ok();
            }
            for _ in 0..BATCH_ITEMS {
                black_box(rx.pop().ok());
            }
        })
    });
    let mut queue = Box::new(heapless::spsc::Queue::<Item<N>, RING_CAPACITY>::new());
    let (mut tx, mut rx) = queue.split();
    group.bench_function("heapless::spsc single", |b| {
        b.iter(|| {
            for item in black_box(&items) {
                tx.enqueue(*item).ok();
            }
            for _ in 0..BATCH_ITEMS {
                black_box(rx.dequeue());
            }
        })
    });
    group.finish();
}

/// One push then one pop on an empty MPMC queue (uncontended).
fn mpmc_push_pop<const N: usize>(c: &mut Criterion) {
    let mut group = group(c, "mpmc_push_pop", N, 1);
    let item = Item::<N>::new(7);
    let queue = Mpmc::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("ours", |b| {
        b.iter(|| {
            queue.push(black_box(item)).ok();
            black_box(queue.pop())
        })
    });
    let queue = ArrayQueue::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("crossbeam::ArrayQueue", |b| {
        b.iter(|| {
            queue.push(black_box(item)).ok();
            black_box(queue.pop())
        })
    });
    let queue = SegQueue::<Item<N>>::new();
    group.bench_function("crossbeam::SegQueue", |b| {
        b.iter(|| {
            queue.push(black_box(item));
            black_box(queue.pop())
        })
    });
    #[expect(
        deprecated,
        reason = "single-threaded: the pre-emption caveat cannot arise"
    )]
    let queue = Box::new(heapless::mpmc::Queue::<Item<N>, RING_CAPACITY>::new());
    group.bench_function("heapless::mpmc", |b| {
        b.iter(|| {
            queue.enqueue(black_box(item)).ok();
            black_box(queue.dequeue())
        })
    });
    group.finish();
}

/// Push `BATCH_ITEMS` then pop them on an MPMC queue (uncontended).
fn mpmc_batch<const N: usize>(c: &mut Criterion) {
    let mut group = group(c, "mpmc_batch1000", N, BATCH_ITEMS as u64);
    let items: Vec<Item<N>> = (0..BATCH_ITEMS as u64).map(Item::new).collect();
    let queue = Mpmc::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("ours push_slice+pop_batch", |b| {
        b.iter(|| {
            queue.push_slice(black_box(&items));
            let mut sum = 0u64;
            queue.pop_batch(BATCH_ITEMS, |item| sum = sum.wrapping_add(item.key()));
            black_box(sum)
        })
    });
    let queue = ArrayQueue::<Item<N>>::new(RING_CAPACITY);
    group.bench_function("crossbeam::ArrayQueue", |b| {
        b.iter(|| {
            for item in black_box(&items) {
                queue.push(*item).ok();
            }
            let mut sum = 0u64;
            while let Some(item) = queue.pop() {
                sum = sum.wrapping_add(item.key());
            }
            black_box(sum)
        })
    });
    group.finish();
}

fn all(c: &mut Criterion) {
    spsc_push_pop::<16>(c);
    spsc_push_pop::<128>(c);
    spsc_batch::<16>(c);
    spsc_batch::<128>(c);
    mpmc_push_pop::<16>(c);
    mpmc_push_pop::<128>(c);
    mpmc_batch::<16>(c);
    mpmc_batch::<128>(c);
}

criterion_group! {
    name = rings;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = all
}
criterion_main!(rings);
