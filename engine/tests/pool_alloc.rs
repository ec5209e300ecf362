//! Zero allocations after start-up: a counting global allocator proves that one million
//! borrow / write / release cycles across a shard's three pools allocate nothing.
//!
//! This is its own test binary (the `#[global_allocator]` is process-wide) and counts
//! per thread, so the test harness's own allocations on other threads do not leak in.

use percore_engine::pool::{BatchSlot, MessageBuf, PoolConfig, PoolError, ShardPools};

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Record {
    id: u64,
    amount: u64,
    rest: [u64; 14],
}

const CYCLES: u64 = 1_000_000;

#[test]
fn steady_state_performs_zero_allocations() {
    let before_new = allocations();
    let config = PoolConfig::default();
    let mut pools = ShardPools::new(&config).expect("default config is valid");
    let construction = allocations() - before_new;
    // Proves the counter works: building the pools allocates (slots, buffers, free lists).
    assert!(
        construction > config.batches as u64 + config.messages as u64,
        "counter saw only {construction} allocations during construction"
    );

    let payload = [0xA5u8; 200];
    let before_steady = allocations();
    let mut checksum = 0u64;
    for cycle in 0..CYCLES {
        let tx = pools.transactions.borrow().expect("one borrowed at a time");
        let record = pools.transactions.get_mut(tx).record_mut::<Record>();
        record.id = cycle;
        record.amount = cycle * 3;
        let batch = pools.batches.borrow_with(BatchSlot::reset).expect("free");
        let slot = pools.batches.get_mut(batch);
        slot.op = cycle;
        slot.push(tx.index()).expect("empty batch has room");
        let message = pools.messages.borrow_with(MessageBuf::reset).expect("free");
        let bytes = &payload[..(cycle % 200) as usize];
        pools
            .messages
            .get_mut(message)
            .fill_from(bytes)
            .expect("fits 256 bytes");

        checksum = checksum
            .wrapping_add(pools.transactions.get(tx).record::<Record>().amount)
            .wrapping_add(pools.batches.get(batch).tx_indices()[0].into())
            .wrapping_add(pools.messages.get(message).len() as u64);
        pools.messages.release(message).expect("live");
        pools.batches.release(batch).expect("live");
        pools.transactions.release(tx).expect("live");
    }
    assert_eq!(allocations() - before_steady, 0, "hot path allocated");

    // The failure paths are allocation-free too: exhaustion and stale handles.
    let before_errors = allocations();
    let mut held = [pools.transactions.borrow().expect("free"); 1];
    while let Ok(handle) = pools.transactions.borrow() {
        held[0] = handle;
    }
    let exhausted = pools.transactions.borrow();
    assert!(matches!(
        exhausted,
        Err(PoolError::Exhausted {
            pool: "transactions",
            ..
        })
    ));
    pools.transactions.clear();
    assert!(matches!(
        pools.transactions.release(held[0]),
        Err(PoolError::StaleHandle { .. })
    ));
    let _ = pools
        .messages
        .borrow()
        .map(|handle| pools.messages.get(handle).as_slice().len());
    assert_eq!(allocations() - before_errors, 0, "error paths allocated");

    let stats = pools.stats();
    assert_eq!(stats[0].borrows, CYCLES + config.transactions as u64);
    assert_eq!(stats[1].borrows, CYCLES);
    assert_eq!(stats[1].high_water, 1);
    assert!(checksum != 0);
}
