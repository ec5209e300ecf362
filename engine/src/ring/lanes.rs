//! Many producers, one drain, without one shared claim index: producers spread over several
//! MPMC rings ("lanes") that the consumer drains in turn.
//!
//! Every push into one [`Mpmc`] claims a position from its one `tail`, and every claim
//! moves that cache line to the claiming core. Measured on 16 vCPUs (docs/benchmarks.md,
//! "Many threads into one consumer", third lease), one ring falls from 14M items/s with one
//! producer to about 3M with 16, and stays there up to 1,024 producers, whatever the
//! waiting scheme and whether the consumer has a core of its own; crossbeam's `ArrayQueue`
//! falls the same way. [`Lanes`] gives each lane its own ring and its own [`Waiters`], so
//! `k` lanes divide the producers contending for one line by `k`.
//!
//! **Order.** A producer that always pushes into the same lane (the lane is the caller's
//! choice: [`lane_of_current_thread`] gives each thread a fixed one) has its items
//! drained in the order it pushed them, as each lane is FIFO. Items of producers in
//! different lanes have no order between them.
//!
//! **Waking.** One drain may take from every lane, and each lane wakes its own waiters, so
//! each lane wakes at most `WAKE_PER_NOTIFY_MAX / lanes` (at least one) per drain: a drain
//! wakes about as many threads as one ring's would. Waking eight per lane (64 per drain
//! with eight lanes) cut throughput at 64–1,024 producers on 2 vCPUs to a tenth, the woken
//! threads taking the consumer's CPU.
//!
//! **Fairness.** [`Lanes::pop_batch`] starts each call at the lane after the one the
//! previous call started at and takes at most an even share of `max` from each lane on its
//! first pass, so a busy lane cannot starve the others; what the share leaves is offered to
//! the lanes again in a second pass.
//!
//! Allocated once in [`Lanes::new`]; nothing allocates afterwards. No `unsafe` here: a lane
//! is an [`Mpmc`] and a [`Waiters`].

use core::time::Duration;

use crossbeam_utils::CachePadded;

use super::mpmc::{self, Mpmc};
use super::spsc::Full;
use super::waiters::{WAKE_PER_NOTIFY_MAX, Waiters};
use crate::sync::{AtomicUsize, Ordering};

/// Most lanes one [`Lanes`] may have (each is a ring and a waiter registry).
pub const LANES_MAX: usize = 64;
/// Most lanes [`lane_count_for`] picks.
pub const LANES_FOR_CORES_MAX: usize = 8;

/// A lane count for producers spread over `cores` cores: one lane per two cores (at most
/// two producers running at once per lane), at least one, at most [`LANES_FOR_CORES_MAX`].
/// On two cores that is one lane, i.e. one ring: there the producers share the consumer's
/// cores, nothing contends that lanes could spread, and eight lanes measured slower (every
/// woken lane's producers compete with the consumer for its CPU).
pub const fn lane_count_for(cores: usize) -> usize {
    let lanes = cores / 2;
    if lanes < 1 {
        1
    } else if lanes > LANES_FOR_CORES_MAX {
        LANES_FOR_CORES_MAX
    } else {
        lanes
    }
}

/// One lane: a ring and the threads waiting for room in it.
#[derive(Debug)]
struct Lane<T> {
    ring: Mpmc<T>,
    waiters: Waiters,
}

/// Several bounded MPMC rings behind one drain. See the module documentation.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: Box<[CachePadded<Lane<T>>]>,
    /// The lane the next [`Lanes::pop_batch`] starts at (only a fairness hint: any value is
    /// safe).
    start: CachePadded<AtomicUsize>,
}

/// The lane-assignment counter behind [`lane_of_current_thread`].
static THREAD_ORDINAL_NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

std::thread_local! {
    /// This thread's ordinal, taken from [`THREAD_ORDINAL_NEXT`] on first use.
    static THREAD_ORDINAL: usize =
        THREAD_ORDINAL_NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The calling thread's lane among `lane_count` (at least one): the same one for the
/// thread's whole life, threads spread round-robin in the order they first ask (whatever
/// structure they ask for).
pub fn lane_of_current_thread(lane_count: usize) -> usize {
    if lane_count <= 1 {
        // One lane (the default on two cores): no thread-local lookup, no division.
        return 0;
    }
    THREAD_ORDINAL.with(|ordinal| *ordinal) % lane_count
}

/// One drain over `lane_count` lanes: asks `pop(lane, share)` to take at most `share` items
/// from `lane`, lanes in turn from `start`, at most an even share of `max` each on the first
/// pass and what is left of `max` on a second pass (skipped when the first took nothing).
/// `pop` returns how many it took. Returns the total, at most `max`.
pub fn pop_in_turn(
    lane_count: usize,
    start: usize,
    max: usize,
    mut pop: impl FnMut(usize, usize) -> usize,
) -> usize {
    let count = lane_count.max(1);
    let share = max.div_ceil(count).max(1);
    let mut taken = 0;
    for pass_share in [share, max] {
        for step in 0..count {
            if taken >= max {
                return taken;
            }
            taken += pop((start + step) % count, pass_share.min(max - taken));
        }
        if taken == 0 {
            // Every lane was empty on the first pass: no second look.
            break;
        }
    }
    taken
}

impl<T> Lanes<T> {
    /// `lane_count` lanes of `lane_capacity` items each (a power of two, at least 2).
    ///
    /// # Panics
    /// If `lane_count` is 0 or over [`LANES_MAX`], or the capacity is not valid for
    /// [`Mpmc::new`].
    pub fn new(lane_count: usize, lane_capacity: usize) -> Self {
        assert!(
            (1..=LANES_MAX).contains(&lane_count),
            "lane count must be 1..={LANES_MAX}"
        );
        Self {
            lanes: (0..lane_count)
                .map(|_| {
                    CachePadded::new(Lane {
                        ring: Mpmc::new(lane_capacity),
                        waiters: Waiters::with_wake_max((WAKE_PER_NOTIFY_MAX / lane_count).max(1)),
                    })
                })
                .collect(),
            start: CachePadded::new(AtomicUsize::new(0)),
        }
    }

    /// `lane_count` lanes that together hold at least `items` items.
    pub fn with_total_capacity(lane_count: usize, items: usize) -> Self {
        let per_lane = items.div_ceil(lane_count.max(1));
        Self::new(lane_count, mpmc::capacity_for(per_lane))
    }

    /// Lanes.
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Items all lanes hold when full.
    pub fn capacity(&self) -> usize {
        self.lanes.iter().map(|lane| lane.ring.capacity()).sum()
    }

    /// Items in all lanes now (a snapshot; exact only when nobody pushes or pops).
    pub fn len(&self) -> usize {
        self.lanes.iter().map(|lane| lane.ring.len()).sum()
    }

    /// Whether every lane was empty when looked at.
    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|lane| lane.ring.is_empty())
    }

    /// The calling thread's lane ([`lane_of_current_thread`]).
    pub fn lane_of_current_thread(&self) -> usize {
        lane_of_current_thread(self.lanes.len())
    }

    /// Pushes into lane `lane` (taken modulo the lane count); a full lane hands the item
    /// back (other lanes are not tried: that would break the pusher's order).
    #[inline]
    pub fn push(&self, lane: usize, item: T) -> Result<(), Full<T>> {
        self.lanes[lane % self.lanes.len()].ring.push(item)
    }

    /// Pushes into lane `lane`, waiting for room with the lane's back-off ([`Waiters::retry`])
    /// until `remaining` says no time is left; then the item comes back.
    pub fn push_wait(
        &self,
        lane: usize,
        item: T,
        remaining: impl FnMut() -> Option<Duration>,
    ) -> Result<(), Full<T>> {
        let lane = &self.lanes[lane % self.lanes.len()];
        let mut item = Some(item);
        lane.waiters
            .retry(remaining, || {
                let value = item.take().expect("an item until pushed or handed back");
                lane.ring.push(value).map_err(|Full(value)| {
                    item = Some(value);
                })
            })
            .map_err(|()| Full(item.take().expect("the item handed back")))
    }

    /// Takes up to `max` items, passing each to `f`, lanes in turn (see the module
    /// documentation for the order of lanes); wakes, in each lane it took from, up to as
    /// many waiters as it made room for. Returns how many it took.
    pub fn pop_batch(&self, max: usize, mut f: impl FnMut(T)) -> usize {
        let count = self.lanes.len();
        let start = self.start.fetch_add(1, Ordering::Relaxed) % count;
        pop_in_turn(count, start, max, |lane, share| {
            let lane = &self.lanes[lane];
            let popped = lane.ring.pop_batch(share, &mut f);
            lane.waiters.notify(popped);
            popped
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    #[test]
    fn lane_count_follows_the_cores() {
        assert_eq!(lane_count_for(0), 1);
        assert_eq!(lane_count_for(2), 1);
        assert_eq!(lane_count_for(4), 2);
        assert_eq!(lane_count_for(16), 8);
        assert_eq!(lane_count_for(128), LANES_FOR_CORES_MAX);
    }

    #[test]
    fn capacity_is_split_over_the_lanes() {
        let lanes = Lanes::<u64>::with_total_capacity(8, 4_096);
        assert_eq!(lanes.lane_count(), 8);
        assert_eq!(lanes.capacity(), 4_096);
        let odd = Lanes::<u64>::with_total_capacity(3, 100);
        assert_eq!(odd.capacity(), 3 * 64);
    }

    #[test]
    fn a_full_lane_hands_the_item_back_and_leaves_the_others_alone() {
        let lanes = Lanes::new(2, 2);
        assert!(lanes.push(0, 1u32).is_ok());
        assert!(lanes.push(0, 2).is_ok());
        assert_eq!(lanes.push(0, 3), Err(Full(3)));
        assert!(lanes.push(1, 4).is_ok());
        assert_eq!(lanes.len(), 3);
        let deadline = Instant::now();
        let waited = lanes.push_wait(0, 5, || {
            Some(deadline.saturating_duration_since(Instant::now())).filter(|left| !left.is_zero())
        });
        assert_eq!(waited, Err(Full(5)));
    }

    /// Each lane drains in push order; a busy lane gets at most its share on the first
    /// pass, so the quiet lane's item is not left behind.
    #[test]
    fn lanes_drain_in_turn_and_each_in_order() {
        let lanes = Lanes::new(2, 16);
        for value in 0..10u32 {
            lanes.push(0, value).unwrap();
        }
        lanes.push(1, 100).unwrap();
        let mut out = Vec::new();
        assert_eq!(lanes.pop_batch(4, |value| out.push(value)), 4);
        assert!(out.contains(&100), "the quiet lane is served: {out:?}");
        while lanes.pop_batch(4, |value| out.push(value)) > 0 {}
        let lane0: Vec<u32> = out.iter().copied().filter(|&value| value < 100).collect();
        assert_eq!(lane0, (0..10).collect::<Vec<_>>());
        assert!(lanes.is_empty());
    }

    /// What one pass's shares leave is offered again: a lone busy lane fills the batch.
    #[test]
    fn one_busy_lane_fills_the_whole_batch() {
        let lanes = Lanes::new(4, 64);
        for value in 0..40u32 {
            lanes.push(2, value).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(lanes.pop_batch(32, |value| out.push(value)), 32);
        assert_eq!(out, (0..32).collect::<Vec<_>>());
    }

    #[test]
    fn a_thread_keeps_its_lane() {
        let lanes = Lanes::<u8>::new(4, 2);
        let mine = lanes.lane_of_current_thread();
        assert_eq!(lanes.lane_of_current_thread(), mine);
        let others: Vec<usize> = (0..8)
            .map(|_| {
                std::thread::spawn(|| {
                    let lanes = Lanes::<u8>::new(4, 2);
                    lanes.lane_of_current_thread()
                })
                .join()
                .unwrap()
            })
            .collect();
        assert!(others.iter().all(|&lane| lane < 4));
    }

    /// Many producers through full lanes: every item arrives once, each producer's in order.
    #[test]
    fn many_producers_every_item_once_in_order() {
        const PRODUCERS: usize = 8;
        const PER_PRODUCER: u32 = if cfg!(miri) { 50 } else { 5_000 };
        let lanes = Arc::new(Lanes::new(3, 8));
        let threads: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let lanes = lanes.clone();
                std::thread::spawn(move || {
                    let lane = lanes.lane_of_current_thread();
                    for seq in 0..PER_PRODUCER {
                        let item = ((producer as u64) << 32) | u64::from(seq);
                        lanes
                            .push_wait(lane, item, || Some(Duration::from_secs(60)))
                            .unwrap();
                    }
                })
            })
            .collect();
        let mut next = [0u32; PRODUCERS];
        let mut received = 0;
        while received < PRODUCERS * PER_PRODUCER as usize {
            let taken = lanes.pop_batch(16, |item| {
                let (producer, seq) = ((item >> 32) as usize, item as u32);
                assert_eq!(seq, next[producer], "producer {producer} out of order");
                next[producer] += 1;
            });
            if taken == 0 {
                std::thread::yield_now();
            }
            received += taken;
        }
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(next.iter().all(|&count| count == PER_PRODUCER));
        assert!(lanes.is_empty());
    }
}
