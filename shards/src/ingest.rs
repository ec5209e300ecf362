//! Many application threads submitting into the shards: the embedding API's ingest path.
//!
//! A validator's RPC workers are ordinary threads — not pinned, possibly far more of them
//! than cores. [`Submitter`] (from [`crate::runtime::Node::submitter`]) lets any of them hand
//! one record to the shard that owns it (`S::route`) and wait for its result:
//!
//! * submitting threads are spread over **lanes** ([`IngestConfig::lanes`]; by default
//!   [`lane_count_for`] the machine's cores: one per two cores, at most 8, so one lane on
//!   two cores). A thread keeps its lane for life ([`lane_of_current_thread`]). Every
//!   place a submission writes to is its lane's own: its free list, its ring in each shard
//!   and its waiters. Threads in different lanes never write the same claim index;
//!   on 16 cores one shared index capped a ring at about 3M pushes/s from 16 producers up
//!   (docs/benchmarks.md, "Many threads into one consumer");
//! * every submission takes a **completion slot** from its lane's share of a node-wide
//!   pool allocated at start-up (slot `i` belongs to lane `i % lanes`; its index travels
//!   as the record's handle; each lane's free list is an engine MPMC ring). The slot holds
//!   the record on the way in and the result on the way out, so nothing is allocated per
//!   transaction;
//! * the slot's handle (index and generation, 8 bytes) goes into the owning shard's bounded
//!   **ingress ring** of the thread's lane (an engine [`Mpmc`]); the shard's drain task
//!   moves handles in bulk (`pop_batch`), taking from its lanes in turn
//!   ([`pop_in_turn`]: an even share each, the first lane rotating), into
//!   [`ShardCore::submit`](crate::core::ShardCore::submit) with
//!   [`Origin::Ingress`](crate::core::Origin::Ingress);
//! * when the record's batch is applied the shard writes the result into the slot and flips
//!   its state; a [`Ticket`] holder spinning or yielding sees it at once, a parked one is
//!   unparked (`std::thread::unpark`, the only syscall on the result path, and only for a
//!   thread that parked).
//!
//! **Back-pressure.** [`Submitter::submit`] never waits: no free slot or a full ring is
//! [`SubmitError::Full`] with the record handed back. [`Submitter::submit_wait`] waits until a
//! deadline with a bounded back-off — spin a little, then `yield_now`, then park on a
//! `Condvar` ([`Waiters`]) — and returns [`SubmitError::Timeout`] if the deadline passes.
//! It waits in two steps, each lane with a registry for each: for a free slot (ticket
//! holders returning one to the lane wake these), then, holding its filled slot, for room
//! in the shard's ring of its lane (the shard's drain wakes these), at most
//! `WAKE_PER_NOTIFY_MAX / lanes` per notification. A release never wakes a thread that
//! waits for ring room, nor a drain one that waits for a slot. On the notifiers' fast path
//! (nobody parked) that costs one RMW of a waiter count, never a lock. `Full` is per lane:
//! a thread whose lane has no free slot is refused even if another lane has one (taking it
//! would make the slot's way home cross lanes again).
//!
//! **Batches.** [`Submitter::submit_batch`] submits many records of one operation without
//! waiting, in steps of [`SUBMIT_BATCH_STEP_MAX`]: one pop of the step's slots, one claim
//! and one doorbell per run of consecutive records for one shard. It takes a prefix of the
//! batch and says how long ([`BatchSubmitError`]), so order is kept as with single submits;
//! [`Submitter::submit_batch_wait`] waits for room for a refused record and goes on.
//!
//! **Waking a parked shard.** A shard with nothing to do parks in io_uring. Its drain task
//! announces that it is going idle (a per-shard `idle` flag, after registering its waker);
//! a producer that pushed a handle reads the flag and only when it is set swaps it off and
//! wakes the task (glommio routes a foreign wake through the executor's eventfd). The fast
//! path — shard busy — is a fence and a load, no syscall and no lock.
//!
//! **Order.** One thread's submissions to one shard are applied in the order it made them:
//! the thread always pushes into the same lane's ring, the ring is FIFO by claimed
//! position, its single consumer drains each ring in order, and the core seals in drain
//! order. Submissions to different shards have no order between them.
//!
//! **Shutdown.** After the node's stop flag is set, `submit` answers
//! [`SubmitError::Stopped`]. Each shard drains its rings once more, then retires them; a
//! handle found in a retired ring (pushed while the node stopped) is completed as aborted,
//! so no [`Ticket`] waits for a result that cannot come.
//!
//! This module never allocates after [`Ingress::new`] on the submit, drain and completion
//! paths, never blocks a shard (the shard only pops, stores, pushes freed slots and
//! unparks; the one wait is a push that meets a pop still handing its place back, which
//! spins and yields until that pop finishes: `Lane::free_push`), and holds no lock that a
//! shard takes except on the slow paths named above. It contains no `unsafe`: records
//! and results are `Pod` and cross threads as words of `AtomicU64`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use bytemuck::Pod;
use percore_engine::ring::lanes::{LANES_MAX, lane_count_for, lane_of_current_thread, pop_in_turn};
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
/// Records [`Submitter::submit_batch`] takes per step: one pop of that many slots from the
/// lane's free list, one claim in a shard's ring per run of records for that shard, one
/// doorbell per run. A batch of any length goes through in steps of this size (the step's
/// slots, handles and tickets live on the caller's stack).
pub const SUBMIT_BATCH_STEP_MAX: usize = 64;

const _: () = assert!(INGEST_DRAIN_BATCH_MAX <= INGEST_RING_CAPACITY_DEFAULT);
const _: () = assert!(INGEST_SLOTS_DEFAULT <= INGEST_SLOTS_MAX);
const _: () = assert!(INGEST_SLOTS_MAX <= u32::MAX as usize);

/// Sizes of the ingest path, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestConfig {
    /// Handles each shard's ingress rings hold together (power of two, at least 2 per
    /// lane): each lane's ring in a shard holds `ring_capacity / lanes`, rounded up to a
    /// power of two.
    pub ring_capacity: usize,
    /// Completion slots of the node: submissions in flight at once (1..=`INGEST_SLOTS_MAX`,
    /// at least one per lane), split evenly over the lanes.
    pub slots: usize,
    /// Lanes submitting threads are spread over (1..=`LANES_MAX`). The default is
    /// [`lane_count_for`] the cores this process may run on.
    pub lanes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        Self {
            ring_capacity: INGEST_RING_CAPACITY_DEFAULT,
            slots: INGEST_SLOTS_DEFAULT,
            lanes: lane_count_for(cores),
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
    /// The lane count is zero, above [`LANES_MAX`], or leaves a lane without two ring
    /// places or one slot.
    #[error(
        "ingest lanes {lanes} must be between 1 and {LANES_MAX}, at most slots ({slots}) and ring_capacity / 2 ({ring_capacity} / 2)"
    )]
    Lanes {
        /// The lane count asked for.
        lanes: usize,
        /// The configured slots.
        slots: usize,
        /// The configured ring capacity.
        ring_capacity: usize,
    },
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
        if !(1..=LANES_MAX).contains(&self.lanes)
            || self.lanes > self.slots
            || self.lanes > self.ring_capacity / 2
        {
            return Err(IngestConfigError::Lanes {
                lanes: self.lanes,
                slots: self.slots,
                ring_capacity: self.ring_capacity,
            });
        }
        Ok(())
    }

    /// Capacity of one lane's ring in one shard.
    fn lane_ring_capacity(&self) -> usize {
        mpmc::capacity_for(self.ring_capacity.div_ceil(self.lanes)).max(2)
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

/// Why [`Submitter::submit_batch`] took only the first `accepted` records of a batch. The
/// rest were not submitted (the caller still has them: submit them again, or wait first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchSubmitError {
    /// No completion slot was free, or a shard's ring was full, at record `accepted`.
    #[error("ingest full after {accepted} records of the batch")]
    Full {
        /// Records submitted (the batch's prefix `..accepted`); each got its ticket.
        accepted: usize,
    },
    /// [`Submitter::submit_batch_wait`]: record `accepted` still had no room at the
    /// deadline.
    #[error("ingest still full at the deadline after {accepted} records of the batch")]
    Timeout {
        /// Records submitted before the deadline.
        accepted: usize,
    },
    /// The node is stopping; nothing from record `accepted` on was accepted.
    #[error("the node is stopping ({accepted} records of the batch were submitted before)")]
    Stopped {
        /// Records submitted before the node stopped accepting.
        accepted: usize,
    },
}

impl BatchSubmitError {
    /// Records submitted: the batch's prefix `..accepted`.
    pub fn accepted(self) -> usize {
        match self {
            BatchSubmitError::Full { accepted }
            | BatchSubmitError::Timeout { accepted }
            | BatchSubmitError::Stopped { accepted } => accepted,
        }
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
    /// The ticket holder's thread while it is parked (`PARKED` only; slow path), with the
    /// generation it waits on: a shard that swapped a ticket's state and was preempted
    /// before it took the thread must not, once the slot has passed to another ticket,
    /// take and wake that ticket's thread instead (which would then sleep out a park
    /// slice at its own completion, its handle gone).
    waiter: Mutex<Option<(u32, Thread)>>,
}

/// A cache line of its own, so a flag written by producers does not share a line with
/// the ring counters or another shard's flag.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded<T>(T);

/// One shard's ingress: a ring per lane and its doorbell.
struct ShardIngress {
    /// Lane `l`'s ring: only threads of lane `l` push here.
    rings: Box<[Padded<Mpmc<u64>>]>,
    /// Lane `l`'s producers holding a filled slot, waiting for room in this shard's ring of
    /// lane `l` (woken by this shard's drains). One registry per ring: a drain's wake-ups
    /// go to threads that wait for the room it made, never to a thread waiting for another
    /// shard (with one registry per lane, a drain of shard A woke the oldest sleepers,
    /// threads waiting for a full shard B, while A's waited out their park slice). Apart
    /// from the lane's `slot_waiters`: a release must not wake a thread that waits for ring
    /// room (measured: with one registry, every release of an overloaded node woke a
    /// producer that found the ring still full and parked again, a futex wake per
    /// transaction; `percore-bench threads` fell to 0.1M items/s at 256 producers).
    ring_waiters: Box<[Padded<Waiters>]>,
    /// The lane the next drain starts at (written by the shard's thread only; a fairness
    /// hint, any value is safe). A line of its own: it is stored at every drain, and
    /// producers read `rings` and `retired` at every push (sharing a line with them cost a
    /// miss per push: `percore-bench threads`, docs/benchmarks.md).
    drain_start: Padded<AtomicUsize>,
    /// The drain task announced that it is going idle: the next producer must wake it.
    idle: Padded<AtomicBool>,
    /// The drain task stopped consuming for good: producers clean up after themselves.
    retired: AtomicBool,
    /// The drain task's waker, registered before `idle` is set (slow path only).
    waker: Mutex<Option<Waker>>,
}

/// A lane's free list holds this many times its slots: see [`Lane::free_push`].
const FREE_LIST_SLACK: usize = 2;

/// What the threads of one lane share: their slots' free list and their slot waiters
/// (those waiting for ring room wait per shard: [`ShardIngress::ring_waiters`]).
struct Lane {
    /// Free completion slots of this lane (indices `i` with `i % lanes` = this lane).
    /// Capacity [`FREE_LIST_SLACK`] times the lane's slot count.
    free: Mpmc<u32>,
    /// This lane's producers waiting for a free slot (woken by releases).
    slot_waiters: Waiters,
}

impl Lane {
    /// Returns `slot` to the free list. The list never holds more than the lane's slots,
    /// so a push can only be refused for a moment: the ring place it needs was claimed by
    /// a pop that has not handed it back yet (an MPMC ring's "full"). Then it spins and
    /// yields until that pop finishes. With twice the lane's slots as places, that takes a
    /// pop stalled (preempted) between its claim and its hand-back while twice the lane's
    /// slots are pushed after it. (With one place per slot, the threads benchmark's ingest
    /// side with two producers on 2 vCPUs hit it within seconds, and the release panicked.)
    #[inline]
    fn free_push(&self, slot: u32) {
        // Spins, then yields on every later try (nobody notifies: the pop just finishes).
        let mut backoff = Backoff::new();
        let mut slot = slot;
        while let Err(refused) = self.free.push(slot) {
            slot = refused.0;
            backoff.snooze();
        }
    }
}

impl ShardIngress {
    /// Whether every lane's ring was empty when looked at.
    fn is_empty(&self) -> bool {
        self.rings.iter().all(|ring| ring.0.is_empty())
    }

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
    shards: Box<[ShardIngress]>,
    lanes: Box<[Padded<Lane>]>,
    slots: Box<[Slot]>,
    /// `slots.len() * record_words` words: each slot's record.
    records: Box<[AtomicU64]>,
    /// `slots.len() * result_words` words: each slot's result.
    results: Box<[AtomicU64]>,
    record_words: usize,
    result_words: usize,
    stop: Arc<AtomicBool>,
    _machine: PhantomData<fn() -> S>,
}

impl<S: StateMachine> fmt::Debug for Ingress<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ingress")
            .field("shards", &self.shards.len())
            .field("lanes", &self.lanes.len())
            .field("slots", &self.slots.len())
            .field("slots_free", &self.slots_free())
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
        let lane_count = config.lanes;
        let wake_max = (WAKE_PER_NOTIFY_MAX / lane_count).max(1);
        let shards = (0..shards)
            .map(|_| ShardIngress {
                rings: (0..lane_count)
                    .map(|_| Padded(Mpmc::new(config.lane_ring_capacity())))
                    .collect(),
                ring_waiters: (0..lane_count)
                    .map(|_| Padded(Waiters::with_wake_max(wake_max)))
                    .collect(),
                drain_start: Padded(AtomicUsize::new(0)),
                idle: Padded(AtomicBool::new(false)),
                retired: AtomicBool::new(false),
                waker: Mutex::new(None),
            })
            .collect();
        let lane_slots = config.slots.div_ceil(lane_count);
        let lanes: Box<[Padded<Lane>]> = (0..lane_count)
            .map(|_| {
                Padded(Lane {
                    free: Mpmc::new(mpmc::capacity_for(lane_slots * FREE_LIST_SLACK)),
                    slot_waiters: Waiters::with_wake_max(wake_max),
                })
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
        for index in 0..config.slots as u32 {
            lanes[index as usize % lane_count].0.free_push(index);
        }
        let (record_words, result_words) = (words_of::<S::Record>(), words_of::<S::Result>());
        let words = |per_slot: usize| (0..config.slots * per_slot).map(|_| AtomicU64::new(0));
        Ok(Self {
            shards,
            lanes,
            slots,
            records: words(record_words).collect(),
            results: words(result_words).collect(),
            record_words,
            result_words,
            stop,
            _machine: PhantomData,
        })
    }

    /// Shards fed by this ingress.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Lanes submitting threads are spread over.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Completion slots free now, all lanes together (a snapshot).
    pub fn slots_free(&self) -> usize {
        self.lanes.iter().map(|lane| lane.0.free.len()).sum()
    }

    /// Producers parked waiting for room now, all lanes together (a snapshot).
    pub fn producers_parked(&self) -> usize {
        let slots: usize = self
            .lanes
            .iter()
            .map(|lane| lane.0.slot_waiters.parked())
            .sum();
        let rings: usize = self
            .shards
            .iter()
            .flat_map(|shard| shard.ring_waiters.iter())
            .map(|waiters| waiters.0.parked())
            .sum();
        slots + rings
    }

    /// The calling thread's lane.
    fn lane_of_current_thread(&self) -> usize {
        lane_of_current_thread(self.lanes.len())
    }

    fn record_words(&self, slot: u32) -> &[AtomicU64] {
        let start = slot as usize * self.record_words;
        &self.records[start..start + self.record_words]
    }

    fn result_words(&self, slot: u32) -> &[AtomicU64] {
        let start = slot as usize * self.result_words;
        &self.results[start..start + self.result_words]
    }

    /// Frees a slot whose handle was published: a new generation, so no handle of the
    /// old one matches it again, then [`Ingress::return_slot`].
    fn release(&self, slot: u32) {
        self.slots[slot as usize]
            .generation
            .fetch_add(1, Ordering::Relaxed);
        self.return_slot(slot);
    }

    /// Puts `slot` back on its lane's free list (slot `i` belongs to lane `i % lanes`) and
    /// wakes one of that lane's threads waiting for a slot. Also for a slot taken and
    /// never published ([`Ingress::take_slot`] then a full ring or a timeout): its
    /// generation stays, as no handle of it exists.
    fn return_slot(&self, slot: u32) {
        self.return_slots(slot as usize % self.lanes.len(), &[slot]);
    }

    /// Puts `slots`, all of lane `lane`, back on its free list, as [`Ingress::return_slot`]
    /// says, with one claim where the list takes them at once (see [`Lane::free_push`] for
    /// why it may not), and wakes as many of the lane's threads waiting for a slot.
    fn return_slots(&self, lane: usize, slots: &[u32]) {
        if slots.is_empty() {
            return;
        }
        for &slot in slots {
            debug_assert_eq!(slot as usize % self.lanes.len(), lane);
            self.slots[slot as usize]
                .state
                .store(FREE, Ordering::Relaxed);
        }
        let lane = &self.lanes[lane].0;
        // The free list's Release push orders our stores before the next owner's pop.
        let pushed = lane.free.push_slice(slots);
        for &slot in &slots[pushed..] {
            lane.free_push(slot);
        }
        lane.slot_waiters.notify(slots.len());
    }

    /// A free slot of lane `lane`, if it has one.
    #[inline]
    fn take_slot(&self, lane: usize) -> Option<u32> {
        let slot = self.lanes[lane].0.free.pop()?;
        debug_assert_eq!(
            self.slots[slot as usize].state.load(Ordering::Relaxed),
            FREE
        );
        Some(slot)
    }

    /// Writes `record` into the taken `slot`; returns the slot's generation.
    #[inline]
    fn fill_slot(&self, slot: u32, operation: S::Operation, record: &S::Record) -> u32 {
        let control = &self.slots[slot as usize];
        let generation = control.generation.load(Ordering::Relaxed);
        control
            .operation
            .store(u32::from(operation.into()), Ordering::Relaxed);
        store_pod(self.record_words(slot), record);
        control.state.store(PENDING, Ordering::Relaxed);
        generation
    }

    /// Publishes the filled slot's handle in shard `shard`'s ring of lane `lane`, and
    /// rings the shard's doorbell. `false` if that ring is full.
    #[inline]
    fn push_handle(&self, lane: usize, shard: usize, slot: u32, generation: u32) -> bool {
        let target = &self.shards[shard];
        // The ring's Release publication of the handle orders the slot's stores before
        // the shard's Acquire pop.
        if target.rings[lane].0.push(pack(slot, generation)).is_err() {
            return false;
        }
        self.pushed(shard);
        true
    }

    /// Publishes the filled slots' `handles` in shard `shard`'s ring of lane `lane` with one
    /// claim (the longest prefix there is room for), and rings the shard's doorbell once.
    /// Returns how many it published.
    #[inline]
    fn push_handles(&self, lane: usize, shard: usize, handles: &[u64]) -> usize {
        // As in `push_handle`: the ring's Release publication orders the slots' stores.
        let pushed = self.shards[shard].rings[lane].0.push_slice(handles);
        if pushed > 0 {
            self.pushed(shard);
        }
        pushed
    }

    /// After a push into shard `shard`'s ring: rings its doorbell, and cleans up if the
    /// shard has retired.
    #[inline]
    fn pushed(&self, shard: usize) {
        let target = &self.shards[shard];
        target.ring_doorbell();
        if target.retired.load(Ordering::Relaxed) {
            // The shard stopped consuming (after the fence in `ring_doorbell`, so either it
            // saw our handles or we see this flag): abort what is left, ours included.
            self.sweep(shard);
        }
    }

    /// The shard that owns `record`.
    fn shard_of(&self, operation: S::Operation, record: &S::Record) -> usize {
        S::route(operation, record, self.shards.len() as u32) as usize
    }

    /// Whether the node is stopping.
    fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Non-blocking submit from a thread of lane `lane`; see [`Submitter::submit`].
    fn try_submit(
        &self,
        lane: usize,
        operation: S::Operation,
        record: S::Record,
    ) -> Result<(u32, u32), SubmitError<S::Record>> {
        if self.is_stopping() {
            return Err(SubmitError::Stopped(record));
        }
        let shard = self.shard_of(operation, &record);
        let Some(slot) = self.take_slot(lane) else {
            return Err(SubmitError::Full(record));
        };
        let generation = self.fill_slot(slot, operation, &record);
        if !self.push_handle(lane, shard, slot, generation) {
            self.return_slot(slot);
            return Err(SubmitError::Full(record));
        }
        Ok((slot, generation))
    }

    /// Non-blocking submit of one step of a batch (at most [`SUBMIT_BATCH_STEP_MAX`]
    /// records) from a thread of lane `lane`, in runs of consecutive records for one shard:
    /// per run, as many slots as that shard's ring of the lane looks to have room for, in
    /// one pop from the lane's free list, then the records filled in and published with one
    /// claim and one doorbell. Stops at the first record without a slot or ring room; slots
    /// taken and not published go back. Each published record's `(slot, generation)` goes
    /// to `published`, in order. Returns how many were published: the step's prefix.
    ///
    /// Sizing each pop by the ring's room (a snapshot) keeps a producer that meets a full
    /// ring from taking, filling and handing back a step's worth of slots each time: with
    /// 16 producers on 2 vCPUs, one pop per step made that most of their work.
    fn try_submit_step(
        &self,
        lane: usize,
        operation: S::Operation,
        records: &[S::Record],
        mut published: impl FnMut(u32, u32),
    ) -> usize {
        debug_assert!(records.len() <= SUBMIT_BATCH_STEP_MAX);
        let mut slots = [0u32; SUBMIT_BATCH_STEP_MAX];
        let mut handles = [0u64; SUBMIT_BATCH_STEP_MAX];
        let mut done = 0;
        while done < records.len() {
            let shard = self.shard_of(operation, &records[done]);
            let run = records[done..]
                .iter()
                .position(|record| self.shard_of(operation, record) != shard)
                .unwrap_or(records.len() - done);
            let ring = &self.shards[shard].rings[lane].0;
            let room = ring.capacity() - ring.len();
            let want = run.min(room);
            if want == 0 {
                break;
            }
            let taken = self.lanes[lane].0.free.pop_slice(&mut slots[..want]);
            for (index, &slot) in slots[..taken].iter().enumerate() {
                let generation = self.fill_slot(slot, operation, &records[done + index]);
                handles[index] = pack(slot, generation);
            }
            let pushed = self.push_handles(lane, shard, &handles[..taken]);
            for &handle in &handles[..pushed] {
                let (slot, generation) = unpack(handle);
                published(slot, generation);
            }
            // Filled, never published: no handle of them exists.
            self.return_slots(lane, &slots[pushed..taken]);
            done += pushed;
            if pushed < run {
                break;
            }
        }
        done
    }

    /// Submit from a thread of lane `lane`, waiting until `deadline`: first for a free
    /// slot, then, holding it filled, for room in the shard's ring; see
    /// [`Submitter::submit_wait`].
    fn submit_wait(
        &self,
        lane: usize,
        operation: S::Operation,
        record: S::Record,
        deadline: Instant,
    ) -> Result<(u32, u32), SubmitError<S::Record>> {
        // Set by an attempt that found the node stopping: no more waiting then.
        let stopped = std::cell::Cell::new(false);
        let mut left = until(deadline);
        let mut remaining = || if stopped.get() { None } else { left() };
        let stopping = || {
            let stopping = self.is_stopping();
            stopped.set(stopping);
            stopping
        };
        let refused = |record| {
            if stopped.get() {
                SubmitError::Stopped(record)
            } else {
                SubmitError::Timeout(record)
            }
        };
        if stopping() {
            return Err(SubmitError::Stopped(record));
        }
        let shard = self.shard_of(operation, &record);
        let Ok(slot) = self.lanes[lane].0.slot_waiters.retry(&mut remaining, || {
            if stopping() {
                return Err(());
            }
            self.take_slot(lane).ok_or(())
        }) else {
            return Err(refused(record));
        };
        let generation = self.fill_slot(slot, operation, &record);
        let ring_waiters = &self.shards[shard].ring_waiters[lane].0;
        let pushed = ring_waiters.retry(&mut remaining, || {
            if stopping() {
                return Err(());
            }
            self.push_handle(lane, shard, slot, generation)
                .then_some(())
                .ok_or(())
        });
        if pushed.is_err() {
            self.return_slot(slot);
            return Err(refused(record));
        }
        Ok((slot, generation))
    }

    /// Called by the shard: moves up to `max` handles from its rings into `submit`, lanes
    /// in turn, each lane's in order, and wakes each lane's producers for the room it made
    /// there. `submit` must accept each (the caller checked room). Returns the count.
    ///
    /// Public for a program that consumes an [`Ingress`] without a node (the `threads`
    /// benchmark's ingest side stands in for a shard this way); it must then answer every
    /// handle with [`Ingress::complete`] or [`Ingress::abort`], or its slot never returns.
    pub fn drain(
        &self,
        shard: usize,
        max: usize,
        mut submit: impl FnMut(S::Operation, &S::Record, u32, u32),
    ) -> usize {
        let target = &self.shards[shard];
        let lanes = self.lanes.len();
        let start = target.drain_start.0.load(Ordering::Relaxed);
        if lanes > 1 {
            target
                .drain_start
                .0
                .store((start + 1) % lanes, Ordering::Relaxed);
        }
        pop_in_turn(lanes, start, max, |lane, share| {
            let taken = target.rings[lane].0.pop_batch(share, |handle| {
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
            target.ring_waiters[lane].0.notify(taken);
            taken
        })
    }

    /// Called by the shard: delivers a result to the slot's ticket.
    pub fn complete(&self, slot: u32, generation: u32, result: &S::Result) {
        let control = &self.slots[slot as usize];
        if control.generation.load(Ordering::Relaxed) != generation {
            debug_assert!(false, "a completion slot was freed before its result");
            return;
        }
        store_pod(self.result_words(slot), result);
        // AcqRel: Release publishes the result words to the ticket's Acquire load; Acquire
        // pairs with the ticket's Release of PARKED (its thread is in `waiter`).
        self.finish(slot, generation, DONE);
    }

    /// Called by the shard: the record will never have a result here.
    pub fn abort(&self, slot: u32, generation: u32) {
        if self.slots[slot as usize].generation.load(Ordering::Relaxed) == generation {
            self.finish(slot, generation, ABORTED);
        }
    }

    fn finish(&self, slot: u32, generation: u32, state: u32) {
        let control = &self.slots[slot as usize];
        match control.state.swap(state, Ordering::AcqRel) {
            PENDING => {}
            PARKED => {
                let waiter = {
                    let mut waiter = control
                        .waiter
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    match *waiter {
                        Some((parked, _)) if parked == generation => waiter.take(),
                        // The ticket woke by itself and the slot went on to another.
                        _ => None,
                    }
                };
                if let Some((_, thread)) = waiter {
                    thread.unpark();
                }
            }
            ABANDONED => self.release(slot),
            other => debug_assert!(false, "slot {slot} finished twice (state {other})"),
        }
    }

    /// Aborts every handle left in shard `shard`'s rings (after it retired).
    fn sweep(&self, shard: usize) {
        for ring in &self.shards[shard].rings {
            while let Some(handle) = ring.0.pop() {
                let (slot, generation) = unpack(handle);
                self.abort(slot, generation);
            }
        }
    }

    /// Called by the shard when it stops for good: no handle is taken after this; those
    /// left (and any pushed later) are aborted.
    pub(crate) fn retire(&self, shard: usize) {
        let target = &self.shards[shard];
        target.retired.store(true, Ordering::SeqCst);
        // SeqCst fence: pairs with the producer's fence after its push (`push_handle`).
        fence(Ordering::SeqCst);
        target.idle.0.store(false, Ordering::Relaxed);
        // Drop our waker here, on our own thread: glommio wakers must not outlive the task
        // in another thread's hands.
        *target.waker.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.sweep(shard);
    }

    /// Whether shard `shard` retired its ring.
    pub(crate) fn is_retired(&self, shard: usize) -> bool {
        self.shards[shard].retired.load(Ordering::Relaxed)
    }

    /// Called by the shard's drain task when its ring is empty: registers the waker and
    /// announces idleness, then resolves when a producer rings (or at once if one pushed in
    /// the meantime). Race it against a timer to look at the stop flag.
    pub(crate) async fn idle(&self, shard: usize) {
        let target = &self.shards[shard];
        let mut announced = false;
        std::future::poll_fn(|cx| {
            if announced && !target.idle.0.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            {
                let mut waker = target.waker.lock().unwrap_or_else(PoisonError::into_inner);
                match waker.as_ref() {
                    Some(stored) if stored.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
            }
            if !announced {
                announced = true;
                target.idle.0.store(true, Ordering::SeqCst);
                // SeqCst fence: pairs with the producer's fence in `ring_doorbell`.
                fence(Ordering::SeqCst);
                if !target.is_empty() {
                    target.idle.0.store(false, Ordering::Relaxed);
                    return Poll::Ready(());
                }
            }
            if target.idle.0.load(Ordering::Acquire) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        target.idle.0.store(false, Ordering::Relaxed);
    }

    /// Handles waiting in shard `shard`'s rings (a snapshot).
    pub(crate) fn pending(&self, shard: usize) -> usize {
        self.shards[shard]
            .rings
            .iter()
            .map(|ring| ring.0.len())
            .sum()
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
    /// Submits into `ingress`: a node's ([`crate::runtime::Node::submitter`] is the usual
    /// way), or one that a program drains itself ([`Ingress::drain`]).
    pub fn new(ingress: Arc<Ingress<S>>) -> Self {
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
        let lane = self.ingress.lane_of_current_thread();
        let (slot, generation) = self.ingress.try_submit(lane, operation, record)?;
        Ok(self.ticket(slot, generation))
    }

    /// Submits a batch of records of one operation without waiting, and hands each one's
    /// ticket to `ticket`, in order. `Ok` when every record was submitted; otherwise the
    /// error says how many were (always a prefix of `records`: the first record refused
    /// stops the batch, so a thread's records to one shard keep their order) and why
    /// ([`BatchSubmitError::Full`], [`BatchSubmitError::Stopped`]). Allocates nothing.
    ///
    /// Cheaper per record than [`Submitter::submit`]: records go through in steps of
    /// [`SUBMIT_BATCH_STEP_MAX`], each taking its slots with one pop from the lane's free
    /// list and publishing each run of consecutive records for one shard with one claim
    /// in that shard's ring and one doorbell. To wait for room, use
    /// [`Submitter::submit_batch_wait`].
    ///
    /// If `ticket` panics, the tickets it has not received yet are dropped (their records
    /// stay submitted, their slots come back when the results arrive).
    pub fn submit_batch<'s>(
        &'s self,
        operation: S::Operation,
        records: &[S::Record],
        mut ticket: impl FnMut(Ticket<'s, S>),
    ) -> Result<(), BatchSubmitError> {
        let ingress = &*self.ingress;
        let lane = ingress.lane_of_current_thread();
        let mut accepted = 0;
        for step in records.chunks(SUBMIT_BATCH_STEP_MAX) {
            if ingress.is_stopping() {
                return Err(BatchSubmitError::Stopped { accepted });
            }
            // The step's tickets exist (and would be dropped, abandoning their slots)
            // before any reaches `ticket`, so a panic there leaks no slot.
            let mut tickets: [Option<Ticket<'s, S>>; SUBMIT_BATCH_STEP_MAX] =
                std::array::from_fn(|_| None);
            let mut next = 0;
            let published = ingress.try_submit_step(lane, operation, step, |slot, generation| {
                tickets[next] = Some(self.ticket(slot, generation));
                next += 1;
            });
            for taken in tickets.iter_mut().take(published) {
                ticket(taken.take().expect("a ticket per published record"));
            }
            accepted += published;
            if published < step.len() {
                return Err(BatchSubmitError::Full { accepted });
            }
        }
        Ok(())
    }

    /// [`Submitter::submit_batch`], waiting for room until `deadline`: a record refused for
    /// want of room goes through [`Submitter::submit_wait`] (spin, yield, park), then the
    /// batch goes on from the next. `Ok` when every record was submitted, each ticket handed
    /// to `ticket` in order; otherwise how many were (a prefix) and why:
    /// [`BatchSubmitError::Timeout`] at the deadline, [`BatchSubmitError::Stopped`] once the
    /// node is stopping (at once, not at the deadline).
    pub fn submit_batch_wait<'s>(
        &'s self,
        operation: S::Operation,
        records: &[S::Record],
        deadline: Instant,
        mut ticket: impl FnMut(Ticket<'s, S>),
    ) -> Result<(), BatchSubmitError> {
        let mut accepted = 0;
        let mut rest = records;
        loop {
            let taken = match self.submit_batch(operation, rest, &mut ticket) {
                Ok(()) => return Ok(()),
                Err(BatchSubmitError::Full { accepted: taken }) => taken,
                Err(BatchSubmitError::Stopped { accepted: taken }) => {
                    return Err(BatchSubmitError::Stopped {
                        accepted: accepted + taken,
                    });
                }
                Err(BatchSubmitError::Timeout { .. }) => unreachable!("submit_batch never waits"),
            };
            accepted += taken;
            rest = &rest[taken..];
            match self.submit_wait(operation, rest[0], deadline) {
                Ok(waited) => ticket(waited),
                Err(SubmitError::Stopped(_)) => return Err(BatchSubmitError::Stopped { accepted }),
                Err(SubmitError::Timeout(_) | SubmitError::Full(_)) => {
                    return Err(BatchSubmitError::Timeout { accepted });
                }
            }
            accepted += 1;
            rest = &rest[1..];
            if rest.is_empty() {
                return Ok(());
            }
        }
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
        let lane = self.ingress.lane_of_current_thread();
        let (slot, generation) = self
            .ingress
            .submit_wait(lane, operation, record, deadline)?;
        Ok(self.ticket(slot, generation))
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
                .unwrap_or_else(PoisonError::into_inner) =
                Some((self.generation, thread::current()));
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
    use percore_engine::ledger::{Ledger, LedgerOperation};
    use percore_engine::record::RecordSlot;

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
        for (lanes, slots, ring_capacity) in [
            (0, 64, 64),
            (LANES_MAX + 1, 4_096, 4_096),
            (5, 4, 64),
            (3, 64, 4),
        ] {
            let config = IngestConfig {
                ring_capacity,
                slots,
                lanes,
            };
            assert_eq!(
                config.validate(),
                Err(IngestConfigError::Lanes {
                    lanes,
                    slots,
                    ring_capacity
                })
            );
        }
        let odd = IngestConfig {
            ring_capacity: 64,
            slots: 10,
            lanes: 3,
        };
        assert_eq!(odd.validate(), Ok(()));
        assert_eq!(odd.lane_ring_capacity(), 32);
    }

    fn ingress(ring_capacity: usize, slots: usize, lanes: usize) -> Ingress<Ledger> {
        let config = IngestConfig {
            ring_capacity,
            slots,
            lanes,
        };
        Ingress::new(config, 1, Arc::new(AtomicBool::new(false))).expect("valid config")
    }

    fn ingress_of_shards(
        shards: usize,
        ring_capacity: usize,
        slots: usize,
    ) -> Arc<Ingress<Ledger>> {
        let config = IngestConfig {
            ring_capacity,
            slots,
            lanes: 1,
        };
        Arc::new(Ingress::new(config, shards, Arc::new(AtomicBool::new(false))).expect("valid"))
    }

    /// A transfer whose debit account (so its shard, of `shards`) is `debit`.
    fn transfer_record(id: u128, debit: u128) -> RecordSlot {
        RecordSlot::from_transfer(&crate::loadgen::transfer(id, debit, debit + 1, 1))
    }

    /// Transfer ids drained from shard `shard`, in drain order; each handle aborted.
    fn drain_ids(ingress: &Ingress<Ledger>, shard: usize) -> Vec<u128> {
        let mut ids = Vec::new();
        while ingress.drain(shard, 16, |_, record, slot, generation| {
            ids.push(record.as_transfer().id);
            ingress.abort(slot, generation);
        }) > 0
        {}
        ids
    }

    /// A batch longer than a step goes through whole and in order, every record with its
    /// ticket; a batch that meets a full ring is taken as a prefix, no slot held for the
    /// rest.
    #[test]
    fn a_batch_is_taken_whole_or_as_a_prefix_in_order() {
        let ingress = ingress_of_shards(1, 256, 256);
        let submitter = Submitter::new(ingress.clone());
        let records: Vec<RecordSlot> = (0..150).map(|id| transfer_record(id, 1)).collect();
        let mut tickets = Vec::new();
        submitter
            .submit_batch(LedgerOperation::CreateTransfers, &records, |ticket| {
                tickets.push(ticket);
            })
            .expect("room for the whole batch");
        assert_eq!(tickets.len(), 150);
        assert_eq!(drain_ids(&ingress, 0), (0..150).collect::<Vec<_>>());
        for ticket in tickets.drain(..) {
            assert!(matches!(
                ticket.wait(Instant::now()),
                Err(TicketError::Aborted)
            ));
        }
        assert_eq!(ingress.slots_free(), 256);

        let small = ingress_of_shards(1, 8, 64);
        let submitter = Submitter::new(small.clone());
        let mut tickets = Vec::new();
        let refused =
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records[..20], |ticket| {
                tickets.push(ticket)
            });
        assert_eq!(refused, Err(BatchSubmitError::Full { accepted: 8 }));
        assert_eq!(refused.unwrap_err().accepted(), 8);
        assert_eq!(tickets.len(), 8, "a ticket per record taken, no more");
        assert_eq!(
            small.slots_free(),
            56,
            "no slot held for the refused records"
        );
        assert_eq!(drain_ids(&small, 0), (0..8).collect::<Vec<_>>());
        tickets.clear();
        assert_eq!(small.slots_free(), 64);
    }

    /// Records for different shards go to their own rings, each shard's in batch order; a
    /// full ring stops the batch at that record even where later records would fit.
    #[test]
    fn a_batch_over_shards_stops_at_the_first_refused_record() {
        let ingress = ingress_of_shards(2, 4, 64);
        let submitter = Submitter::new(ingress.clone());
        let debit_of = |shard: u32| {
            (1u128..)
                .find(|&debit| percore_engine::record::shard_of(debit, 2) == shard)
                .expect("an account of each shard")
        };
        let (debit0, debit1) = (debit_of(0), debit_of(1));
        // Shard 0, 0, 1, 1, 1, 1, 1 (ring of four: refused), 0.
        let shards = [0, 0, 1, 1, 1, 1, 1, 0];
        let records: Vec<RecordSlot> = shards
            .iter()
            .enumerate()
            .map(|(id, &shard)| transfer_record(id as u128, [debit0, debit1][shard]))
            .collect();
        let mut count = 0;
        let refused =
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records, |_| count += 1);
        assert_eq!(refused, Err(BatchSubmitError::Full { accepted: 6 }));
        assert_eq!(count, 6);
        assert_eq!(drain_ids(&ingress, 0), [0, 1], "record 7 was not submitted");
        assert_eq!(drain_ids(&ingress, 1), [2, 3, 4, 5]);
        assert_eq!(ingress.slots_free(), 64, "dropped tickets, aborted handles");
    }

    /// No free slot is `Full` at record 0; a stopping node is `Stopped`; a panicking
    /// ticket callback loses no slot.
    #[test]
    fn a_batch_is_refused_cleanly() {
        let ingress = ingress_of_shards(1, 64, 2);
        let submitter = Submitter::new(ingress.clone());
        let records: Vec<RecordSlot> = (0..4).map(|id| transfer_record(id, 1)).collect();
        let mut held = Vec::new();
        assert_eq!(
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records, |ticket| {
                held.push(ticket);
            }),
            Err(BatchSubmitError::Full { accepted: 2 }),
            "two slots"
        );
        assert_eq!(
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records, |_| {}),
            Err(BatchSubmitError::Full { accepted: 0 })
        );
        drain_ids(&ingress, 0);
        held.clear();
        assert_eq!(ingress.slots_free(), 2);

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records[..2], |_| {
                panic!("the caller's callback fails")
            })
        }));
        assert!(panicked.is_err());
        assert_eq!(drain_ids(&ingress, 0), [0, 1], "both stayed submitted");
        assert_eq!(
            ingress.slots_free(),
            2,
            "both slots back with their results"
        );

        ingress.stop.store(true, Ordering::Relaxed);
        assert_eq!(
            submitter.submit_batch(LedgerOperation::CreateTransfers, &records, |_| {}),
            Err(BatchSubmitError::Stopped { accepted: 0 })
        );
    }

    /// Waiting for room: the records the ring has room for go in, the next waits until the
    /// deadline (`Timeout`, how many went in); a stopping node answers at once.
    #[test]
    fn a_waiting_batch_times_out_or_stops_with_its_count() {
        let ingress = ingress_of_shards(1, 4, 64);
        let submitter = Submitter::new(ingress.clone());
        let records: Vec<RecordSlot> = (0..6).map(|id| transfer_record(id, 1)).collect();
        let mut tickets = Vec::new();
        let asked = Instant::now();
        let deadline = asked + Duration::from_millis(30);
        assert_eq!(
            submitter.submit_batch_wait(
                LedgerOperation::CreateTransfers,
                &records,
                deadline,
                |ticket| tickets.push(ticket)
            ),
            Err(BatchSubmitError::Timeout { accepted: 4 })
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(30),
            "waited for room"
        );
        assert_eq!(tickets.len(), 4);
        assert_eq!(
            ingress.slots_free(),
            60,
            "the waiting record's slot went back"
        );
        // A drain makes room: the rest goes in, in order.
        let drainer = {
            let ingress = ingress.clone();
            thread::spawn(move || {
                let mut ids = Vec::new();
                while ids.len() < 6 {
                    ingress.drain(0, 2, |_, record, slot, generation| {
                        ids.push(record.as_transfer().id);
                        ingress.abort(slot, generation);
                    });
                    thread::yield_now();
                }
                ids
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        submitter
            .submit_batch_wait(
                LedgerOperation::CreateTransfers,
                &records[4..],
                deadline,
                |ticket| tickets.push(ticket),
            )
            .expect("room made by the drain");
        assert_eq!(drainer.join().unwrap(), [0, 1, 2, 3, 4, 5]);
        tickets.clear();
        assert_eq!(ingress.slots_free(), 64);

        ingress.stop.store(true, Ordering::Relaxed);
        let asked = Instant::now();
        assert_eq!(
            submitter.submit_batch_wait(
                LedgerOperation::CreateTransfers,
                &records,
                asked + Duration::from_secs(30),
                |_| {}
            ),
            Err(BatchSubmitError::Stopped { accepted: 0 })
        );
        assert!(asked.elapsed() < Duration::from_secs(15), "refused at once");
    }

    /// Slots a batch took and could not publish (a ring's room was less than it looked)
    /// go back to their lane in one push, as they were: no new generation.
    #[test]
    fn unpublished_slots_go_back_to_their_lane() {
        let ingress = ingress(64, 8, 2);
        let taken: Vec<u32> = (0..3).map(|_| ingress.take_slot(1).unwrap()).collect();
        assert_eq!(taken, [1, 3, 5]);
        let record = transfer_record(1, 1);
        let generations: Vec<u32> = taken
            .iter()
            .map(|&slot| ingress.fill_slot(slot, LedgerOperation::CreateTransfers, &record))
            .collect();
        assert_eq!(ingress.lanes[1].0.free.len(), 1);
        ingress.return_slots(1, &taken);
        assert_eq!(ingress.lanes[1].0.free.len(), 4);
        assert_eq!(ingress.lanes[0].0.free.len(), 4, "lane 0 untouched");
        for (&slot, &generation) in taken.iter().zip(&generations) {
            let control = &ingress.slots[slot as usize];
            assert_eq!(control.state.load(Ordering::Relaxed), FREE);
            assert_eq!(control.generation.load(Ordering::Relaxed), generation);
        }
    }

    /// Producers submitting batches of varied lengths into a small ring while a drain
    /// takes them: they race for the ring's room (a producer's snapshot of it is often
    /// stale, so pushes fall short and slots go back), wait for a refused record, and go
    /// on. Every record arrives once, each producer's in order, and every slot comes back.
    #[test]
    fn batches_race_for_a_small_ring_and_every_slot_comes_back() {
        const PRODUCERS: u128 = 4;
        const RECORDS: u128 = if cfg!(debug_assertions) {
            3_000
        } else {
            30_000
        };
        let ingress = ingress_of_shards(1, 16, 64);
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|producer| {
                let ingress = ingress.clone();
                thread::spawn(move || {
                    let submitter = Submitter::new(ingress);
                    let records: Vec<RecordSlot> = (0..RECORDS)
                        .map(|seq| transfer_record((producer << 64) | seq, 1))
                        .collect();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let operation = LedgerOperation::CreateTransfers;
                    let mut rest = &records[..];
                    let mut length = 1;
                    while !rest.is_empty() {
                        length = length % 97 + 3;
                        let batch = &rest[..length.min(rest.len())];
                        submitter
                            .submit_batch_wait(operation, batch, deadline, drop)
                            .expect("room before the deadline");
                        rest = &rest[batch.len()..];
                    }
                })
            })
            .collect();
        let mut next = [0u128; PRODUCERS as usize];
        let mut received = 0;
        while received < PRODUCERS * RECORDS {
            received += ingress.drain(0, 8, |_, record, slot, generation| {
                let id = record.as_transfer().id;
                let (producer, seq) = ((id >> 64) as usize, id & u128::from(u64::MAX));
                assert_eq!(
                    seq, next[producer],
                    "producer {producer} in order, once each"
                );
                next[producer] += 1;
                ingress.abort(slot, generation);
            }) as u128;
        }
        for producer in producers {
            producer.join().expect("a producer finished");
        }
        assert!(next.iter().all(|&count| count == RECORDS));
        assert_eq!(ingress.slots_free(), 64, "every slot back");
        assert_eq!(ingress.pending(0), 0);
    }

    fn submit(ingress: &Ingress<Ledger>, lane: usize, id: u128) -> Result<(u32, u32), ()> {
        let record = RecordSlot::from_transfer(&crate::loadgen::transfer(id, 1, 2, 1));
        ingress
            .try_submit(lane, LedgerOperation::CreateTransfers, record)
            .map_err(|_| ())
    }

    /// Lane `l` owns slots `i % lanes == l`: a lane out of slots is `Full` while the
    /// other still submits, and a released slot goes back to its own lane.
    #[test]
    fn each_lane_has_its_own_slots() {
        let ingress = ingress(64, 4, 2);
        let first = submit(&ingress, 0, 1).expect("lane 0 has slot 0");
        let second = submit(&ingress, 0, 2).expect("lane 0 has slot 2");
        assert_eq!((first.0, second.0), (0, 2));
        assert_eq!(submit(&ingress, 0, 3), Err(()), "lane 0 is out of slots");
        assert_eq!(submit(&ingress, 1, 4).map(|(slot, _)| slot), Ok(1));
        assert_eq!(ingress.slots_free(), 1);
        let mut drained = Vec::new();
        assert_eq!(
            ingress.drain(0, 16, |_, record, slot, _| drained
                .push((slot, record.as_transfer().id))),
            3
        );
        // Each lane's handles in the order its thread pushed them.
        let lane0: Vec<_> = drained.iter().filter(|(slot, _)| slot % 2 == 0).collect();
        assert_eq!(lane0, [&(0, 1), &(2, 2)]);
        ingress.release(2);
        assert_eq!(ingress.lanes[0].0.free.len(), 1);
        assert_eq!(ingress.lanes[1].0.free.len(), 1);
        let again = submit(&ingress, 0, 5).expect("slot 2 is lane 0's again");
        assert_eq!(again, (2, 1), "a new generation of slot 2");
    }

    /// Producers that submit and drop their tickets while a drain aborts them: slots cycle
    /// through the free lists as fast as they can, each list's pops racing its pushes.
    /// Every slot comes back and no release is refused. A pop preempted between claiming
    /// its place and handing it back leaves that place "full" to a push a lap later; with
    /// one place per slot and no retry, a release then panicked (this test, and the
    /// threads benchmark within seconds).
    #[test]
    fn slots_come_back_while_pops_race_releases() {
        const PRODUCERS: usize = 8;
        const SUBMISSIONS: usize = if cfg!(debug_assertions) {
            20_000
        } else {
            200_000
        };
        for lanes in [1, 2] {
            // Two slots per lane: a lap of a free list is a couple of pushes.
            let ingress = Arc::new(ingress(64, 2 * lanes, lanes));
            let producers: Vec<_> = (0..PRODUCERS)
                .map(|_| {
                    let ingress = ingress.clone();
                    thread::spawn(move || {
                        let submitter = Submitter::new(ingress);
                        let transfer = crate::loadgen::transfer(1, 1, 2, 1);
                        let record = RecordSlot::from_transfer(&transfer);
                        let deadline = Instant::now() + Duration::from_secs(60);
                        for _ in 0..SUBMISSIONS {
                            let ticket = submitter
                                .submit_wait(LedgerOperation::CreateTransfers, record, deadline)
                                .expect("room before the deadline");
                            drop(ticket);
                        }
                    })
                })
                .collect();
            let mut drained = 0;
            while drained < PRODUCERS * SUBMISSIONS {
                drained += ingress.drain(0, 8, |_, _, slot, generation| {
                    ingress.abort(slot, generation);
                });
            }
            for producer in producers {
                producer.join().expect("a producer finished");
            }
            assert_eq!(
                ingress.slots_free(),
                2 * lanes,
                "every slot back, {lanes} lane(s)"
            );
        }
    }

    /// Each lane has its own ring in a shard: one lane's full ring refuses only that lane.
    /// The drain takes the lanes in turn, starting at the next lane each call.
    #[test]
    fn each_lane_has_its_own_ring_and_the_drain_takes_turns() {
        let ingress = ingress(4, 16, 2);
        for id in 0..2 {
            submit(&ingress, 0, id).expect("room in lane 0's ring");
        }
        assert_eq!(submit(&ingress, 0, 9), Err(()), "lane 0's ring holds two");
        assert_eq!(ingress.slots_free(), 14, "the refused slot went back");
        submit(&ingress, 1, 100).expect("lane 1's ring is empty");
        submit(&ingress, 1, 101).expect("lane 1's ring has room");
        assert_eq!(ingress.pending(0), 4);
        let mut ids = Vec::new();
        let mut take =
            |max| ingress.drain(0, max, |_, record, _, _| ids.push(record.as_transfer().id));
        assert_eq!(take(2), 2);
        assert_eq!(take(2), 2);
        assert_eq!(
            ids,
            [0, 100, 101, 1],
            "one from each lane, then from lane 1 first"
        );
        assert_eq!(ingress.pending(0), 0);
    }

    /// A drain of shard A wakes the producer waiting for room in A's ring, not the older
    /// sleeper waiting for B's (still full): A's producer returns right away, not after its
    /// park slice. The median of many rounds, so that one slow wake-up on a busy host
    /// does not decide it; with the sleepers of both rings in one registry the median is
    /// about half a slice.
    #[test]
    fn a_drain_wakes_a_producer_waiting_for_that_shard() {
        const ROUNDS: usize = 21;
        let debit_of = |shard: u32| {
            (1u128..)
                .find(|&debit| percore_engine::record::shard_of(debit, 2) == shard)
                .expect("an account of each shard")
        };
        let (debit_a, debit_b) = (debit_of(0), debit_of(1));
        let mut woken_us = Vec::new();
        for round in 0..ROUNDS as u128 {
            // Both shards' rings filled.
            let ingress = ingress_of_shards(2, 2, 16);
            let submitter = Submitter::new(ingress.clone());
            let id = |k: u128| round * 16 + k;
            let mut kept = Vec::new();
            let mut full = [Vec::new(), Vec::new()];
            for (shard, debit) in [debit_a, debit_b].into_iter().enumerate() {
                for k in 0.. {
                    let record_id = id(8 * shard as u128 + k);
                    match submitter.submit(
                        LedgerOperation::CreateTransfers,
                        transfer_record(record_id, debit),
                    ) {
                        Ok(ticket) => {
                            kept.push(ticket);
                            full[shard].push(record_id);
                        }
                        Err(_) => break,
                    }
                }
            }
            let waiting = |id: u128, debit: u128, parked_before: usize| {
                let shared = ingress.clone();
                let handle = thread::spawn(move || {
                    let submitter = Submitter::new(shared);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let ticket = submitter.submit_wait(
                        LedgerOperation::CreateTransfers,
                        transfer_record(id, debit),
                        deadline,
                    );
                    let returned = Instant::now();
                    drop(ticket);
                    returned
                });
                let deadline = Instant::now() + Duration::from_secs(10);
                while ingress.producers_parked() <= parked_before {
                    assert!(Instant::now() < deadline, "the producer never parked");
                    thread::yield_now();
                }
                handle
            };
            // B's producer sleeps first (the oldest sleeper), then A's.
            let for_b = waiting(id(15), debit_b, 0);
            let for_a = waiting(id(7), debit_a, 1);
            let drained = Instant::now();
            // One place made: one wake-up.
            let taken = ingress.drain(0, 1, |_, record, slot, generation| {
                assert_eq!(record.as_transfer().id, full[0][0]);
                ingress.abort(slot, generation);
            });
            assert_eq!(taken, 1);
            let returned = for_a.join().unwrap();
            assert!(drain_ids(&ingress, 0).starts_with(&full[0][1..]));
            woken_us.push(returned.saturating_duration_since(drained).as_micros() as u64);
            assert!(drain_ids(&ingress, 1).starts_with(&full[1]));
            for_b.join().unwrap();
            drop(kept);
        }
        woken_us.sort_unstable();
        let median_us = woken_us[ROUNDS / 2];
        assert!(
            median_us < PARK_SLICE_US / 4,
            "A's producer returned {median_us} µs after the drain at the median: {woken_us:?}"
        );
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
