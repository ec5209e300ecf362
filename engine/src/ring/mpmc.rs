//! Bounded multi-producer multi-consumer ring: many application threads submitting into
//! one shard.
//!
//! This module owns the MPMC slot array and the two cache-padded claim counters. The design
//! is Dmitry Vyukov's bounded queue: every slot carries a sequence number that says whose
//! turn it is. For position `pos` (slot `pos & mask`), `seq == pos` means "free, a producer
//! may claim `pos`", `seq == pos + 1` means "full, a consumer may claim `pos`", and a
//! consumer hands the slot to the next lap with `seq = pos + capacity`. Positions are
//! claimed with a CAS on `tail` (producers) or `head` (consumers); the item itself is handed
//! over by the `Release` store / `Acquire` load of the slot's `seq`, so the CAS needs no
//! ordering of its own. Batch operations claim a contiguous run of ready slots with one CAS.
//!
//! It must never allocate after [`Mpmc::new`], never block, spin-wait on another thread or
//! take a lock (every operation is `try`: a full ring hands the item back in [`Full`], an
//! empty one returns `None`), and never let two threads own one slot. A blocking or back-off
//! layer belongs on top (waiting on `Full`/`None`), not in here. The one pause inside is
//! after a lost claim race (`CLAIM_BACKOFF_STEP_MAX`): a few spin hints before trying
//! again, which waits for nothing (the thread that won has already claimed).
//!
//! Slots are **not** cache-padded: a slot is `seq` plus one item, packed back to back. Padding
//! would multiply the memory per slot (these rings carry 4-8 byte pool indices) and spread
//! a batch claim over many lines; the cost is false sharing between adjacent slots when
//! producers and consumers work within a line of each other, i.e. on a nearly empty ring.
//! `head` and `tail` are padded, as they are written by every operation.

use core::{
    fmt,
    mem::{self, MaybeUninit},
    ptr,
};

use crossbeam_utils::CachePadded;

use super::metrics::{NoMetrics, RingMetrics, RingStats};
use super::spsc::check_capacity;
use crate::sync::{AtomicUsize, Ordering, UnsafeCell, spin_loop};

pub use super::spsc::{CAPACITY_MAX, Full};

/// The smallest valid MPMC capacity that holds `items` items: `items` rounded up to a power
/// of two, at least 2.
///
/// # Panics
/// If the result would exceed [`CAPACITY_MAX`].
#[must_use]
pub const fn capacity_for(items: usize) -> usize {
    assert!(
        items <= CAPACITY_MAX,
        "ring capacity request exceeds CAPACITY_MAX"
    );
    if items <= 2 {
        2
    } else {
        items.next_power_of_two()
    }
}

/// Largest exponent of the back-off after a lost claim race: a thread that lost the race for
/// a position `n` times in a row pauses for `2^min(n, CLAIM_BACKOFF_STEP_MAX)` spin hints
/// before it tries again. Without it, threads on different cores that all retry at once
/// keep the counter's cache line moving between them and mostly lose again (2 threads
/// pushing on 2 cores: about a tenth of the uncontended rate); the winner meanwhile claims
/// at full speed. A bounded pause after losing, not a wait for another thread: some thread
/// always wins its CAS, so the ring stays lock-free.
const CLAIM_BACKOFF_STEP_MAX: u32 = 6;

/// Pauses after the `step`-th lost claim race in a row ([`CLAIM_BACKOFF_STEP_MAX`]).
#[inline]
fn claim_backoff(step: &mut u32) {
    // Under loom every spin hint is a scheduling point: one is enough to let the winner run.
    let spins = if cfg!(loom) {
        1
    } else {
        1u32 << (*step).min(CLAIM_BACKOFF_STEP_MAX)
    };
    for _ in 0..spins {
        spin_loop();
    }
    *step += 1;
}

/// One slot: whose turn it is, and the item when it is a consumer's turn.
struct Slot<T> {
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// A bounded MPMC ring. Share it by `&` or `Arc`; every method takes `&self`.
pub struct Mpmc<T, M: RingMetrics = NoMetrics> {
    /// Next position a consumer claims.
    head: CachePadded<AtomicUsize>,
    /// Next position a producer claims.
    tail: CachePadded<AtomicUsize>,
    slots: Box<[Slot<T>]>,
    /// `capacity - 1`.
    mask: usize,
    metrics: M,
}

// SAFETY: the ring moves `T`s from thread to thread (hence `T: Send`) and never shares a
// `&T` between threads: a slot's item is touched only by the one thread whose CAS claimed
// its position, as ordered by the slot's `seq`. `M` is `Send + Sync` by its trait bounds.
unsafe impl<T: Send, M: RingMetrics> Send for Mpmc<T, M> {}
// SAFETY: as above; concurrent `&self` calls touch only atomics, `M`, and slots owned by
// the calling thread through the claim protocol.
unsafe impl<T: Send, M: RingMetrics> Sync for Mpmc<T, M> {}

/// `seq - expected` as a signed distance (positions wrap, distances stay far below `isize::MAX`).
#[inline(always)]
fn lag(seq: usize, expected: usize) -> isize {
    seq.wrapping_sub(expected) as isize
}

impl<T, M: RingMetrics> Mpmc<T, M> {
    /// Creates a ring with `capacity` slots that reports to metrics of type `M`
    /// (`Mpmc::<T>::new` for none, `Mpmc::<T, Counting>::new` for counters).
    ///
    /// # Panics
    /// If `capacity` is not a power of two, is below 2, or is above [`CAPACITY_MAX`] (use
    /// [`capacity_for`] to round a requested size up).
    #[must_use]
    #[track_caller]
    pub fn new(capacity: usize) -> Self {
        Self::starting_at(capacity, 0)
    }

    /// Creates a ring whose positions start at `start` (tests start near `usize::MAX` to
    /// exercise position wrap-around). The only allocation a ring ever makes is here.
    #[track_caller]
    fn starting_at(capacity: usize, start: usize) -> Self {
        // Capacity 1 cannot tell "full" (seq == pos + 1) from "free for the next lap"
        // (seq == pos + capacity), so the minimum is 2.
        check_capacity("mpmc", capacity, 2);
        let slots = (0..capacity)
            .map(|i| {
                let pos = start.wrapping_add(i);
                // Slot `pos & mask` is first free for position `pos`: positions
                // `start..start + capacity` cover each slot exactly once.
                Slot {
                    seq: AtomicUsize::new(pos),
                    value: UnsafeCell::new(MaybeUninit::uninit()),
                }
            })
            .collect::<Vec<_>>();
        let mut slots = slots.into_boxed_slice();
        // Put each slot at index `pos & mask` (a rotation when `start` is not aligned).
        slots.rotate_right(start & (capacity - 1));
        Self {
            head: CachePadded::new(AtomicUsize::new(start)),
            tail: CachePadded::new(AtomicUsize::new(start)),
            slots,
            mask: capacity - 1,
            metrics: M::default(),
        }
    }

    /// The slot for position `pos`.
    #[inline(always)]
    fn slot(&self, pos: usize) -> &Slot<T> {
        let index = pos & self.mask;
        debug_assert!(index < self.slots.len());
        // SAFETY: `mask == slots.len() - 1` with the length a power of two, so
        // `index < slots.len()`.
        unsafe { self.slots.get_unchecked(index) }
    }

    /// Claims up to `limit` (>= 1) consecutive positions whose slots have
    /// `seq == pos + offset` (`offset` 0: free for producers; 1: full for consumers) by
    /// one CAS on `counter`. Returns the first claimed position and the count, or `None`
    /// if the slot at the counter is not ready (ring full or empty).
    #[inline(always)]
    fn claim(&self, counter: &AtomicUsize, offset: usize, limit: usize) -> Option<(usize, usize)> {
        debug_assert!(limit >= 1 && limit <= self.capacity());
        // Relaxed: the counter only says where to try; whether a slot is ready is decided
        // by its `seq`, loaded with Acquire below.
        let mut pos = counter.load(Ordering::Relaxed);
        let mut lost = 0;
        loop {
            // Acquire: pairs with the Release `seq` store that made the slot ready (a
            // producer's write of the item, or a consumer's move out of it a lap ago), so
            // that access happens-before ours.
            let seq = self.slot(pos).seq.load(Ordering::Acquire);
            let distance = lag(seq, pos.wrapping_add(offset));
            if distance < 0 {
                // The slot is still a lap (or a step) behind: ring full (producers) or
                // empty (consumers), possibly only for the moment another thread finishes.
                return None;
            }
            if distance > 0 {
                // Another thread claimed `pos` already; catch up with the counter.
                claim_backoff(&mut lost);
                pos = counter.load(Ordering::Relaxed);
                continue;
            }
            let mut count = 1;
            while count < limit {
                let next = pos.wrapping_add(count);
                // Acquire: as above, for each further slot of the run.
                if self.slot(next).seq.load(Ordering::Acquire) != next.wrapping_add(offset) {
                    break;
                }
                count += 1;
            }
            // Relaxed on success and failure: the CAS only makes the claim exclusive (a
            // single modification order of `counter`); the item hand-over is ordered by the
            // `seq` loads above and the `seq` stores after the access.
            match counter.compare_exchange_weak(
                pos,
                pos.wrapping_add(count),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some((pos, count)),
                Err(current) => {
                    claim_backoff(&mut lost);
                    pos = current;
                }
            }
        }
    }

    /// Writes `item` into the claimed position `pos` and hands the slot to consumers.
    ///
    /// # Safety
    /// The caller's CAS on `tail` must have claimed `pos` after observing `seq == pos`.
    #[inline(always)]
    unsafe fn fill(&self, pos: usize, item: T) {
        let slot = self.slot(pos);
        // SAFETY: the claim gives this thread the slot exclusively, and `seq == pos` means
        // the previous item was moved out, so writing drops nothing.
        slot.value.with_mut(|value| unsafe { (*value).write(item) });
        // Release: our write of the item happens-before the consumer that Acquires this seq.
        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
    }

    /// Moves the item out of the claimed position `pos` and hands the slot to producers.
    ///
    /// # Safety
    /// The caller's CAS on `head` must have claimed `pos` after observing `seq == pos + 1`,
    /// and must take each claimed position exactly once.
    #[inline(always)]
    unsafe fn take(&self, pos: usize) -> T {
        let slot = self.slot(pos);
        // SAFETY: the claim gives this thread the slot exclusively, and `seq == pos + 1`
        // (loaded with Acquire) means a producer initialised the item and published it.
        let item = slot
            .value
            .with_mut(|value| unsafe { (*value).assume_init_read() });
        // Release: our move out happens-before the producer that Acquires this seq for the
        // next lap and overwrites the slot.
        slot.seq
            .store(pos.wrapping_add(self.mask + 1), Ordering::Release);
        item
    }

    /// Pushes one item, or hands it back in [`Full`] if the ring is full.
    ///
    /// "Full" may also be reported for a moment while a consumer is still moving an item out
    /// of the next slot.
    #[inline]
    pub fn push(&self, item: T) -> Result<(), Full<T>> {
        let Some((pos, _)) = self.claim(&self.tail, 0, 1) else {
            self.metrics.on_full();
            return Err(Full(item));
        };
        // SAFETY: `claim` won position `pos` by CAS on `tail` after seeing `seq == pos`.
        unsafe { self.fill(pos, item) };
        self.metrics.on_push(1);
        Ok(())
    }

    /// Pops the oldest ready item, or `None` if the ring is empty.
    ///
    /// "Empty" may also be reported while a producer that claimed the next position has not
    /// finished writing it.
    #[inline]
    pub fn pop(&self) -> Option<T> {
        let (pos, _) = self.claim(&self.head, 1, 1)?;
        // SAFETY: `claim` won position `pos` by CAS on `head` after seeing `seq == pos + 1`.
        let item = unsafe { self.take(pos) };
        self.metrics.on_pop(1);
        Some(item)
    }

    /// Exclusive batch dequeue: claims the longest run (up to `max`) of consecutive ready
    /// items with one CAS on `head`, then moves them in order into `f`. Returns the count.
    ///
    /// Each slot is handed back to producers before its item reaches `f`. If `f` panics,
    /// the claimed items it has not received yet are dropped, so the ring stays usable.
    pub fn pop_batch(&self, max: usize, mut f: impl FnMut(T)) -> usize {
        let limit = max.min(self.capacity());
        if limit == 0 {
            return 0;
        }
        let Some((pos, count)) = self.claim(&self.head, 1, limit) else {
            return 0;
        };
        let mut guard = TakeRestOnDrop {
            ring: self,
            pos,
            count,
            taken: 0,
        };
        while guard.taken < count {
            // SAFETY: positions `pos..pos + count` were claimed together; each is taken once
            // because `taken` counts up and the guard takes only the ones after it.
            let item = unsafe { self.take(pos.wrapping_add(guard.taken)) };
            guard.taken += 1;
            f(item);
        }
        count
    }

    /// Copies up to `out.len()` of the oldest ready items into `out` (one claim, as
    /// [`pop_batch`](Self::pop_batch)). Returns the count.
    #[inline]
    pub fn pop_slice(&self, out: &mut [T]) -> usize
    where
        T: Copy,
    {
        let max = out.len();
        let mut dst = out.iter_mut();
        self.pop_batch(max, |item| {
            if let Some(place) = dst.next() {
                *place = item;
            }
        })
    }

    /// Pushes the longest prefix of `items` for which consecutive free slots exist,
    /// claiming them with one CAS on `tail`. Returns the count. Reports a full event to the
    /// metrics when not all of `items` fit.
    #[inline]
    pub fn push_slice(&self, items: &[T]) -> usize
    where
        T: Copy,
    {
        let limit = items.len().min(self.capacity());
        let claimed = if limit == 0 {
            None
        } else {
            self.claim(&self.tail, 0, limit)
        };
        let Some((pos, count)) = claimed else {
            if !items.is_empty() {
                self.metrics.on_full();
            }
            return 0;
        };
        for (i, &item) in items[..count].iter().enumerate() {
            // SAFETY: `claim` won positions `pos..pos + count` by one CAS on `tail` after
            // seeing each slot free; each is filled once.
            unsafe { self.fill(pos.wrapping_add(i), item) };
        }
        // The metrics (caller's code, which may panic) only once every claimed slot is
        // filled: a panic between the claim and the fills would leave those positions
        // claimed and never published, and the consumers stuck at the first of them.
        if count < items.len() {
            self.metrics.on_full();
        }
        self.metrics.on_push(count);
        count
    }

    /// Number of slots (fixed at construction).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Claimed positions not yet claimed by consumers: items in the ring, including ones a
    /// producer is still writing. A snapshot; other threads change it at any moment.
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot that orders nothing. The two loads are not one atomic read,
        // so clamp the difference into `0..=capacity`.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        lag(tail, head).clamp(0, self.capacity() as isize) as usize
    }

    /// Whether the ring looks empty (a snapshot, see [`len`](Self::len)).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshot of the ring's metrics (all zero with [`NoMetrics`]).
    pub fn stats(&self) -> RingStats {
        self.metrics.stats()
    }
}

/// Takes (and drops) the claimed items `f` has not received when a batch pop ends by a panic.
struct TakeRestOnDrop<'a, T, M: RingMetrics> {
    ring: &'a Mpmc<T, M>,
    pos: usize,
    count: usize,
    taken: usize,
}

impl<T, M: RingMetrics> Drop for TakeRestOnDrop<'_, T, M> {
    fn drop(&mut self) {
        while self.taken < self.count {
            // SAFETY: positions `pos + taken..pos + count` are claimed by this batch and
            // not taken yet; each is taken once as `taken` counts up.
            let item = unsafe { self.ring.take(self.pos.wrapping_add(self.taken)) };
            self.taken += 1;
            drop(item);
        }
        self.ring.metrics.on_pop(self.count);
    }
}

impl<T, M: RingMetrics> Drop for Mpmc<T, M> {
    fn drop(&mut self) {
        if !mem::needs_drop::<T>() {
            return;
        }
        // Relaxed: `&mut self` means every other thread's operations already
        // happen-before this point (through whatever handed us exclusive access).
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        let mut pos = head;
        while pos != tail {
            let slot = self.slot(pos);
            // No operation is in flight, so every claimed position holds a written item.
            debug_assert_eq!(slot.seq.load(Ordering::Relaxed), pos.wrapping_add(1));
            // SAFETY: positions in `[head, tail)` were filled and never taken; each is
            // dropped once, and the ring is never used again.
            slot.value
                .with_mut(|value| unsafe { ptr::drop_in_place((*value).as_mut_ptr()) });
            pos = pos.wrapping_add(1);
        }
    }
}

impl<T, M: RingMetrics> fmt::Debug for Mpmc<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mpmc")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ring::Counting;
    use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};

    use crate::ring::test_support::{DropCounter, counter, scaled};

    #[test]
    fn push_pop_basic() {
        let ring = Mpmc::<u32>::new(4);
        assert_eq!(ring.capacity(), 4);
        assert!(ring.is_empty());
        assert_eq!(ring.pop(), None);
        ring.push(1).unwrap();
        ring.push(2).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.pop(), Some(1));
        assert_eq!(ring.pop(), Some(2));
        assert_eq!(ring.pop(), None);
    }

    /// Metrics whose full event panics (caller code may).
    #[derive(Default)]
    struct PanicOnFull;

    impl RingMetrics for PanicOnFull {
        fn on_push(&self, _count: usize) {}
        fn on_pop(&self, _count: usize) {}
        fn on_full(&self) {
            panic!("full");
        }
        fn stats(&self) -> crate::ring::RingStats {
            crate::ring::RingStats::default()
        }
    }

    #[test]
    fn a_panicking_full_event_leaves_the_claimed_slots_published() {
        let ring = Mpmc::<u32, PanicOnFull>::new(2);
        let pushed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ring.push_slice(&[1, 2, 3])));
        assert!(pushed.is_err(), "the full event ran");
        assert_eq!(ring.pop(), Some(1));
        assert_eq!(ring.pop(), Some(2));
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.push_slice(&[4]), 1);
        assert_eq!(ring.pop(), Some(4));
    }

    #[test]
    fn full_returns_the_item() {
        let ring = Mpmc::<String, Counting>::new(2);
        ring.push("a".into()).unwrap();
        ring.push("b".into()).unwrap();
        assert_eq!(ring.push("c".into()).unwrap_err().into_inner(), "c");
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.pop().as_deref(), Some("a"));
        ring.push("d".into()).unwrap();
        let stats = ring.stats();
        assert_eq!((stats.pushed, stats.popped, stats.full_events), (3, 1, 1));
    }

    #[test]
    fn wraps_around_many_times() {
        let ring = Mpmc::<usize>::new(8);
        let mut next_out = 0;
        for i in 0..scaled(10_000) {
            ring.push(i).unwrap();
            if !i.is_multiple_of(3) {
                assert_eq!(ring.pop(), Some(next_out));
                next_out += 1;
            }
            if ring.len() == ring.capacity() {
                ring.pop_batch(usize::MAX, |v| {
                    assert_eq!(v, next_out);
                    next_out += 1;
                });
            }
        }
        while let Some(v) = ring.pop() {
            assert_eq!(v, next_out);
            next_out += 1;
        }
        assert_eq!(next_out, scaled(10_000));
    }

    #[test]
    fn positions_wrap_past_usize_max() {
        let ring = Mpmc::<u64>::starting_at(4, usize::MAX - 5);
        let mut out = [0u64; 3];
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..20u32 {
            let batch: Vec<u64> = (next_in..next_in + 3).collect();
            next_in += ring.push_slice(&batch) as u64;
            if round.is_multiple_of(2) && ring.push(next_in).is_ok() {
                next_in += 1;
            }
            let n = ring.pop_slice(&mut out);
            for &v in &out[..n] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
            assert_eq!(ring.len() as u64, next_in - next_out);
        }
        assert!(next_out > 30, "positions did not cross usize::MAX");
    }

    #[test]
    fn batch_of_ten_thousand() {
        let n = scaled(10_000);
        let ring = Mpmc::<u32>::new(capacity_for(n));
        let items: Vec<u32> = (0..n as u32).collect();
        for round in 0..3 {
            // Offset the positions so later rounds wrap around the slot array.
            ring.push(u32::MAX).unwrap();
            assert_eq!(ring.pop(), Some(u32::MAX));
            assert_eq!(ring.push_slice(&items), n, "round {round}");
            let mut out = vec![0u32; n + 5];
            assert_eq!(ring.pop_slice(&mut out), n);
            assert_eq!(&out[..n], &items[..]);
            assert_eq!(ring.push_slice(&items), n);
            let mut expected = 0u32;
            let popped = ring.pop_batch(usize::MAX, |v| {
                assert_eq!(v, expected);
                expected += 1;
            });
            assert_eq!(popped, n);
        }
    }

    #[test]
    fn push_slice_pushes_a_prefix() {
        let ring = Mpmc::<u8, Counting>::new(4);
        assert_eq!(ring.push_slice(&[1, 2, 3]), 3);
        assert_eq!(ring.push_slice(&[4, 5, 6]), 1);
        assert_eq!(ring.push_slice(&[7]), 0);
        assert_eq!(ring.push_slice(&[]), 0);
        let mut out = [0u8; 8];
        assert_eq!(ring.pop_slice(&mut out[..2]), 2);
        assert_eq!(ring.pop_slice(&mut out[2..]), 2);
        assert_eq!(out[..4], [1, 2, 3, 4]);
        assert_eq!(ring.pop_slice(&mut out), 0);
        assert_eq!(ring.stats().full_events, 2);
    }

    #[test]
    fn every_item_drops_exactly_once() {
        let drops = std::sync::Arc::new(StdAtomicUsize::new(0));
        let ring = Mpmc::<DropCounter>::new(8);
        for i in 0..8 {
            ring.push(counter(i, &drops)).unwrap();
        }
        let rejected = ring.push(counter(99, &drops)).unwrap_err();
        drop(rejected);
        assert_eq!(drops.load(StdOrdering::Relaxed), 1);
        // Partial batch pop.
        let mut seen = Vec::new();
        assert_eq!(ring.pop_batch(3, |item| seen.push(item.value)), 3);
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(drops.load(StdOrdering::Relaxed), 4);
        // Wrap around, then leave 8 items in the ring.
        for i in 8..11 {
            ring.push(counter(i, &drops)).unwrap();
        }
        drop(ring.pop());
        assert_eq!(drops.load(StdOrdering::Relaxed), 5);
        ring.push(counter(11, &drops)).unwrap();
        drop(ring);
        // 13 created, every one dropped once.
        assert_eq!(drops.load(StdOrdering::Relaxed), 13);
    }

    #[test]
    fn panicking_pop_batch_drops_the_rest_and_stays_usable() {
        let drops = std::sync::Arc::new(StdAtomicUsize::new(0));
        let ring = Mpmc::<DropCounter>::new(8);
        for i in 0..6 {
            ring.push(counter(i, &drops)).unwrap();
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ring.pop_batch(4, |item| assert!(item.value < 1, "boom"));
        }));
        assert!(result.is_err());
        // Items 0..4 were claimed: 0 and 1 reached `f`, 2 and 3 were dropped by the guard.
        assert_eq!(drops.load(StdOrdering::Relaxed), 4);
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.pop().map(|i| i.value), Some(4));
        for i in 6..13 {
            ring.push(counter(i, &drops)).unwrap();
        }
        assert!(ring.push(counter(13, &drops)).is_err());
        drop(ring);
        assert_eq!(drops.load(StdOrdering::Relaxed), 14);
    }

    #[test]
    fn zero_sized_items() {
        let ring = Mpmc::<()>::new(4);
        assert_eq!(ring.push_slice(&[(); 6]), 4);
        assert!(ring.push(()).is_err());
        assert_eq!(ring.pop_slice(&mut [(); 3]), 3);
        assert_eq!(ring.pop_batch(9, drop), 1);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn zero_capacity_panics() {
        let _ = Mpmc::<u8>::new(0);
    }

    #[test]
    #[should_panic(expected = "power of two >= 2")]
    fn capacity_one_panics() {
        let _ = Mpmc::<u8>::new(1);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn non_power_of_two_panics() {
        let _ = Mpmc::<u8>::new(6);
    }

    #[test]
    fn capacity_for_rounds_up() {
        assert_eq!(capacity_for(0), 2);
        assert_eq!(capacity_for(2), 2);
        assert_eq!(capacity_for(5), 8);
        assert_eq!(capacity_for(10_000), 16_384);
    }

    #[test]
    fn ring_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Mpmc<String>>();
        assert_send_sync::<Mpmc<u64, Counting>>();
    }

    #[test]
    fn threads_deliver_every_item_once() {
        const PRODUCERS: usize = 2;
        const CONSUMERS: usize = 2;
        let per_producer = scaled(20_000);
        let ring = Mpmc::<usize>::new(16);
        let popped = StdAtomicUsize::new(0);
        let sums: Vec<usize> = std::thread::scope(|scope| {
            for id in 0..PRODUCERS {
                let ring = &ring;
                scope.spawn(move || {
                    let mut next = 0;
                    while next < per_producer {
                        let item = id * per_producer + next;
                        let pushed = if next.is_multiple_of(4) {
                            let run: Vec<usize> =
                                (item..item + (per_producer - next).min(5)).collect();
                            ring.push_slice(&run)
                        } else {
                            usize::from(ring.push(item).is_ok())
                        };
                        next += pushed;
                        if pushed == 0 {
                            std::thread::yield_now();
                        }
                    }
                });
            }
            let consumers: Vec<_> = (0..CONSUMERS)
                .map(|_| {
                    let (ring, popped) = (&ring, &popped);
                    scope.spawn(move || {
                        let mut sum = 0;
                        while popped.load(StdOrdering::Relaxed) < PRODUCERS * per_producer {
                            let n = ring.pop_batch(7, |v| sum += v);
                            popped.fetch_add(n, StdOrdering::Relaxed);
                            if n == 0 {
                                std::thread::yield_now();
                            }
                        }
                        sum
                    })
                })
                .collect();
            consumers.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let total = PRODUCERS * per_producer;
        assert_eq!(sums.iter().sum::<usize>(), total * (total - 1) / 2);
        assert!(ring.is_empty());
    }
}
