//! Many application threads submitting into the shards: the embedding API's ingest path.
//!
//! A validator's RPC workers are ordinary threads — not pinned, possibly far more of them
//! than cores. [`Submitter`] (from [`crate::runtime::Node::submitter`]) lets any of them hand
//! one record to the shard that owns it (`S::route`) and wait for its result:
//!
//! * every submission takes a **completion slot** from a node-wide pool allocated at start-up
//!   (its index travels as the record's handle; the free list is the engine's MPMC ring). The
//!   slot holds the record on the way in and the result on the way out, so nothing is
//!   allocated per transaction;
//! * the slot's handle (index and generation, 8 bytes) goes into the owning shard's bounded
//!   **ingress ring** (an engine [`Mpmc`]); the shard's drain task moves handles in bulk
//!   (`pop_batch`) into [`ShardCore::submit`](crate::core::ShardCore::submit) with
//!   [`Origin::Ingress`](crate::core::Origin::Ingress);
//! * when the record's batch is applied the shard writes the result into the slot and flips
//!   its state; a [`Ticket`] holder spinning or yielding sees it at once, a parked one is
//!   unparked (`std::thread::unpark`, the only syscall on the result path, and only for a
//!   thread that parked).
//!
//! **Back-pressure.** [`Submitter::submit`] never waits: no free slot or a full ring is
//! [`SubmitError::Full`] with the record handed back. [`Submitter::submit_wait`] waits until a
//! deadline with a bounded back-off — spin a little, then `yield_now`, then park on a
//! `Condvar` ([`Waiters`]) — and returns [`SubmitError::Timeout`] if the deadline passes. The
//! shard (ring room) and ticket holders (slots) wake parked producers; on their fast path
//! that costs one fence and one load of the waiter count, never a lock.
//!
//! **Waking a parked shard.** A shard with nothing to do parks in io_uring. Its drain task
//! announces that it is going idle (a per-shard `idle` flag, after registering its waker);
//! a producer that pushed a handle reads the flag and only when it is set swaps it off and
//! wakes the task (glommio routes a foreign wake through the executor's eventfd). The fast
//! path — shard busy — is a fence and a load, no syscall and no lock.
//!
//! **Order.** One thread's submissions to one shard are applied in the order it made them:
//! the ring is FIFO by claimed position, its single consumer drains in order, and the core
//! seals in ring order. Submissions to different shards have no order between them.
//!
//! **Shutdown.** After the node's stop flag is set, `submit` answers
//! [`SubmitError::Stopped`]. Each shard drains its ring once more, then retires it; a handle
//! found in a retired ring (pushed while the node stopped) is completed as aborted, so no
//! [`Ticket`] waits for a result that cannot come.
//!
//! This module never allocates after [`Ingress::new`] on the submit, drain and completion
//! paths, never blocks a shard (the shard only pops, stores and unparks), and holds no lock
//! that a shard takes except on the slow paths named above. It contains no `unsafe`: records
//! and results are `Pod` and cross threads as words of `AtomicU64`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use percore_engine::ring::mpmc::{self, Mpmc};
pub use percore_engine::ring::waiters::{
    BACKOFF_SPIN_ROUNDS, BACKOFF_YIELDS_MAX, Backoff, PARK_SLICE_US, WAKE_PER_NOTIFY_MAX, Waiters,
};
use percore_engine::state_machine::StateMachine;

/// Default capacity of each shard's ingress ring (record handles).
pub const INGEST_RING_CAPACITY_DEFAULT: usize = 4_096;
/// Default completion slots of a node: submissions in flight at once, all shards together.
pub const INGEST_SLOTS_DEFAULT: usize = 16_384;
/// Most completion slots a node may have (a handle packs the index into 32 bits).
pub const INGEST_SLOTS_MAX: usize = 1 << 24;
/// Most handles a shard moves from its ingress ring into its core per drain.
pub const INGEST_DRAIN_BATCH_MAX: usize = 256;
/// How long a shard whose core has no room waits before draining again (µs).
pub const DRAIN_BACKPRESSURE_RETRY_US: u64 = 20;

const _: () = assert!(INGEST_DRAIN_BATCH_MAX <= INGEST_RING_CAPACITY_DEFAULT);
const _: () = assert!(INGEST_SLOTS_DEFAULT <= INGEST_SLOTS_MAX);
const _: () = assert!(INGEST_SLOTS_MAX <= u32::MAX as usize);

/// Sizes of the ingest path, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestConfig {
    /// Capacity of each shard's ingress ring (power of two, at least 2).
    pub ring_capacity: usize,
    /// Completion slots of the node: submissions in flight at once (1..=`INGEST_SLOTS_MAX`).
    pub slots: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            ring_capacity: INGEST_RING_CAPACITY_DEFAULT,
            slots: INGEST_SLOTS_DEFAULT,
        }
    }
}

/// An unusable [`IngestConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IngestConfigError {
    /// The ring capacity is not a power of two of at least 2.
    #[error("ingest ring_capacity {0} must be a power of two >= 2")]
    RingCapacity(usize),
    /// The slot count is zero or above [`INGEST_SLOTS_MAX`].
    #[error("ingest slots {0} must be between 1 and {INGEST_SLOTS_MAX}")]
    Slots(usize),
}

impl IngestConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), IngestConfigError> {
        if !self.ring_capacity.is_power_of_two()
            || self.ring_capacity < 2
            || self.ring_capacity > mpmc::CAPACITY_MAX
        {
            return Err(IngestConfigError::RingCapacity(self.ring_capacity));
        }
        if self.slots == 0 || self.slots > INGEST_SLOTS_MAX {
            return Err(IngestConfigError::Slots(self.slots));
        }
        Ok(())
    }
}

/// Why a record was not submitted. The record is handed back.
#[derive(Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError<R> {
    /// [`Submitter::submit`]: no completion slot is free or the shard's ring is full now.
    #[error("ingest full: no completion slot or ring room")]
    Full(R),
    /// [`Submitter::submit_wait`]: still full at the deadline.
    #[error("ingest still full at the deadline")]
    Timeout(R),
    /// The node is stopping; nothing more is accepted.
    #[error("the node is stopping")]
    Stopped(R),
}

impl<R> SubmitError<R> {
    /// The record that was not submitted.
    pub fn into_record(self) -> R {
        match self {
            SubmitError::Full(record)
            | SubmitError::Timeout(record)
            | SubmitError::Stopped(record) => record,
        }
    }
}

impl<R> fmt::Debug for SubmitError<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubmitError::Full(_) => "Full(..)",
            SubmitError::Timeout(_) => "Timeout(..)",
            SubmitError::Stopped(_) => "Stopped(..)",
        })
    }
}

/// Why a [`Ticket`] gave no result.
#[derive(thiserror::Error)]
pub enum TicketError<'s, S: StateMachine> {
    /// No result yet at the deadline; the ticket is handed back to wait again (or drop).
    #[error("no result at the deadline")]
    Timeout(Ticket<'s, S>),
    /// The record will never have a result here: the node stopped before taking it, or this
    /// replica stopped leading before it committed. It may or may not have been applied
    /// elsewhere (a new leader): look it up by its id.
    #[error("the record was dropped before it committed here")]
    Aborted,
}

impl<S: StateMachine> fmt::Debug for TicketError<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TicketError::Timeout(ticket) => f.debug_tuple("Timeout").field(ticket).finish(),
            TicketError::Aborted => f.write_str("Aborted"),
        }
    }
}

/// Completion slot states.
const FREE: u32 = 0;
/// Submitted; no result yet; nobody parked.
const PENDING: u32 = 1;
/// Submitted; the ticket holder registered its thread and may be parked.
const PARKED: u32 = 2;
/// The result is in the slot.
const DONE: u32 = 3;
/// No result will come.
const ABORTED: u32 = 4;
/// The ticket was dropped before the result: whoever completes the slot frees it.
const ABANDONED: u32 = 5;

/// One completion slot's control words (its record and result words live in flat arrays).
struct Slot {
    state: AtomicU32,
    /// Bumped each time the slot is freed: a handle from an earlier use never matches.
    generation: AtomicU32,
    operation: AtomicU32,
    /// The ticket holder's thread while it is parked (`PARKED` only; slow path).
    waiter: Mutex<Option<Thread>>,
}

/// A cache line of its own, so a flag written by producers does not share a line with
/// the ring counters or another shard's flag.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// One shard's ingress: its ring and its doorbell.
struct Lane {
    ring: Mpmc<u64>,
    /// The drain task announced that it is going idle: the next producer must wake it.
    idle: Padded<AtomicBool>,
    /// The drain task stopped consuming for good: producers clean up after themselves.
    retired: AtomicBool,
    /// The drain task's waker, registered before `idle` is set (slow path only).
    waker: Mutex<Option<Waker>>,
}

impl Lane {
    /// Wakes the drain task if it announced it is going idle. Call after a push.
    #[inline]
    fn ring_doorbell(&self) {
        // SeqCst fence: pairs with the drain task's fence between setting `idle` and looking
        // at the ring. Either it sees our push, or we see its `idle` (Dekker); without both
        // fences both sides could read the old value and the handle would sit unseen.
        fence(Ordering::SeqCst);
        if self.idle.0.load(Ordering::Relaxed) && self.idle.0.swap(false, Ordering::AcqRel) {
            let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(waker) = waker.as_ref() {
                waker.wake_by_ref();
            }
        }
    }
}

/// How much of the time until `deadline` is left, for [`Waiters::retry`] (`None` once it
/// has passed).
pub fn until(deadline: Instant) -> impl FnMut() -> Option<Duration> {
    move || deadline.checked_duration_since(Instant::now())
}

/// The node-wide ingest state shared by submitters and shards. See the module docs.
pub struct Ingress<S: StateMachine> {
    lanes: Box<[Lane]>,
    slots: Box<[Slot]>,
    /// `slots.len() * record_words` words: each slot's record.
    records: Box<[AtomicU64]>,
    /// `slots.len() * result_words` words: each slot's result.
    results: Box<[AtomicU64]>,
    record_words: usize,
    result_words: usize,
    /// Free completion slots (indices). Capacity >= slot count, so a push never fails.
    free: Mpmc<u32>,
    /// Producers waiting for room.
    space: Waiters,
    stop: Arc<AtomicBool>,
    _machine: PhantomData<fn() -> S>,
}

impl<S: StateMachine> fmt::Debug for Ingress<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress")
            .field("shards", &self.lanes.len())
            .field("slots", &self.slots.len())
            .field("slots_free", &self.free.len())
            .finish_non_exhaustive()
    }
}

fn words_of<T>() -> usize {
    size_of::<T>().div_ceil(8).max(1)
}

/// Copies a `Pod` value into atomic words (`Relaxed`: published by a later Release).
#[inline]
fn store_pod<T: Pod>(words: &[AtomicU64], value: &T) {
    let bytes = bytemuck::bytes_of(value);
    for (word, chunk) in words.iter().zip(bytes.chunks(8)) {
        let mut buffer = [0u8; 8];
        buffer[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_ne_bytes(buffer), Ordering::Relaxed);
    }
}

/// Reads a `Pod` value out of atomic words (`Relaxed`: after an Acquire of its publication).
#[inline]
fn load_pod<T: Pod>(words: &[AtomicU64]) -> T {
    let mut value = T::zeroed();
    let bytes = bytemuck::bytes_of_mut(&mut value);
    for (word, chunk) in words.iter().zip(bytes.chunks_mut(8)) {
        let buffer = word.load(Ordering::Relaxed).to_ne_bytes();
        chunk.copy_from_slice(&buffer[..chunk.len()]);
    }
    value
}

#[inline]
fn pack(slot: u32, generation: u32) -> u64 {
    (u64::from(slot) << 32) | u64::from(generation)
}

#[inline]
fn unpack(handle: u64) -> (u32, u32) {
    ((handle >> 32) as u32, handle as u32)
}

impl<S: StateMachine> Ingress<S> {
    /// Allocates every ring and slot of a node of `shards` shards. `stop` is the node's
    /// stop flag. The only allocation this module makes.
    pub fn new(
        config: IngestConfig,
        shards: usize,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, IngestConfigError> {
        config.validate()?;
        assert!(shards >= 1, "a node has at least one shard");
        let lanes = (0..shards)
            .map(|_| Lane {
                ring: Mpmc::new(config.ring_capacity),
                idle: Padded(AtomicBool::new(false)),
                retired: AtomicBool::new(false),
                waker: Mutex::new(None),
            })
            .collect();
        let slots: Box<[Slot]> = (0..config.slots)
            .map(|_| Slot {
                state: AtomicU32::new(FREE),
                generation: AtomicU32::new(0),
                operation: AtomicU32::new(0),
                waiter: Mutex::new(None),
            })
            .collect();
        let free = Mpmc::new(mpmc::capacity_for(config.slots));
        for index in 0..config.slots as u32 {
            free.push(index).expect("free list holds every slot");
        }
        let (record_words, result_words) = (words_of::<S::Record>(), words_of::<S::Result>());
        let words = |per_slot: usize| (0..config.slots * per_slot).map(|_| AtomicU64::new(0));
        Ok(Self {
            lanes,
            slots,
            records: words(record_words).collect(),
            results: words(result_words).collect(),
            record_words,
            result_words,
            free,
            space: Waiters::new(),
            stop,
            _machine: PhantomData,
        })
    }

    /// Shards fed by this ingress.
    pub fn shards(&self) -> usize {
        self.lanes.len()
    }

    /// Completion slots free now (a snapshot).
    pub fn slots_free(&self) -> usize {
        self.free.len()
    }

    /// Producers parked waiting for room now (a snapshot).
    pub fn producers_parked(&self) -> usize {
        self.space.parked()
    }

    fn record_words(&self, slot: u32) -> &[AtomicU64] {
        let start = slot as usize * self.record_words;
        &self.records[start..start + self.record_words]
    }

    fn result_words(&self, slot: u32) -> &[AtomicU64] {
        let start = slot as usize * self.result_words;
        &self.results[start..start + self.result_words]
    }

    /// Returns a slot to the free list and wakes one producer waiting for room.
    fn release(&self, slot: u32) {
        let control = &self.slots[slot as usize];
        control.generation.fetch_add(1, Ordering::Relaxed);
        control.state.store(FREE, Ordering::Relaxed);
        // The free list's Release push orders our stores before the next owner's pop.
        let pushed = self.free.push(slot);
        assert!(pushed.is_ok(), "the free list holds every slot");
        self.space.notify(1);
    }

    /// Non-blocking submit; see [`Submitter::submit`].
    fn try_submit(
        &self,
        operation: S::Operation,
        record: S::Record,
    ) -> Result<(u32, u32), SubmitError<S::Record>> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped(record));
        }
        let shard = S::route(operation, &record, self.lanes.len() as u32) as usize;
        let lane = &self.lanes[shard];
        let Some(slot) = self.free.pop() else {
            return Err(SubmitError::Full(record));
        };
        let control = &self.slots[slot as usize];
        debug_assert_eq!(control.state.load(Ordering::Relaxed), FREE);
        let generation = control.generation.load(Ordering::Relaxed);
        control
            .operation
            .store(u32::from(operation.into()), Ordering::Relaxed);
        store_pod(self.record_words(slot), &record);
        control.state.store(PENDING, Ordering::Relaxed);
        // The ring's Release publication of the handle orders the stores above before the
        // shard's Acquire pop.
        if lane.ring.push(pack(slot, generation)).is_err() {
            control.state.store(FREE, Ordering::Relaxed);
            let pushed = self.free.push(slot);
            assert!(pushed.is_ok(), "the free list holds every slot");
            return Err(SubmitError::Full(record));
        }
        lane.ring_doorbell();
        if lane.retired.load(Ordering::Relaxed) {
            // The shard stopped consuming (after the fence in `ring_doorbell`, so either it
            // saw our handle or we see this flag): abort what is left, ours included.
            self.sweep(shard);
        }
        Ok((slot, generation))
    }

    /// Called by the shard: moves up to `max` handles from its ring into `submit`, in
    /// order. `submit` must accept each (the caller checked room). Returns the count.
    pub(crate) fn drain(
        &self,
        shard: usize,
        max: usize,
        mut submit: impl FnMut(S::Operation, &S::Record, u32, u32),
    ) -> usize {
        let taken = self.lanes[shard].ring.pop_batch(max, |handle| {
            let (slot, generation) = unpack(handle);
            let control = &self.slots[slot as usize];
            debug_assert_eq!(control.generation.load(Ordering::Relaxed), generation);
            let code = control.operation.load(Ordering::Relaxed) as u16;
            let operation = S::Operation::try_from(code)
                .ok()
                .expect("a submitter stored a valid operation");
            let record: S::Record = load_pod(self.record_words(slot));
            submit(operation, &record, slot, generation);
        });
        self.space.notify(taken);
        taken
    }

    /// Called by the shard: delivers a result to the slot's ticket.
    pub(crate) fn complete(&self, slot: u32, generation: u32, result: &S::Result) {
        let control = &self.slots[slot as usize];
        if control.generation.load(Ordering::Relaxed) != generation {
            debug_assert!(false, "a completion slot was freed before its result");
            return;
        }
        store_pod(self.result_words(slot), result);
        // AcqRel: Release publishes the result words to the ticket's Acquire load; Acquire
        // pairs with the ticket's Release of PARKED (its thread is in `waiter`).
        self.finish(slot, DONE);
    }

    /// Called by the shard: the record will never have a result here.
    pub(crate) fn abort(&self, slot: u32, generation: u32) {
        if self.slots[slot as usize].generation.load(Ordering::Relaxed) == generation {
            self.finish(slot, ABORTED);
        }
    }

    fn finish(&self, slot: u32, state: u32) {
        let control = &self.slots[slot as usize];
        match control.state.swap(state, Ordering::AcqRel) {
            PENDING => {}
            PARKED => {
                let waiter = control
                    .waiter
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                if let Some(thread) = waiter {
                    thread.unpark();
                }
            }
            ABANDONED => self.release(slot),
            other => debug_assert!(false, "slot {slot} finished twice (state {other})"),
        }
    }

    /// Aborts every handle left in shard `shard`'s ring (after it retired).
    fn sweep(&self, shard: usize) {
        while let Some(handle) = self.lanes[shard].ring.pop() {
            let (slot, generation) = unpack(handle);
            self.abort(slot, generation);
        }
    }

    /// Called by the shard when it stops for good: no handle is taken after this; those
    /// left (and any pushed later) are aborted.
    pub(crate) fn retire(&self, shard: usize) {
        let lane = &self.lanes[shard];
        lane.retired.store(true, Ordering::SeqCst);
        // SeqCst fence: pairs with the producer's fence after its push (see `try_submit`).
        fence(Ordering::SeqCst);
        lane.idle.0.store(false, Ordering::Relaxed);
        // Drop our waker here, on our own thread: glommio wakers must not outlive the task
        // in another thread's hands.
        *lane.waker.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.sweep(shard);
    }

    /// Whether shard `shard` retired its ring.
    pub(crate) fn is_retired(&self, shard: usize) -> bool {
        self.lanes[shard].retired.load(Ordering::Relaxed)
    }

    /// Called by the shard's drain task when its ring is empty: registers the waker and
    /// announces idleness, then resolves when a producer rings (or at once if one pushed in
    /// the meantime). Race it against a timer to look at the stop flag.
    pub(crate) async fn idle(&self, shard: usize) {
        let lane = &self.lanes[shard];
        let mut announced = false;
        std::future::poll_fn(|cx| {
            if announced && !lane.idle.0.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            {
                let mut waker = lane.waker.lock().unwrap_or_else(PoisonError::into_inner);
                match waker.as_ref() {
                    Some(stored) if stored.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
            }
            if !announced {
                announced = true;
                lane.idle.0.store(true, Ordering::SeqCst);
                // SeqCst fence: pairs with the producer's fence in `ring_doorbell`.
                fence(Ordering::SeqCst);
                if !lane.ring.is_empty() {
                    lane.idle.0.store(false, Ordering::Relaxed);
                    return Poll::Ready(());
                }
            }
            if lane.idle.0.load(Ordering::Acquire) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        lane.idle.0.store(false, Ordering::Relaxed);
    }

    /// Handles waiting in shard `shard`'s ring (a snapshot).
    pub(crate) fn pending(&self, shard: usize) -> usize {
        self.lanes[shard].ring.len()
    }
}

/// A handle for application threads to submit records into a node's shards. `Clone`
/// (an `Arc` increment), `Send` and `Sync`; give each thread its own clone so tickets
/// borrow it without shared reference counting per transaction.
pub struct Submitter<S: StateMachine> {
    ingress: Arc<Ingress<S>>,
}

impl<S: StateMachine> Clone for Submitter<S> {
    fn clone(&self) -> Self {
        Self {
            ingress: self.ingress.clone(),
        }
    }
}

impl<S: StateMachine> fmt::Debug for Submitter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submitter")
            .field("ingress", &self.ingress)
            .finish()
    }
}

impl<S: StateMachine> Submitter<S> {
    pub(crate) fn new(ingress: Arc<Ingress<S>>) -> Self {
        Self { ingress }
    }

    /// The node-wide ingest state (for metrics and tests).
    pub fn ingress(&self) -> &Ingress<S> {
        &self.ingress
    }

    /// Submits `record` to the shard that owns it, without waiting. `Full` (record handed
    /// back) if no completion slot is free or that shard's ring is full; `Stopped` once the
    /// node is stopping. Allocates nothing.
    #[inline]
    pub fn submit(
        &self,
        operation: S::Operation,
        record: S::Record,
    ) -> Result<Ticket<'_, S>, SubmitError<S::Record>> {
        let (slot, generation) = self.ingress.try_submit(operation, record)?;
        Ok(self.ticket(slot, generation))
    }

    /// Submits `record`, waiting for room until `deadline`: spins a little, then yields,
    /// then parks until a shard or ticket holder makes room (each park is at most
    /// [`PARK_SLICE_US`]). `Timeout` (record handed back) if there is still no room at the
    /// deadline; `Stopped` once the node is stopping.
    pub fn submit_wait(
        &self,
        operation: S::Operation,
        record: S::Record,
        deadline: Instant,
    ) -> Result<Ticket<'_, S>, SubmitError<S::Record>> {
        let mut record = Some(record);
        let submitted = self.ingress.space.retry(until(deadline), || {
            let taken = record.take().expect("a record per attempt");
            match self.ingress.try_submit(operation, taken) {
                Ok(handle) => Ok(handle),
                Err(SubmitError::Full(back)) => {
                    record = Some(back);
                    Err(false)
                }
                Err(other) => {
                    record = Some(other.into_record());
                    Err(true)
                }
            }
        });
        match submitted {
            Ok((slot, generation)) => Ok(self.ticket(slot, generation)),
            Err(stopped) => {
                let record = record.expect("handed back");
                Err(if stopped {
                    SubmitError::Stopped(record)
                } else {
                    SubmitError::Timeout(record)
                })
            }
        }
    }

    fn ticket(&self, slot: u32, generation: u32) -> Ticket<'_, S> {
        Ticket {
            ingress: &self.ingress,
            slot,
            generation,
            spent: false,
        }
    }
}

/// The claim on one submitted record's result. Dropping it without waiting is allowed: the
/// slot returns to the pool when the result arrives.
pub struct Ticket<'s, S: StateMachine> {
    ingress: &'s Ingress<S>,
    slot: u32,
    generation: u32,
    /// The slot was handed back (result taken or aborted): nothing to do on drop.
    spent: bool,
}

impl<S: StateMachine> fmt::Debug for Ticket<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .finish()
    }
}

impl<'s, S: StateMachine> Ticket<'s, S> {
    fn control(&self) -> &'s Slot {
        &self.ingress.slots[self.slot as usize]
    }

    /// Whether the result (or an abort) has arrived.
    pub fn is_ready(&self) -> bool {
        matches!(self.control().state.load(Ordering::Acquire), DONE | ABORTED)
    }

    /// Takes the result if it has arrived (`Ok`), or says it never will (`Aborted`).
    fn settle(mut self, state: u32) -> Result<S::Result, TicketError<'s, S>> {
        let result = (state == DONE).then(|| load_pod(self.ingress.result_words(self.slot)));
        self.spent = true;
        self.ingress.release(self.slot);
        result.ok_or(TicketError::Aborted)
    }

    /// Waits for the result until `deadline`: spins a little, then yields, then parks until
    /// the shard unparks it. `Timeout` hands the ticket back.
    pub fn wait(self, deadline: Instant) -> Result<S::Result, TicketError<'s, S>> {
        let control = self.control();
        let mut backoff = Backoff::new();
        loop {
            // Acquire: pairs with the shard's Release swap that published the result.
            let state = control.state.load(Ordering::Acquire);
            if matches!(state, DONE | ABORTED) {
                return self.settle(state);
            }
            debug_assert_eq!(state, PENDING);
            if !backoff.is_completed() {
                backoff.snooze();
                continue;
            }
            if Instant::now() >= deadline {
                return Err(TicketError::Timeout(self));
            }
            *control
                .waiter
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(thread::current());
            // Release: our thread handle is in `waiter` before the shard can see PARKED.
            if control
                .state
                .compare_exchange(PENDING, PARKED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            loop {
                let now = Instant::now();
                if now >= deadline || control.state.load(Ordering::Acquire) != PARKED {
                    break;
                }
                thread::park_timeout((deadline - now).min(Duration::from_micros(PARK_SLICE_US)));
            }
            if control
                .state
                .compare_exchange(PARKED, PENDING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Err(TicketError::Timeout(self));
            }
        }
    }
}

impl<S: StateMachine> Drop for Ticket<'_, S> {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        // Abandon: the shard frees the slot when the result arrives; if it already has,
        // free it here.
        let control = self.control();
        if control
            .state
            .compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.ingress.release(self.slot);
        }
    }
}

/// The shard's drain task: moves handles from its ingress ring into its core in bulk while
/// the core has room, wakes the batcher, and parks (announcing it) when the ring is empty.
/// At stop it drains once more, then retires the ring.
pub(crate) async fn drain_loop<S>(shard: std::rc::Rc<crate::runtime::Shard<S>>)
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let ingress = shard.ingest.clone();
    let index = shard.index;
    let poll = Duration::from_millis(crate::runtime::STOP_POLL_MS);
    loop {
        let stopping = shard.stop.load(Ordering::Relaxed);
        let taken = drain_into_core(&shard, &ingress);
        if stopping {
            ingress.retire(index);
            shard.batcher.notify();
            return;
        }
        if taken > 0 {
            shard.batcher.notify();
            // Let the batcher seal what we took before taking more.
            futures_lite::future::yield_now().await;
            continue;
        }
        if ingress.pending(index) > 0 {
            // The core is full (or a producer is still writing the next handle).
            shard.batcher.notify();
            glommio::timer::sleep(Duration::from_micros(DRAIN_BACKPRESSURE_RETRY_US)).await;
            continue;
        }
        futures_lite::future::or(ingress.idle(index), glommio::timer::sleep(poll)).await;
    }
}

/// Moves as many handles as the core has room for (at most [`INGEST_DRAIN_BATCH_MAX`]).
/// A replica that does not lead its group aborts them instead: the records belong to the
/// leader. Returns the count.
fn drain_into_core<S>(shard: &crate::runtime::Shard<S>, ingress: &Ingress<S>) -> usize
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let index = shard.index;
    // BFT mode answers requests matched by client id across replicas; the in-process
    // submitter has none, so its records are refused there.
    let not_leader = shard
        .replication
        .as_ref()
        .is_some_and(|replication| !replication.is_ready_leader());
    if not_leader || shard.bft.is_some() {
        return ingress.drain(index, INGEST_DRAIN_BATCH_MAX, |_, _, slot, generation| {
            ingress.abort(slot, generation);
        });
    }
    let mut core = shard.core.borrow_mut();
    let room = core.client_room().min(INGEST_DRAIN_BATCH_MAX);
    if room == 0 {
        return 0;
    }
    let taken = ingress.drain(index, room, |operation, record, slot, generation| {
        let origin = crate::core::Origin::Ingress { slot, generation };
        if core.submit(operation, record, origin).is_err() {
            debug_assert!(false, "room was checked");
            ingress.abort(slot, generation);
        }
    });
    if taken > 0 {
        shard.quiet[index].store(false, Ordering::Release);
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_round_trips_through_words() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        let value: [u8; 20] = core::array::from_fn(|i| i as u8 + 1);
        store_pod(&words, &value);
        assert_eq!(load_pod::<[u8; 20]>(&words), value);
    }

    #[test]
    fn handles_pack_and_unpack() {
        assert_eq!(unpack(pack(7, u32::MAX)), (7, u32::MAX));
        assert_eq!(unpack(pack(u32::MAX >> 8, 0)), (u32::MAX >> 8, 0));
    }

    #[test]
    fn config_is_validated() {
        let ok = IngestConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let ring = IngestConfig {
            ring_capacity: 100,
            ..ok
        };
        assert_eq!(ring.validate(), Err(IngestConfigError::RingCapacity(100)));
        let slots = IngestConfig { slots: 0, ..ok };
        assert_eq!(slots.validate(), Err(IngestConfigError::Slots(0)));
    }

    #[test]
    fn waiters_wake_a_parked_thread_when_room_is_made() {
        let waiters = Arc::new(Waiters::new());
        let room = Arc::new(AtomicBool::new(false));
        let (w, r) = (waiters.clone(), room.clone());
        let waiter = thread::spawn(move || {
            w.retry(until(Instant::now() + Duration::from_secs(10)), || {
                if r.load(Ordering::Acquire) {
                    Ok(())
                } else {
                    Err(())
                }
            })
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while waiters.parked() == 0 && Instant::now() < deadline {
            thread::yield_now();
        }
        room.store(true, Ordering::Release);
        waiters.notify(1);
        assert_eq!(waiter.join().unwrap(), Ok(()));
    }

    #[test]
    fn retry_gives_up_at_the_deadline() {
        let waiters = Waiters::new();
        let started = Instant::now();
        let result: Result<(), u8> =
            waiters.retry(until(started + Duration::from_millis(20)), || Err(7));
        assert_eq!(result, Err(7));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
