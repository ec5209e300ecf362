//! The rings allocate at construction and never again: every hot-path operation runs
//! under a counting global allocator and must leave the count unchanged.
#![cfg(not(loom))]

use percore_engine::ring::mpmc::Mpmc;
use percore_engine::ring::{Counting, spsc};

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn spsc_hot_path_does_not_allocate() {
    let (mut producer, mut consumer) = spsc::channel_with_metrics::<u64, Counting>(1024);
    let items = [7u64; 300];
    let mut out = [0u64; 300];
    let before = allocations();
    for round in 0..1_000u64 {
        let _ = producer.push(round);
        producer.push_slice(&items);
        producer.push_iter(&mut (0..200u64));
        let _ = producer.free_slots();
        let _ = consumer.pop();
        consumer.pop_slice(&mut out);
        consumer.pop_each(150, |item| assert!(item < 1_000));
        let chunk = consumer.read_chunk(100);
        let _ = chunk.as_slices();
        chunk.commit_all();
        let _ = (consumer.available(), consumer.len(), producer.stats());
    }
    assert_eq!(allocations(), before, "an SPSC operation allocated");
}

#[test]
fn mpmc_hot_path_does_not_allocate() {
    let ring = Mpmc::<u64, Counting>::new(1024);
    let items = [7u64; 300];
    let mut out = [0u64; 300];
    let before = allocations();
    for round in 0..1_000u64 {
        let _ = ring.push(round);
        ring.push_slice(&items);
        let _ = ring.pop();
        ring.pop_slice(&mut out);
        ring.pop_batch(150, |item| assert!(item < 1_000));
        let _ = (ring.len(), ring.stats());
    }
    assert_eq!(allocations(), before, "an MPMC operation allocated");
}
