//! Ping-pong: one item crosses to the other core and one comes back, `ops` times.
//!
//! Two SPSC rings, A (pinger to ponger) and B (ponger to pinger). Only one item is ever in
//! flight, so this measures the cross-core hand-off latency, not pipelined throughput.
//! The sample counts `2 * ops` one-way hops, so ns per item is the one-way latency.

use percore_engine::ring::spsc as ours_spsc;

use super::RING_CAPACITY;
use crate::harness::{Backoff, Sample, run_pair};
use crate::item::{Item, key_sum};
use crate::machine::Pins;

/// Ring capacity for ping-pong: one slot would do; keep the common capacity for fairness.
const PINGPONG_CAPACITY: usize = RING_CAPACITY;

#[inline(always)]
fn push_blocking<const N: usize>(
    push: &mut impl FnMut(Item<N>) -> Result<(), Item<N>>,
    item: Item<N>,
) {
    let mut item = item;
    let mut backoff = Backoff::new();
    while let Err(back) = push(item) {
        item = back;
        backoff.snooze();
    }
}

#[inline(always)]
fn pop_blocking<const N: usize>(pop: &mut impl FnMut() -> Option<Item<N>>) -> Item<N> {
    let mut backoff = Backoff::new();
    loop {
        if let Some(item) = pop() {
            return item;
        }
        backoff.snooze();
    }
}

/// Runs `ops` round trips over rings `a` (there) and `b` (back).
pub fn round_trips<const N: usize, PushA, PopA, PushB, PopB>(
    ops: u64,
    pins: &Pins,
    (mut push_a, mut pop_a): (PushA, PopA),
    (mut push_b, mut pop_b): (PushB, PopB),
) -> Sample
where
    PushA: FnMut(Item<N>) -> Result<(), Item<N>> + Send,
    PopA: FnMut() -> Option<Item<N>> + Send,
    PushB: FnMut(Item<N>) -> Result<(), Item<N>> + Send,
    PopB: FnMut() -> Option<Item<N>> + Send,
{
    let (elapsed, checksum) = run_pair(
        pins,
        // The ponger echoes every item back.
        move || {
            for _ in 0..ops {
                let item = pop_blocking(&mut pop_a);
                push_blocking(&mut push_b, item);
            }
        },
        // The pinger sends key `k` and waits for it to come back.
        move || {
            let mut sum = 0u64;
            for key in 0..ops {
                push_blocking(&mut push_a, Item::new(key));
                let echoed = pop_blocking(&mut pop_b);
                debug_assert_eq!(
                    echoed.key(),
                    key,
                    "one item in flight: it comes back in order"
                );
                sum = sum.wrapping_add(echoed.key());
            }
            sum
        },
    );
    Sample {
        items: 2 * ops,
        elapsed,
        checksum,
        expected: key_sum(ops),
    }
}

/// Ours: two `percore_engine::ring::spsc` channels.
pub fn ours<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx_a, mut rx_a) = ours_spsc::channel::<Item<N>>(PINGPONG_CAPACITY);
    let (mut tx_b, mut rx_b) = ours_spsc::channel::<Item<N>>(PINGPONG_CAPACITY);
    round_trips(
        ops,
        pins,
        (
            move |item| tx_a.push(item).map_err(|full| full.0),
            move || rx_a.pop(),
        ),
        (
            move |item| tx_b.push(item).map_err(|full| full.0),
            move || rx_b.pop(),
        ),
    )
}

/// Peer: two `rtrb` ring buffers.
pub fn rtrb<const N: usize>(ops: u64, pins: &Pins) -> Sample {
    let (mut tx_a, mut rx_a) = rtrb::RingBuffer::<Item<N>>::new(PINGPONG_CAPACITY);
    let (mut tx_b, mut rx_b) = rtrb::RingBuffer::<Item<N>>::new(PINGPONG_CAPACITY);
    round_trips(
        ops,
        pins,
        (
            move |item| tx_a.push(item).map_err(|rtrb::PushError::Full(back)| back),
            move || rx_a.pop().ok(),
        ),
        (
            move |item| tx_b.push(item).map_err(|rtrb::PushError::Full(back)| back),
            move || rx_b.pop().ok(),
        ),
    )
}
