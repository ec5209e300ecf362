//! Pool benchmarks: percore's `Pool` against `slab::Slab` and the global allocator.
//!
//! One operation is a full cycle: take a slot, write the whole payload (key included),
//! read the key back through `black_box`, give the slot back. `cycle` kernels do one
//! cycle at a time, the LIFO best case for every contender (the same slot or block comes
//! straight back). `hold` kernels take `HOLD_ITEMS` slots, then give them back in the order
//! taken (FIFO), so the next round's slots come back scattered. Single-threaded; `main`
//! pins the thread before running them.

use std::hint::black_box;

use percore_engine::pool::{Pool, TxSlot};
use slab::Slab;

use crate::harness::{Bench, Kernel, Metric, Sample};
use crate::item::{ITEM_BYTES_MIN, Item, key_sum};
use crate::machine::Pins;

/// Slots held at once by the `hold` pattern.
pub const HOLD_ITEMS: usize = 1_000;
/// Capacity of every pool, slab and holding vector (no contender may grow mid-run).
pub const POOL_CAPACITY: usize = 1_024;
/// Default borrow+release cycles per timed round.
pub const CYCLES_DEFAULT: u64 = 10_000_000;

const _: () = assert!(HOLD_ITEMS <= POOL_CAPACITY);

/// A payload that carries a key: `Item<N>` and the engine's `TxSlot`.
pub trait Payload: Copy {
    /// Bytes one payload occupies.
    const BYTES: usize = size_of::<Self>();
    /// A payload carrying `key`.
    fn with_key(key: u64) -> Self;
    /// The key it carries.
    fn key(&self) -> u64;
}

impl<const N: usize> Payload for Item<N> {
    #[inline(always)]
    fn with_key(key: u64) -> Self {
        Item::new(key)
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        Item::key(self)
    }
}

impl Payload for TxSlot {
    #[inline(always)]
    fn with_key(key: u64) -> Self {
        let mut slot = TxSlot::ZEROED;
        slot.bytes[..ITEM_BYTES_MIN].copy_from_slice(&key.to_le_bytes());
        slot
    }
    #[inline(always)]
    fn key(&self) -> u64 {
        let mut key = [0u8; ITEM_BYTES_MIN];
        key.copy_from_slice(&self.bytes[..ITEM_BYTES_MIN]);
        u64::from_le_bytes(key)
    }
}

/// Operations a `hold` kernel actually runs for a request of `ops`: whole rounds only.
fn hold_cycles(ops: u64) -> u64 {
    (ops / HOLD_ITEMS as u64).max(1) * HOLD_ITEMS as u64
}

fn timed(cycles: u64, run: impl FnOnce() -> u64) -> Sample {
    let start = std::time::Instant::now();
    let checksum = run();
    Sample {
        items: cycles,
        elapsed: start.elapsed(),
        checksum,
        expected: key_sum(cycles),
    }
}

fn new_pool<T: Payload>() -> Pool<T> {
    Pool::new("bench", POOL_CAPACITY, |_| T::with_key(0)).expect("capacity is valid")
}

/// Ours: `Pool::borrow`, write through `get_mut`, `release`, one at a time.
pub fn ours_cycle<T: Payload>(ops: u64, _: &Pins) -> Sample {
    let mut pool = new_pool::<T>();
    timed(ops, || {
        let mut sum = 0u64;
        for key in 0..ops {
            let handle = pool.borrow().expect("one slot in use at a time");
            let slot = pool.get_mut(handle);
            *slot = T::with_key(key);
            sum = sum.wrapping_add(black_box(&*slot).key());
            pool.release(black_box(handle)).expect("handle is live");
        }
        sum
    })
}

/// Peer: `Slab::insert` + `Slab::remove`, one at a time.
pub fn slab_cycle<T: Payload>(ops: u64, _: &Pins) -> Sample {
    let mut slab = Slab::<T>::with_capacity(POOL_CAPACITY);
    timed(ops, || {
        let mut sum = 0u64;
        for key in 0..ops {
            let index = slab.insert(T::with_key(key));
            sum = sum.wrapping_add(black_box(&slab[index]).key());
            black_box(slab.remove(black_box(index)));
        }
        sum
    })
}

/// Peer: `Box::new` + drop (the global allocator), one at a time.
pub fn box_cycle<T: Payload>(ops: u64, _: &Pins) -> Sample {
    timed(ops, || {
        let mut sum = 0u64;
        for key in 0..ops {
            let boxed = black_box(Box::new(T::with_key(key)));
            sum = sum.wrapping_add(boxed.key());
            drop(boxed);
        }
        sum
    })
}

/// Ours: borrow `HOLD_ITEMS`, then release them in borrow order.
pub fn ours_hold<T: Payload>(ops: u64, _: &Pins) -> Sample {
    let cycles = hold_cycles(ops);
    let mut pool = new_pool::<T>();
    let mut held = Vec::with_capacity(HOLD_ITEMS);
    timed(cycles, || {
        let mut sum = 0u64;
        for round in 0..cycles / HOLD_ITEMS as u64 {
            let first_key = round * HOLD_ITEMS as u64;
            for key in first_key..first_key + HOLD_ITEMS as u64 {
                let handle = pool.borrow().expect("HOLD_ITEMS <= POOL_CAPACITY");
                *pool.get_mut(handle) = T::with_key(key);
                held.push(handle);
            }
            for handle in held.drain(..) {
                sum = sum.wrapping_add(black_box(pool.get(handle)).key());
                pool.release(handle).expect("handle is live");
            }
        }
        sum
    })
}

/// Peer: `Slab` insert `HOLD_ITEMS`, then remove them in insertion order.
pub fn slab_hold<T: Payload>(ops: u64, _: &Pins) -> Sample {
    let cycles = hold_cycles(ops);
    let mut slab = Slab::<T>::with_capacity(POOL_CAPACITY);
    let mut held = Vec::with_capacity(HOLD_ITEMS);
    timed(cycles, || {
        let mut sum = 0u64;
        for round in 0..cycles / HOLD_ITEMS as u64 {
            let first_key = round * HOLD_ITEMS as u64;
            for key in first_key..first_key + HOLD_ITEMS as u64 {
                held.push(slab.insert(T::with_key(key)));
            }
            for index in held.drain(..) {
                sum = sum.wrapping_add(black_box(slab.remove(index)).key());
            }
        }
        sum
    })
}

/// Peer: `Box::new` `HOLD_ITEMS` times, then drop them in allocation order.
pub fn box_hold<T: Payload>(ops: u64, _: &Pins) -> Sample {
    let cycles = hold_cycles(ops);
    let mut held: Vec<Box<T>> = Vec::with_capacity(HOLD_ITEMS);
    timed(cycles, || {
        let mut sum = 0u64;
        for round in 0..cycles / HOLD_ITEMS as u64 {
            let first_key = round * HOLD_ITEMS as u64;
            for key in first_key..first_key + HOLD_ITEMS as u64 {
                held.push(Box::new(T::with_key(key)));
            }
            for boxed in held.drain(..) {
                sum = sum.wrapping_add(black_box(boxed).key());
            }
        }
        sum
    })
}

/// The four rows (cycle and hold, against slab and Box) for one payload type.
fn rows_for<T: Payload + 'static>(names: [&'static str; 2], ops: u64, rows: &mut Vec<Bench>) {
    let ops = ops.max(1);
    let [cycle_name, hold_name] = names;
    let cases: [(&'static str, &'static str, Kernel, Kernel); 4] = [
        (
            cycle_name,
            "slab::Slab",
            Box::new(ours_cycle::<T>),
            Box::new(slab_cycle::<T>),
        ),
        (
            cycle_name,
            "Box::new+drop",
            Box::new(ours_cycle::<T>),
            Box::new(box_cycle::<T>),
        ),
        (
            hold_name,
            "slab::Slab",
            Box::new(ours_hold::<T>),
            Box::new(slab_hold::<T>),
        ),
        (
            hold_name,
            "Box::new+drop",
            Box::new(ours_hold::<T>),
            Box::new(box_hold::<T>),
        ),
    ];
    for (name, peer, ours, peer_kernel) in cases {
        rows.push(Bench {
            name,
            peer,
            item_bytes: T::BYTES,
            threads: "1T",
            metric: Metric::Cycle,
            ops: if name == hold_name {
                hold_cycles(ops)
            } else {
                ops
            },
            ours,
            peer_kernel,
        });
    }
}

/// All pool rows for `ops` cycles per round.
pub fn benches(ops: u64) -> Vec<Bench> {
    let mut rows = Vec::new();
    rows_for::<Item<16>>(["pool_cycle", "pool_hold1000"], ops, &mut rows);
    rows_for::<Item<128>>(["pool_cycle", "pool_hold1000"], ops, &mut rows);
    rows_for::<TxSlot>(
        ["pool_cycle_txslot", "pool_hold1000_txslot"],
        ops,
        &mut rows,
    );
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pool kernel, ours and peers, returns every key it stored.
    #[test]
    fn every_pool_kernel_round_trips_every_key() {
        let pins = Pins::none();
        for bench in benches(2_500) {
            for (side, kernel) in [("ours", &bench.ours), ("peer", &bench.peer_kernel)] {
                let sample = kernel(bench.ops, &pins);
                assert_eq!(
                    sample.checksum, sample.expected,
                    "{side} of {} vs {} ({} B) lost a key",
                    bench.name, bench.peer, bench.item_bytes
                );
                assert_eq!(
                    sample.items, bench.ops,
                    "{side} of {} ran the wrong count",
                    bench.name
                );
            }
        }
    }

    #[test]
    fn txslot_payload_carries_its_key() {
        assert_eq!(<TxSlot as Payload>::with_key(77).key(), 77);
        assert_eq!(<TxSlot as Payload>::BYTES, 128);
    }
}
