//! The rings allocate at construction and never again: every hot-path operation runs
//! under a counting global allocator and must leave the count unchanged.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use percore_engine::ring::mpmc::Mpmc;
use percore_engine::ring::{Counting, spsc};

/// Counts allocations made by the current thread (other test threads do not disturb it).
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` unchanged; the counter is a const-initialised
// thread-local `Cell` with no destructor, so touching it never allocates or recurses.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract; we pass it on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above, for `dealloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        // SAFETY: as above, for `realloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

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
