//! Bounded single-producer single-consumer ring: the inter-core mesh and ingest → batcher.
//!
//! This module owns one contiguous slot buffer per ring, the two cache-padded positions
//! (`head` written only by the [`Consumer`], `tail` written only by the [`Producer`]) and the
//! rule for who may touch which slot: slots in `[head, tail)` belong to the consumer, all
//! others to the producer. Each side keeps its own position locally and caches the other
//! side's, reading the shared atomic only when the ring looks full (producer) or empty
//! (consumer). Every operation, single or batch, publishes with exactly one `Release` store.
//! It must never allocate after [`channel`] returns, never block or spin (a full ring hands
//! the item back in [`Full`]), and never let a slot be read and written at the same time.
//!
//! Positions are `usize` counters that only grow (wrapping at `usize::MAX`) and are masked
//! into the buffer, so `tail - head` is the fill level without an extra "full" flag.

use core::{
    fmt,
    mem::{self, MaybeUninit},
    ptr::{self, NonNull},
    slice,
};

use crossbeam_utils::CachePadded;

use super::metrics::{NoMetrics, RingMetrics, RingStats};
use crate::sync::{Arc, AtomicUsize, Ordering, SlotAccessTracker, fence};

/// Largest capacity a ring accepts (slots). Keeping it at a quarter of the index space
/// means `tail - head` (and the MPMC ring's sequence lag, read as `isize`) never overflows.
pub const CAPACITY_MAX: usize = 1 << (usize::BITS - 2);

// Batch operations take any length and move at most the free (or available) count, so the
// only relation to check is that a ring can be sized for the largest batch and the default.
const _: () = assert!(crate::limits::RING_BATCH_ITEMS_MAX <= CAPACITY_MAX);
const _: () = assert!(crate::limits::TX_RING_CAPACITY_DEFAULT <= CAPACITY_MAX);

/// The smallest valid SPSC capacity that holds `items` items: `items` rounded up to a
/// power of two (at least 1).
///
/// # Panics
/// If the result would exceed [`CAPACITY_MAX`].
#[must_use]
pub const fn capacity_for(items: usize) -> usize {
    assert!(
        items <= CAPACITY_MAX,
        "ring capacity request exceeds CAPACITY_MAX"
    );
    if items <= 1 {
        1
    } else {
        items.next_power_of_two()
    }
}

/// The ring was full; the rejected item is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> Full<T> {
    /// Takes the rejected item back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Display for Full<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring is full")
    }
}

impl<T: fmt::Debug> std::error::Error for Full<T> {}

/// Panics unless `capacity` is a power of two in `[minimum, CAPACITY_MAX]`.
#[track_caller]
pub(super) fn check_capacity(ring: &str, capacity: usize, minimum: usize) {
    assert!(
        capacity.is_power_of_two() && capacity >= minimum,
        "{ring} ring capacity must be a power of two >= {minimum}, got {capacity} \
         (round up with capacity_for)"
    );
    assert!(
        capacity <= CAPACITY_MAX,
        "{ring} ring capacity {capacity} exceeds CAPACITY_MAX ({CAPACITY_MAX})"
    );
}

/// State both handles point at; freed (with any items still in it) when the last handle drops.
struct Shared<T, M> {
    /// Position of the next slot the consumer reads. Stored only by the consumer.
    head: CachePadded<AtomicUsize>,
    /// Position of the next slot the producer writes. Stored only by the producer.
    tail: CachePadded<AtomicUsize>,
    /// `capacity` slots, from `Box<[MaybeUninit<T>]>::into_raw`; freed in `drop`.
    buffer: NonNull<T>,
    capacity: usize,
    /// Lets loom see slot accesses; zero-sized otherwise.
    tracker: SlotAccessTracker,
    metrics: M,
}

// SAFETY: `Shared` moves `T`s between threads (so `T: Send`), never hands out `&T` to two
// threads for the same slot, and its slot accesses are partitioned by `head`/`tail` as the
// module documentation describes. `M: RingMetrics` is `Send + Sync` by its trait bounds.
unsafe impl<T: Send, M: RingMetrics> Send for Shared<T, M> {}
// SAFETY: as above; shared access from both handles only touches atomics, `M` and slots
// that the head/tail protocol gives to exactly one side at a time.
unsafe impl<T: Send, M: RingMetrics> Sync for Shared<T, M> {}

impl<T, M> Drop for Shared<T, M> {
    fn drop(&mut self) {
        // Relaxed: we run after the last handle's `Arc` drop (Release decrement, Acquire on
        // the final one), so both sides' last stores already happen-before this point.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        let count = tail.wrapping_sub(head);
        debug_assert!(count <= self.capacity, "ring holds more items than slots");
        if mem::needs_drop::<T>() && count > 0 {
            let (start, first, second) = split(head, count, self.capacity - 1);
            #[cfg(loom)]
            for i in 0..count {
                self.tracker
                    .write(head.wrapping_add(i) & (self.capacity - 1));
            }
            // SAFETY: slots in `[head, tail)` hold initialised items that nobody else can
            // reach any more (both handles are gone); each is dropped exactly once here.
            unsafe {
                ptr::drop_in_place(ptr::slice_from_raw_parts_mut(
                    self.buffer.as_ptr().add(start),
                    first,
                ));
                ptr::drop_in_place(ptr::slice_from_raw_parts_mut(self.buffer.as_ptr(), second));
            }
        }
        let raw = ptr::slice_from_raw_parts_mut(
            self.buffer.as_ptr().cast::<MaybeUninit<T>>(),
            self.capacity,
        );
        // SAFETY: `buffer`/`capacity` came from `Box::into_raw` of a `Box<[MaybeUninit<T>]>`
        // of exactly this length in `channel_starting_at`, and this is the only place that
        // frees it. Dropping `MaybeUninit`s drops no items.
        drop(unsafe { Box::from_raw(raw) });
    }
}

/// Splits `count` slots starting at position `pos` into the run up to the end of the
/// buffer and the run from its start: `(start index, first run length, second run length)`.
#[inline(always)]
fn split(pos: usize, count: usize, mask: usize) -> (usize, usize, usize) {
    let start = pos & mask;
    let first = count.min(mask + 1 - start);
    (start, first, count - first)
}

/// The sending half of an SPSC ring. `Send` (when `T: Send`), not `Clone`.
pub struct Producer<T, M: RingMetrics = NoMetrics> {
    shared: Arc<Shared<T, M>>,
    /// Local copy of `shared.buffer` (saves a dependent load on every push).
    buffer: NonNull<T>,
    mask: usize,
    /// Producer-owned position; equal to `shared.tail` between calls.
    tail: usize,
    /// Last `head` observed. The true head is never behind it, so using it can only
    /// under-count free slots, never over-count them.
    cached_head: usize,
}

/// The receiving half of an SPSC ring. `Send` (when `T: Send`), not `Clone`.
pub struct Consumer<T, M: RingMetrics = NoMetrics> {
    shared: Arc<Shared<T, M>>,
    /// Local copy of `shared.buffer`.
    buffer: NonNull<T>,
    mask: usize,
    /// Consumer-owned position; equal to `shared.head` between calls.
    head: usize,
    /// Last `tail` observed. The true tail is never behind it, so using it can only
    /// under-count available items.
    cached_tail: usize,
}

// SAFETY: a `Producer` is the only writer of the slots outside `[head, tail)` and of
// `tail`; moving it to another thread moves that role with it. Items it sends are `T: Send`.
unsafe impl<T: Send, M: RingMetrics> Send for Producer<T, M> {}
// SAFETY: a `Consumer` is the only reader of the slots inside `[head, tail)` and the only
// writer of `head`; moving it moves that role. Items it receives are `T: Send`.
unsafe impl<T: Send, M: RingMetrics> Send for Consumer<T, M> {}

/// Creates an SPSC ring with `capacity` slots and no metrics.
///
/// # Panics
/// If `capacity` is zero, not a power of two, or above [`CAPACITY_MAX`]
/// (use [`capacity_for`] to round a requested size up).
#[must_use]
#[track_caller]
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    channel_starting_at(capacity, 0)
}

/// Creates an SPSC ring with `capacity` slots that reports to metrics of type `M`.
///
/// # Panics
/// As [`channel`].
#[must_use]
#[track_caller]
pub fn channel_with_metrics<T, M: RingMetrics>(
    capacity: usize,
) -> (Producer<T, M>, Consumer<T, M>) {
    channel_starting_at(capacity, 0)
}

/// Creates a ring whose positions start at `start` (tests start near `usize::MAX` to
/// exercise position wrap-around). The only allocation a ring ever makes is here.
#[track_caller]
fn channel_starting_at<T, M: RingMetrics>(
    capacity: usize,
    start: usize,
) -> (Producer<T, M>, Consumer<T, M>) {
    check_capacity("spsc", capacity, 1);
    let raw = Box::into_raw(Box::<[T]>::new_uninit_slice(capacity));
    let buffer = NonNull::new(raw.cast::<T>()).expect("Box::into_raw returned null");
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(start)),
        tail: CachePadded::new(AtomicUsize::new(start)),
        buffer,
        capacity,
        tracker: SlotAccessTracker::new(capacity),
        metrics: M::default(),
    });
    let producer = Producer {
        shared: Arc::clone(&shared),
        buffer,
        mask: capacity - 1,
        tail: start,
        cached_head: start,
    };
    let consumer = Consumer {
        shared,
        buffer,
        mask: capacity - 1,
        head: start,
        cached_tail: start,
    };
    (producer, consumer)
}

/// `Arc::strong_count` is a `Relaxed` load; when it says the other handle is gone, an
/// `Acquire` fence pairs with that handle's `Release` decrement in its `Arc` drop, so
/// everything it published before dropping is visible to what the caller does next.
#[inline]
fn other_side_gone<T, M>(shared: &Arc<Shared<T, M>>) -> bool {
    let gone = Arc::strong_count(shared) == 1;
    if gone {
        fence(Ordering::Acquire);
    }
    gone
}

impl<T, M: RingMetrics> Producer<T, M> {
    /// Slots that look free from the cached head (a lower bound of the truth).
    #[inline(always)]
    fn free_cached(&self) -> usize {
        let used = self.tail.wrapping_sub(self.cached_head);
        debug_assert!(used <= self.mask + 1, "producer sees more items than slots");
        self.mask + 1 - used
    }

    /// Re-reads the consumer's position and returns the free slot count.
    #[inline]
    fn refresh_head(&mut self) -> usize {
        // Acquire: pairs with the consumer's Release store of `head`, so its reads (moves
        // out) of every slot before that head happen-before we overwrite those slots.
        self.cached_head = self.shared.head.load(Ordering::Acquire);
        self.free_cached()
    }

    /// Free slots, touching the shared head only if fewer than `wanted` look free.
    #[inline(always)]
    fn free_for(&mut self, wanted: usize) -> usize {
        let free = self.free_cached();
        if free >= wanted {
            free
        } else {
            self.refresh_head()
        }
    }

    /// Writes `item` into the slot at position `pos`.
    ///
    /// # Safety
    /// `pos` must be in `[tail, tail + free)`: a slot outside `[head, tail)` that holds no
    /// live item and that the consumer will not read before it is published.
    #[inline(always)]
    unsafe fn write_slot(&self, pos: usize, item: T) {
        let index = pos & self.mask;
        self.shared.tracker.write(index);
        // SAFETY: `index <= mask < capacity`, so the pointer is inside the buffer; the
        // caller guarantees the producer owns the slot and it holds no live item.
        unsafe { self.buffer.as_ptr().add(index).write(item) };
    }

    /// Records loom writes for `count` slots from `pos` (nothing without loom).
    #[inline(always)]
    fn track_writes(&self, pos: usize, count: usize) {
        #[cfg(loom)]
        for i in 0..count {
            self.shared.tracker.write(pos.wrapping_add(i) & self.mask);
        }
        #[cfg(not(loom))]
        let _ = (pos, count);
    }

    /// Makes `count` written slots visible to the consumer: the one `Release` store of a call.
    #[inline(always)]
    fn publish(&mut self, count: usize) {
        debug_assert!(
            count <= self.free_cached(),
            "publishing past the free slots"
        );
        self.tail = self.tail.wrapping_add(count);
        // Release: every slot write before this store happens-before the consumer's reads
        // of those slots, which follow its Acquire load of `tail`.
        self.shared.tail.store(self.tail, Ordering::Release);
        self.shared.metrics.on_push(count);
    }

    /// Pushes one item, or hands it back in [`Full`] if the ring is full.
    #[inline]
    pub fn push(&mut self, item: T) -> Result<(), Full<T>> {
        if self.free_for(1) == 0 {
            self.shared.metrics.on_full();
            return Err(Full(item));
        }
        // SAFETY: at least one slot is free, so position `tail` is a free slot.
        unsafe { self.write_slot(self.tail, item) };
        self.publish(1);
        Ok(())
    }

    /// Copies the longest prefix of `items` that fits and publishes it with one `Release`
    /// store. Returns how many items were pushed (0 if the ring is full). Reports a full
    /// event to the metrics when not all of `items` fit.
    #[inline]
    pub fn push_slice(&mut self, items: &[T]) -> usize
    where
        T: Copy,
    {
        let count = items.len().min(self.free_for(items.len()));
        if count < items.len() {
            self.shared.metrics.on_full();
        }
        if count == 0 {
            return 0;
        }
        let (start, first, second) = split(self.tail, count, self.mask);
        self.track_writes(self.tail, count);
        // SAFETY: the `count` slots from `tail` are free (count <= free slots), so the
        // consumer reads none of them until `publish`. `start + first <= capacity` and
        // `second < capacity` keep both runs in the buffer and `first + second == count
        // <= items.len()` keeps the source in `items`. `items` cannot overlap free slots:
        // the only references into the buffer (read chunks) cover `[head, tail)`. `T: Copy`,
        // so overwriting the (dead) old slot contents drops nothing.
        unsafe {
            let dst = self.buffer.as_ptr();
            ptr::copy_nonoverlapping(items.as_ptr(), dst.add(start), first);
            ptr::copy_nonoverlapping(items.as_ptr().add(first), dst, second);
        }
        self.publish(count);
        count
    }

    /// Moves items from `items` into the ring until it runs out or the ring is full, and
    /// publishes them with one `Release` store. Never pulls an item it cannot store: at most
    /// the free slot count is taken from the iterator. Returns how many items were pushed.
    ///
    /// Reports a full event to the metrics when no slot is free. If the iterator panics,
    /// the items already moved are still published.
    pub fn push_iter<I: Iterator<Item = T>>(&mut self, items: &mut I) -> usize {
        let free = self.free_for(items.size_hint().0.max(1));
        if free == 0 {
            self.shared.metrics.on_full();
            return 0;
        }
        let mut guard = PublishOnDrop {
            producer: self,
            written: 0,
        };
        while guard.written < free {
            let Some(item) = items.next() else { break };
            let pos = guard.producer.tail.wrapping_add(guard.written);
            // SAFETY: `written < free`, so `pos` is in `[tail, tail + free)`, a free slot.
            unsafe { guard.producer.write_slot(pos, item) };
            guard.written += 1;
        }
        guard.written
    }

    /// Free slots right now (re-reads the consumer's position).
    #[inline]
    pub fn free_slots(&mut self) -> usize {
        self.refresh_head()
    }

    /// Number of slots (fixed at construction).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Items in the ring. Exact when the consumer is idle; while it runs, an
    /// over-estimate (the consumer may pop at any moment).
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot for the caller's information; no slot access depends on it.
        self.tail
            .wrapping_sub(self.shared.head.load(Ordering::Relaxed))
    }

    /// Whether the ring is empty; an approximation while the consumer runs (see [`len`](Self::len)).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshot of the ring's metrics (all zero with [`NoMetrics`]).
    pub fn stats(&self) -> RingStats {
        self.shared.metrics.stats()
    }

    /// Whether the [`Consumer`] has been dropped (nothing pushed from now on will be read).
    #[inline]
    pub fn is_abandoned(&self) -> bool {
        other_side_gone(&self.shared)
    }
}

/// Publishes the slots written so far when a batch push ends, even by a panic.
struct PublishOnDrop<'a, T, M: RingMetrics> {
    producer: &'a mut Producer<T, M>,
    written: usize,
}

impl<T, M: RingMetrics> Drop for PublishOnDrop<'_, T, M> {
    #[inline]
    fn drop(&mut self) {
        if self.written > 0 {
            self.producer.publish(self.written);
        }
    }
}

impl<T, M: RingMetrics> fmt::Debug for Producer<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<T, M: RingMetrics> Consumer<T, M> {
    /// Items that look available from the cached tail (a lower bound of the truth).
    #[inline(always)]
    fn available_cached(&self) -> usize {
        let count = self.cached_tail.wrapping_sub(self.head);
        debug_assert!(
            count <= self.mask + 1,
            "consumer sees more items than slots"
        );
        count
    }

    /// Re-reads the producer's position and returns the available item count.
    #[inline]
    fn refresh_tail(&mut self) -> usize {
        // Acquire: pairs with the producer's Release store of `tail`, so its writes of every
        // slot before that tail happen-before our reads of them.
        self.cached_tail = self.shared.tail.load(Ordering::Acquire);
        self.available_cached()
    }

    /// Available items, touching the shared tail only if fewer than `wanted` look available.
    #[inline(always)]
    fn available_for(&mut self, wanted: usize) -> usize {
        let count = self.available_cached();
        if count >= wanted {
            count
        } else {
            self.refresh_tail()
        }
    }

    /// Moves the item out of the slot at position `pos`.
    ///
    /// # Safety
    /// `pos` must be in `[head, head + available)`, and the slot must be released (head
    /// moved past it) before it is read again: after this call it holds no live item.
    #[inline(always)]
    unsafe fn read_slot(&self, pos: usize) -> T {
        let index = pos & self.mask;
        self.shared.tracker.write(index);
        // SAFETY: `index < capacity` keeps the pointer in the buffer; the caller guarantees
        // the slot holds a published, initialised item owned by the consumer.
        unsafe { self.buffer.as_ptr().add(index).read() }
    }

    /// Records loom accesses for `count` slots from `pos` (nothing without loom).
    #[inline(always)]
    fn track(&self, pos: usize, count: usize, write: bool) {
        #[cfg(loom)]
        for i in 0..count {
            let index = pos.wrapping_add(i) & self.mask;
            if write {
                self.shared.tracker.write(index);
            } else {
                self.shared.tracker.read(index);
            }
        }
        #[cfg(not(loom))]
        let _ = (pos, count, write);
    }

    /// Hands `count` consumed slots back to the producer: the one `Release` store of a call.
    #[inline(always)]
    fn release(&mut self, count: usize) {
        debug_assert!(count <= self.available_cached(), "releasing unread slots");
        self.head = self.head.wrapping_add(count);
        // Release: our reads (moves out, drops) of these slots happen-before the producer's
        // next writes to them, which follow its Acquire load of `head`.
        self.shared.head.store(self.head, Ordering::Release);
        self.shared.metrics.on_pop(count);
    }

    /// Pops the oldest item, or `None` if the ring is empty.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.available_for(1) == 0 {
            return None;
        }
        // SAFETY: at least one item is available at `head`; `release(1)` follows at once.
        let item = unsafe { self.read_slot(self.head) };
        self.release(1);
        Some(item)
    }

    /// Copies up to `out.len()` of the oldest items into `out` and releases them with one
    /// `Release` store. Returns how many were copied.
    #[inline]
    pub fn pop_slice(&mut self, out: &mut [T]) -> usize
    where
        T: Copy,
    {
        let count = out.len().min(self.available_for(out.len()));
        if count == 0 {
            return 0;
        }
        let (start, first, second) = split(self.head, count, self.mask);
        self.track(self.head, count, true);
        // SAFETY: the `count` slots from `head` hold published items owned by the consumer
        // (count <= available); both runs stay inside the buffer and `first + second ==
        // count <= out.len()` keeps the destination inside `out`, which as a `&mut` cannot
        // alias the buffer. `T: Copy`, so copying out leaves nothing to drop.
        unsafe {
            let src = self.buffer.as_ptr();
            ptr::copy_nonoverlapping(src.add(start), out.as_mut_ptr(), first);
            ptr::copy_nonoverlapping(src, out.as_mut_ptr().add(first), second);
        }
        self.release(count);
        count
    }

    /// Moves up to `max` of the oldest items, in order, into `f`, then releases them with
    /// one `Release` store. Returns how many were moved.
    ///
    /// If `f` panics, the items already handed to it count as consumed.
    pub fn pop_each(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let count = max.min(self.available_for(max));
        let mut guard = ReleaseOnDrop {
            consumer: self,
            taken: 0,
        };
        while guard.taken < count {
            let pos = guard.consumer.head.wrapping_add(guard.taken);
            // SAFETY: `taken < count <= available`, so `pos` holds a published item; it is
            // counted as taken before `f` runs, so the guard releases it even on a panic.
            let item = unsafe { guard.consumer.read_slot(pos) };
            guard.taken += 1;
            f(item);
        }
        count
    }

    /// Borrows up to `max` of the oldest items in place (zero-copy). Nothing is consumed
    /// until [`ReadChunk::commit`] or [`ReadChunk::commit_all`]; dropping the chunk without
    /// committing leaves every item in the ring.
    #[inline]
    pub fn read_chunk(&mut self, max: usize) -> ReadChunk<'_, T, M> {
        let len = max.min(self.available_for(max));
        ReadChunk {
            consumer: self,
            len,
        }
    }

    /// Items available right now (re-reads the producer's position).
    #[inline]
    pub fn available(&mut self) -> usize {
        self.refresh_tail()
    }

    /// Number of slots (fixed at construction).
    #[inline]
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Items in the ring. Exact when the producer is idle; while it runs, an
    /// under-estimate (the producer may push at any moment).
    #[inline]
    pub fn len(&self) -> usize {
        // Relaxed: a snapshot for the caller's information; reads of slots always go
        // through `refresh_tail`'s Acquire load instead.
        self.shared
            .tail
            .load(Ordering::Relaxed)
            .wrapping_sub(self.head)
    }

    /// Whether the ring is empty; an approximation while the producer runs (see [`len`](Self::len)).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshot of the ring's metrics (all zero with [`NoMetrics`]).
    pub fn stats(&self) -> RingStats {
        self.shared.metrics.stats()
    }

    /// Whether the [`Producer`] has been dropped. Once this returns `true`, every item it
    /// pushed is visible: pop until `None` to drain the ring.
    #[inline]
    pub fn is_abandoned(&self) -> bool {
        other_side_gone(&self.shared)
    }
}

/// Releases the slots taken so far when a batch pop ends, even by a panic.
struct ReleaseOnDrop<'a, T, M: RingMetrics> {
    consumer: &'a mut Consumer<T, M>,
    taken: usize,
}

impl<T, M: RingMetrics> Drop for ReleaseOnDrop<'_, T, M> {
    #[inline]
    fn drop(&mut self) {
        if self.taken > 0 {
            self.consumer.release(self.taken);
        }
    }
}

impl<T, M: RingMetrics> fmt::Debug for Consumer<T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// Up to `max` of the oldest items of a ring, borrowed in place by [`Consumer::read_chunk`].
///
/// The items stay in the ring (and the producer cannot overwrite them) until the chunk is
/// committed; dropping it uncommitted consumes nothing.
pub struct ReadChunk<'a, T, M: RingMetrics = NoMetrics> {
    consumer: &'a mut Consumer<T, M>,
    len: usize,
}

impl<T, M: RingMetrics> ReadChunk<'_, T, M> {
    /// Items in the chunk.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the chunk holds no items.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The items, oldest first, as two slices (the second is non-empty only when the chunk
    /// wraps past the end of the buffer).
    #[inline]
    pub fn as_slices(&self) -> (&[T], &[T]) {
        let head = self.consumer.head;
        let (start, first, second) = split(head, self.len, self.consumer.mask);
        self.consumer.track(head, self.len, false);
        // SAFETY: the `len` slots from `head` hold published, initialised items (len <=
        // available after the Acquire load of `tail`). The producer writes only slots
        // outside `[head, tail)` and `head` cannot move while this chunk borrows the
        // consumer mutably, so nothing writes them while the slices live. Both runs lie
        // inside the buffer.
        unsafe {
            let base = self.consumer.buffer.as_ptr();
            (
                slice::from_raw_parts(base.add(start), first),
                slice::from_raw_parts(base, second),
            )
        }
    }

    /// Consumes the first `count` items of the chunk (dropping them in place) and releases
    /// their slots with one `Release` store. The rest stay in the ring.
    ///
    /// # Panics
    /// If `count > self.len()`.
    pub fn commit(self, count: usize) {
        assert!(
            count <= self.len,
            "commit({count}) exceeds the chunk length {}",
            self.len
        );
        let consumer = self.consumer;
        let head = consumer.head;
        let base = consumer.buffer.as_ptr();
        let (start, first, second) = split(head, count, consumer.mask);
        consumer.track(head, count, true);
        // Releases all `count` slots even if an item's `Drop` panics: the slice drop still
        // drops the rest of the run it was in, and a second run (past the buffer's wrap) is
        // then leaked; nothing is dropped twice.
        let _release = ReleaseOnDrop {
            consumer,
            taken: count,
        };
        if mem::needs_drop::<T>() {
            // SAFETY: the `count <= len` slots from `head` hold initialised items owned by
            // the consumer; each is dropped once, and `_release` moves `head` past them
            // so they are never read or dropped again. Both runs lie inside the buffer.
            unsafe {
                ptr::drop_in_place(ptr::slice_from_raw_parts_mut(base.add(start), first));
                ptr::drop_in_place(ptr::slice_from_raw_parts_mut(base, second));
            }
        }
    }

    /// Consumes every item in the chunk; see [`commit`](Self::commit).
    #[inline]
    pub fn commit_all(self) {
        let len = self.len;
        self.commit(len);
    }
}

impl<T, M: RingMetrics> fmt::Debug for ReadChunk<'_, T, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadChunk")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::ring::Counting;
    use std::sync::atomic::{AtomicUsize as StdAtomicUsize, Ordering as StdOrdering};

    use crate::ring::test_support::{DropCounter, counters, scaled};

    #[test]
    fn push_pop_basic() {
        let (mut p, mut c) = channel::<u32>(4);
        assert_eq!(p.capacity(), 4);
        assert!(p.is_empty() && c.is_empty());
        assert_eq!(c.pop(), None);
        p.push(1).unwrap();
        p.push(2).unwrap();
        assert_eq!((p.len(), c.len()), (2, 2));
        assert_eq!(c.pop(), Some(1));
        assert_eq!(c.pop(), Some(2));
        assert_eq!(c.pop(), None);
        assert_eq!(p.free_slots(), 4);
    }

    #[test]
    fn full_returns_the_item() {
        let (mut p, mut c) = channel_with_metrics::<String, Counting>(2);
        p.push("a".into()).unwrap();
        p.push("b".into()).unwrap();
        let Full(back) = p.push("c".into()).unwrap_err();
        assert_eq!(back, "c");
        assert_eq!(p.push("d".into()).unwrap_err().into_inner(), "d");
        assert_eq!(p.free_slots(), 0);
        assert_eq!(c.pop().as_deref(), Some("a"));
        p.push("e".into()).unwrap();
        let stats = p.stats();
        assert_eq!((stats.pushed, stats.popped, stats.full_events), (3, 1, 2));
        assert_eq!(Full(1).to_string(), "ring is full");
    }

    #[test]
    fn capacity_one_works() {
        let (mut p, mut c) = channel::<u8>(1);
        for i in 0..10 {
            p.push(i).unwrap();
            assert!(p.push(99).is_err());
            assert_eq!(c.pop(), Some(i));
        }
    }

    #[test]
    fn wraps_around_many_times() {
        let (mut p, mut c) = channel::<usize>(8);
        let mut next_out = 0;
        for i in 0..scaled(10_000) {
            p.push(i).unwrap();
            if !i.is_multiple_of(3) {
                assert_eq!(c.pop(), Some(next_out));
                next_out += 1;
            }
            if p.free_slots() == 0 {
                while let Some(v) = c.pop() {
                    assert_eq!(v, next_out);
                    next_out += 1;
                }
            }
        }
        while let Some(v) = c.pop() {
            assert_eq!(v, next_out);
            next_out += 1;
        }
        assert_eq!(next_out, scaled(10_000));
    }

    #[test]
    fn positions_wrap_past_usize_max() {
        let (mut p, mut c) = channel_starting_at::<u64, NoMetrics>(4, usize::MAX - 5);
        let mut out = [0u64; 3];
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..20u32 {
            let batch: Vec<u64> = (next_in..next_in + 3).collect();
            next_in += p.push_slice(&batch) as u64;
            if round.is_multiple_of(2) {
                p.push(next_in).map(|()| next_in += 1).ok();
            }
            let n = c.pop_slice(&mut out);
            for &v in &out[..n] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
            assert_eq!(c.len() as u64, next_in - next_out);
        }
        assert!(next_out > 30, "positions did not cross usize::MAX");
    }

    #[test]
    fn batch_of_ten_thousand() {
        let n = scaled(10_000);
        let (mut p, mut c) = channel::<u32>(capacity_for(n));
        let items: Vec<u32> = (0..n as u32).collect();
        for round in 0..3 {
            // Offset the positions so later rounds wrap around the buffer end.
            p.push(u32::MAX).unwrap();
            assert_eq!(c.pop(), Some(u32::MAX));
            assert_eq!(p.push_slice(&items), n, "round {round}");
            let mut out = vec![0u32; n + 5];
            assert_eq!(c.pop_slice(&mut out), n);
            assert_eq!(&out[..n], &items[..]);

            assert_eq!(p.push_iter(&mut items.iter().copied()), n);
            let mut expected = 0u32;
            assert_eq!(
                c.pop_each(usize::MAX, |v| {
                    assert_eq!(v, expected);
                    expected += 1;
                }),
                n
            );
        }
    }

    #[test]
    fn push_slice_pushes_a_prefix() {
        let (mut p, mut c) = channel_with_metrics::<u8, Counting>(4);
        assert_eq!(p.push_slice(&[1, 2, 3]), 3);
        assert_eq!(p.push_slice(&[4, 5, 6]), 1);
        assert_eq!(p.push_slice(&[7]), 0);
        assert_eq!(p.push_slice(&[]), 0);
        let mut out = [0u8; 8];
        assert_eq!(c.pop_slice(&mut out[..2]), 2);
        assert_eq!(c.pop_slice(&mut out[2..]), 2);
        assert_eq!(out[..4], [1, 2, 3, 4]);
        assert_eq!(p.stats().full_events, 2);
    }

    #[test]
    fn push_iter_never_pulls_an_item_it_cannot_store() {
        let (mut p, mut c) = channel::<u32>(4);
        let mut source = 0..10u32;
        assert_eq!(p.push_iter(&mut source), 4);
        assert_eq!(
            source.next(),
            Some(4),
            "item 4 must still be in the iterator"
        );
        assert_eq!(p.push_iter(&mut source), 0);
        assert_eq!(source.next(), Some(5));
        assert_eq!(c.pop(), Some(0));
        // An iterator with no size hint still gets exactly the free slots.
        let mut unhinted = (6..10u32).filter(|_| true);
        assert_eq!(p.push_iter(&mut unhinted), 1);
        assert_eq!(unhinted.next(), Some(7));
        let mut got = Vec::new();
        c.pop_each(10, |v| got.push(v));
        assert_eq!(got, [1, 2, 3, 6]);
    }

    #[test]
    fn read_chunk_borrows_then_commits() {
        let (mut p, mut c) = channel::<u32>(8);
        for i in 0..6 {
            p.push(i).unwrap();
        }
        assert_eq!(c.pop_slice(&mut [0; 5]), 5);
        // Positions 5..13: the chunk wraps past the buffer end.
        assert_eq!(p.push_iter(&mut (6..13)), 7);
        {
            let chunk = c.read_chunk(100);
            assert_eq!(chunk.len(), 8);
            let (a, b) = chunk.as_slices();
            assert_eq!((a, b), (&[5, 6, 7][..], &[8, 9, 10, 11, 12][..]));
            // Dropped without commit: nothing consumed.
        }
        assert_eq!(c.len(), 8);
        let chunk = c.read_chunk(4);
        assert_eq!(chunk.as_slices(), (&[5, 6, 7][..], &[8][..]));
        chunk.commit(2);
        assert_eq!(c.pop(), Some(7));
        c.read_chunk(2).commit_all();
        assert_eq!(c.pop(), Some(10));
        let empty = c.read_chunk(0);
        assert!(empty.is_empty());
        empty.commit_all();
        assert_eq!(c.len(), 2);
        assert_eq!(p.free_slots(), 6);
    }

    #[test]
    #[should_panic(expected = "exceeds the chunk length")]
    fn read_chunk_commit_too_many_panics() {
        let (mut p, mut c) = channel::<u32>(4);
        p.push(1).unwrap();
        c.read_chunk(4).commit(2);
    }

    #[test]
    fn every_item_drops_exactly_once() {
        let drops = std::sync::Arc::new(StdAtomicUsize::new(0));
        let (mut p, mut c) = channel::<DropCounter>(16);
        // The iterator is lazy: items it is never asked for are never created.
        assert_eq!(p.push_iter(&mut counters(20, &drops)), 16);
        assert_eq!(drops.load(StdOrdering::Relaxed), 0);
        // Partial batch pop: 5 items moved out and dropped by the closure.
        let mut seen = Vec::new();
        assert_eq!(c.pop_each(5, |item| seen.push(item.value)), 5);
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        assert_eq!(drops.load(StdOrdering::Relaxed), 5);
        // read_chunk: commit drops in place, dropping the chunk drops nothing.
        {
            let uncommitted = c.read_chunk(3);
            assert_eq!(uncommitted.as_slices().0.len(), 3);
        }
        assert_eq!(drops.load(StdOrdering::Relaxed), 5);
        c.read_chunk(3).commit(3);
        assert_eq!(drops.load(StdOrdering::Relaxed), 8);
        let item = c.pop().unwrap();
        assert_eq!(item.value, 8);
        drop(item);
        // Wrap the buffer and leave items in it, then drop the handles in either order.
        assert_eq!(p.push_iter(&mut counters(9, &drops)), 9);
        drop(p);
        assert!(c.is_abandoned());
        assert_eq!(drops.load(StdOrdering::Relaxed), 9);
        drop(c);
        // 25 created: 5 + 3 + 1 dropped earlier, 16 left in the ring.
        assert_eq!(drops.load(StdOrdering::Relaxed), 25);
    }

    #[test]
    fn drop_consumer_first_and_panicking_pop_each() {
        let drops = std::sync::Arc::new(StdAtomicUsize::new(0));
        let (mut p, mut c) = channel::<DropCounter>(8);
        assert_eq!(p.push_iter(&mut counters(8, &drops)), 8);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.pop_each(8, |item| assert!(item.value < 3, "boom"));
        }));
        assert!(result.is_err());
        // Items 0..=3 were handed to the closure (and dropped by it); 4..8 remain.
        assert_eq!(drops.load(StdOrdering::Relaxed), 4);
        assert_eq!(c.len(), 4);
        assert_eq!(c.pop().map(|i| i.value), Some(4));
        drop(c);
        assert!(p.is_abandoned());
        assert_eq!(drops.load(StdOrdering::Relaxed), 5);
        drop(p);
        assert_eq!(drops.load(StdOrdering::Relaxed), 8);
    }

    #[test]
    fn zero_sized_items() {
        let (mut p, mut c) = channel::<()>(4);
        assert_eq!(p.push_slice(&[(); 6]), 4);
        assert!(p.push(()).is_err());
        assert_eq!(c.pop_slice(&mut [(); 3]), 3);
        assert_eq!(c.read_chunk(9).len(), 1);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn zero_capacity_panics() {
        let _ = channel::<u8>(0);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn non_power_of_two_panics() {
        let _ = channel::<u8>(12);
    }

    #[test]
    fn capacity_for_rounds_up() {
        assert_eq!(capacity_for(0), 1);
        assert_eq!(capacity_for(1), 1);
        assert_eq!(capacity_for(3), 4);
        assert_eq!(capacity_for(10_000), 16_384);
    }

    #[test]
    fn handles_are_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Producer<String>>();
        assert_send::<Consumer<String, Counting>>();
    }

    #[test]
    fn threads_exchange_items_in_order() {
        let total = scaled(50_000) as u64;
        let (mut p, mut c) = channel::<u64>(64);
        let producer = std::thread::spawn(move || {
            let mut next = 0u64;
            while next < total {
                if next.is_multiple_of(7) {
                    let batch: Vec<u64> = (next..total.min(next + 13)).collect();
                    next += p.push_slice(&batch) as u64;
                } else if p.push(next).is_ok() {
                    next += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut expected = 0u64;
        let mut buf = [0u64; 17];
        let mut round = 0u64;
        while expected < total {
            round += 1;
            let n = if round.is_multiple_of(2) {
                let n = c.pop_slice(&mut buf);
                for &v in &buf[..n] {
                    assert_eq!(v, expected);
                    expected += 1;
                }
                n
            } else {
                c.pop_each(3, |v| {
                    assert_eq!(v, expected);
                    expected += 1;
                })
            };
            if n == 0 {
                std::thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert!(c.is_abandoned());
        assert_eq!(c.pop(), None);
    }
}
