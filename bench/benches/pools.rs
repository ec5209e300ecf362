//! Criterion micro-benchmarks of the pools against `slab::Slab` and `Box`: one
//! borrow+release cycle, and borrowing `HOLD_ITEMS` then releasing them in borrow order.
//!
//! Pools, slabs and holding vectors are built once per benchmark, outside the timed loop.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use percore_bench::Item;
use percore_bench::pools::{HOLD_ITEMS, POOL_CAPACITY, Payload};
use percore_engine::pool::{Pool, TxSlot};
use slab::Slab;

fn cycle<T: Payload>(c: &mut Criterion, label: &str) {
    let mut group = c.benchmark_group(format!("pool_cycle/{label}"));
    group.throughput(Throughput::Elements(1));
    let mut pool = Pool::new("bench", POOL_CAPACITY, |_| T::with_key(0)).expect("valid capacity");
    group.bench_function("ours Pool", |b| {
        b.iter(|| {
            let handle = pool.borrow().expect("one slot in use at a time");
            let slot = pool.get_mut(handle);
            *slot = T::with_key(7);
            let key = black_box(&*slot).key();
            pool.release(black_box(handle)).expect("handle is live");
            key
        })
    });
    let mut slab = Slab::<T>::with_capacity(POOL_CAPACITY);
    group.bench_function("slab::Slab", |b| {
        b.iter(|| {
            let index = slab.insert(T::with_key(7));
            let key = black_box(&slab[index]).key();
            black_box(slab.remove(black_box(index)));
            key
        })
    });
    group.bench_function("Box::new+drop", |b| {
        b.iter(|| black_box(Box::new(T::with_key(7))).key())
    });
    group.finish();
}

fn hold<T: Payload>(c: &mut Criterion, label: &str) {
    let mut group = c.benchmark_group(format!("pool_hold{HOLD_ITEMS}/{label}"));
    group.throughput(Throughput::Elements(HOLD_ITEMS as u64));
    let mut pool = Pool::new("bench", POOL_CAPACITY, |_| T::with_key(0)).expect("valid capacity");
    let mut handles = Vec::with_capacity(HOLD_ITEMS);
    group.bench_function("ours Pool", |b| {
        b.iter(|| {
            for key in 0..HOLD_ITEMS as u64 {
                let handle = pool.borrow().expect("HOLD_ITEMS <= POOL_CAPACITY");
                *pool.get_mut(handle) = T::with_key(key);
                handles.push(handle);
            }
            let mut sum = 0u64;
            for handle in handles.drain(..) {
                sum = sum.wrapping_add(black_box(pool.get(handle)).key());
                pool.release(handle).expect("handle is live");
            }
            sum
        })
    });
    let mut slab = Slab::<T>::with_capacity(POOL_CAPACITY);
    let mut indices = Vec::with_capacity(HOLD_ITEMS);
    group.bench_function("slab::Slab", |b| {
        b.iter(|| {
            for key in 0..HOLD_ITEMS as u64 {
                indices.push(slab.insert(T::with_key(key)));
            }
            let mut sum = 0u64;
            for index in indices.drain(..) {
                sum = sum.wrapping_add(black_box(slab.remove(index)).key());
            }
            sum
        })
    });
    let mut boxes: Vec<Box<T>> = Vec::with_capacity(HOLD_ITEMS);
    group.bench_function("Box::new+drop", |b| {
        b.iter(|| {
            for key in 0..HOLD_ITEMS as u64 {
                boxes.push(Box::new(T::with_key(key)));
            }
            let mut sum = 0u64;
            for boxed in boxes.drain(..) {
                sum = sum.wrapping_add(black_box(boxed).key());
            }
            sum
        })
    });
    group.finish();
}

fn all(c: &mut Criterion) {
    cycle::<Item<16>>(c, "16B");
    cycle::<Item<128>>(c, "128B");
    cycle::<TxSlot>(c, "TxSlot-128B");
    hold::<Item<16>>(c, "16B");
    hold::<Item<128>>(c, "128B");
    hold::<TxSlot>(c, "TxSlot-128B");
}

criterion_group! {
    name = pools;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = all
}
criterion_main!(pools);
