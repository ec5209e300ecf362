//! The sans-IO heart of one shard: ingest, batching, sealing and applying.
//!
//! `ShardCore` owns the shard's pools, its transaction ring, its batch controller and its
//! state machine. It performs no I/O, reads no clock (time is passed in) and never
//! allocates after [`ShardCore::new`]: the allocation-counting test drives it in steady state.
//! The glommio runtime (`runtime`) feeds it records from sockets and the ring mesh and
//! delivers its completions.
//!
//! Path of one record:
//! 1. [`ShardCore::submit`] copies the record into a pooled transaction slot and pushes an
//!    8-byte slot handle plus its operation into the transaction ring. A full pool or ring is
//!    a typed [`Backpressure`], never an allocation.
//! 2. [`ShardCore::poll_seal`] pops handles in bulk, asks the adaptive [`BatchController`]
//!    whether to seal, and on sealing gathers the records into one contiguous pooled batch
//!    buffer (releasing the transaction slots), assigns the next op number and calls the state
//!    machine's `prepare`. The sealed batch is now ready to be journaled and replicated.
//! 3. [`ShardCore::apply_next`] applies the oldest sealed batch and hands each record's
//!    result to the caller together with the record's origin.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use percore_engine::batch::{BatchController, BatchLimits, BatchLimitsError, SealReason};
use percore_engine::journal::request_descriptors;
use percore_engine::pool::{Handle, Pool, PoolError, PoolStats, TX_SLOT_BYTES, TxSlot};
use percore_engine::ring::spsc;
use percore_engine::session::{
    REQUEST_DESCRIPTOR_BYTES, RequestDescriptor, SessionStats, descriptors_valid,
};
use percore_engine::state_machine::{Outbound, RestoreError, StateMachine};

use crate::metrics::ShardMetrics;

/// Where a record came from, so its result can find its way back. 16 bytes, `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client connection on this shard: connection slot, its generation, and the
    /// record's index in the request.
    Local {
        /// Connection slot.
        connection: u16,
        /// Generation of the slot (a reused slot does not receive old results).
        generation: u16,
        /// Record index within the request frame.
        index: u32,
    },
    /// A record forwarded by another shard: the result goes back over the mesh.
    Forwarded {
        /// The shard that forwarded it.
        shard: u16,
        /// Opaque token of the forwarding shard (its own local origin, packed).
        token: u64,
    },
    /// Internal traffic between state machines (e.g. credit legs): no one waits for it.
    Internal,
    /// A record from an application thread ([`crate::ingest`]): the result goes to its
    /// completion slot.
    Ingress {
        /// Completion slot index.
        slot: u32,
        /// Generation of the slot (checked when completing).
        generation: u32,
    },
}

impl Origin {
    /// Packs a local origin into a token that travels to another shard and back.
    pub fn pack_local(connection: u16, generation: u16, index: u32) -> u64 {
        (u64::from(connection) << 48) | (u64::from(generation) << 32) | u64::from(index)
    }

    /// The inverse of [`Origin::pack_local`].
    pub fn unpack_local(token: u64) -> Origin {
        Origin::Local {
            connection: (token >> 48) as u16,
            generation: (token >> 32) as u16,
            index: token as u32,
        }
    }
}

/// What the transaction ring carries: a pooled slot and the batch operation it belongs to.
#[derive(Debug, Clone, Copy)]
struct TxRef {
    slot: Handle,
    operation: u16,
}

/// A record could not be taken now; the caller keeps it and retries later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Backpressure {
    /// Every transaction slot is in flight.
    #[error("transaction pool exhausted ({capacity} slots in flight)")]
    PoolExhausted {
        /// Pool capacity.
        capacity: usize,
    },
    /// The transaction ring is full.
    #[error("transaction ring full ({capacity} entries)")]
    RingFull {
        /// Ring capacity.
        capacity: usize,
    },
}

/// Why committed batch bytes are not a batch this core may apply (BFT mode: a Byzantine
/// leader can get anything committed, so every correct replica checks the bytes the same
/// way and skips a batch that fails, deterministically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BatchInvalid {
    /// The operation is not a client operation of this state machine.
    #[error("operation {0} is not a client operation")]
    Operation(u16),
    /// The record bytes are not a whole number of records, none, or more than a batch.
    #[error("{0} record bytes are not 1..=cap whole records")]
    RecordBytes(usize),
    /// The request descriptors are malformed, too many, or do not fit the records.
    #[error("request descriptors do not describe the records")]
    Descriptors,
    /// A record belongs to another shard.
    #[error("record {0} belongs to another shard")]
    ForeignRecord(usize),
    /// An internal operation (one clients may not submit, e.g. the ledger's credit legs)
    /// outside a proven batch: only another group's certificate may carry internal records
    /// into a BFT group (`docs/bft.md` §14), so a client batch holding them is refused.
    #[error("operation {0} is internal: only a proven batch may carry it")]
    InternalUnproven(u16),
    /// A proven batch whose operation is not an internal one: certified outputs of
    /// another group are never client requests.
    #[error("operation {0} of a proven batch is not an internal operation")]
    NotInternal(u16),
}

/// Configuration errors of a shard core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Batch limits are inconsistent.
    #[error(transparent)]
    Batch(#[from] BatchLimitsError),
    /// A pool could not be built.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The ring capacity is not a power of two, or is smaller than one batch.
    #[error(
        "tx_ring_capacity {capacity} must be a power of two >= batch_entries_max {entries_max}"
    )]
    RingCapacity {
        /// Configured capacity.
        capacity: usize,
        /// Configured batch cap.
        entries_max: usize,
    },
    /// The state machine's record does not fit a transaction slot.
    #[error("state machine record is {bytes} bytes; a transaction slot holds {TX_SLOT_BYTES}")]
    RecordSize {
        /// Size of the record type.
        bytes: usize,
    },
}

/// Sizes of one shard core, all fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreConfig {
    /// Shard index and count.
    pub shard: u32,
    /// Shards in the node.
    pub shard_count: u32,
    /// Transaction slots (records accepted, not yet sealed).
    pub transactions: usize,
    /// Batch buffers (sealed, not yet applied; one is also the open batch).
    pub batches: usize,
    /// Transaction ring capacity (power of two).
    pub tx_ring_capacity: usize,
    /// Batch sealing limits.
    pub batch: BatchLimits,
}

/// One sealed (or open) batch: records gathered contiguously plus each record's origin.
/// Pages are allocated zeroed, so an unused buffer costs address space, not memory.
struct BatchBuffer {
    op: u64,
    operation: u16,
    len: usize,
    records: Box<[TxSlot]>,
    origins: Box<[Origin]>,
    /// Client requests among the records (each whole, in record order).
    requests: Box<[RequestDescriptor]>,
    request_count: usize,
}

impl fmt::Debug for BatchBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchBuffer")
            .field("op", &self.op)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// A sealed batch, ready for the journal and replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// Op number assigned at sealing.
    pub op: u64,
    /// Records in the batch.
    pub entries: usize,
    /// Why it was sealed.
    pub reason: SealReason,
}

/// A sealed batch as the journal writes it: [`ShardCore::sealed_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SealedBatch<'a> {
    /// Its op.
    pub op: u64,
    /// The operation code of every record.
    pub operation: u16,
    /// The records' bytes.
    pub records: &'a [u8],
    /// The request descriptors' bytes.
    pub requests: &'a [u8],
}

/// The sans-IO core of one shard. See the module docs.
pub struct ShardCore<S: StateMachine> {
    config: CoreConfig,
    state_machine: S,
    transactions: Pool<TxSlot>,
    batches: Pool<BatchBuffer>,
    ring_producer: spsc::Producer<TxRef>,
    ring_consumer: spsc::Consumer<TxRef>,
    controller: BatchController,
    /// The batch being filled, if any, and when its oldest record arrived.
    open: Option<(Handle, u64)>,
    /// Origin of each record in the transaction pool, indexed by slot.
    tx_origins: Box<[Origin]>,
    /// The request a record starts, indexed by slot (`record_count == 0`: none).
    tx_requests: Box<[RequestDescriptor]>,
    /// Sealed batches waiting to be applied, oldest first (capacity = batch pool).
    sealed: VecDeque<Handle>,
    /// Results of the batch being applied (capacity = entries cap).
    results: Box<[S::Result]>,
    /// Aligned records of an op applied straight from the journal (capacity = entries
    /// cap): it must not wait for a batch buffer, which queued later ops may all hold.
    journal_records: Box<[TxSlot]>,
    /// Request descriptors of such an op.
    journal_requests: Box<[RequestDescriptor]>,
    op_sealed: u64,
    op_last: u64,
    /// Transaction slots kept for mesh traffic (see `submit`).
    mesh_reserve: usize,
    /// Added to `now_us × 1,000` for the `now_ns` that `prepare` stamps records from
    /// ([`ShardCore::timestamp_ns`]); 0 unless the runtime sets it.
    clock_offset_ns: u64,
    metrics: Arc<ShardMetrics>,
    /// Session counters already added to the metrics ([`ShardCore::publish_pool_metrics`]).
    session_seen: Cell<SessionStats>,
}

impl<S: StateMachine> fmt::Debug for ShardCore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCore")
            .field("config", &self.config)
            .field("op_last", &self.op_last)
            .field("sealed", &self.sealed.len())
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> ShardCore<S> {
    /// Builds a core; every buffer it will ever use is allocated here.
    pub fn new(
        config: CoreConfig,
        state_machine: S,
        metrics: Arc<ShardMetrics>,
    ) -> Result<Self, CoreError> {
        let record_bytes = size_of::<S::Record>();
        if record_bytes != TX_SLOT_BYTES || align_of::<S::Record>() > align_of::<TxSlot>() {
            return Err(CoreError::RecordSize {
                bytes: record_bytes,
            });
        }
        let controller = BatchController::new(config.batch, record_bytes)?;
        let entries_cap = controller.entries_cap();
        if !config.tx_ring_capacity.is_power_of_two() || config.tx_ring_capacity < entries_cap {
            return Err(CoreError::RingCapacity {
                capacity: config.tx_ring_capacity,
                entries_max: entries_cap,
            });
        }
        let transactions = Pool::new("transactions", config.transactions, |_| TxSlot::ZEROED)?;
        let batches = Pool::new("batches", config.batches, |_| BatchBuffer {
            op: 0,
            operation: 0,
            len: 0,
            records: bytemuck::allocation::zeroed_slice_box(entries_cap),
            origins: vec![Origin::Internal; entries_cap].into_boxed_slice(),
            requests: vec![RequestDescriptor::default(); entries_cap].into_boxed_slice(),
            request_count: 0,
        })?;
        let (ring_producer, ring_consumer) = spsc::channel(config.tx_ring_capacity);
        Ok(Self {
            config,
            state_machine,
            transactions,
            batches,
            ring_producer,
            ring_consumer,
            controller,
            open: None,
            tx_origins: vec![Origin::Internal; config.transactions].into_boxed_slice(),
            tx_requests: vec![RequestDescriptor::default(); config.transactions].into_boxed_slice(),
            sealed: VecDeque::with_capacity(config.batches),
            results: bytemuck::allocation::zeroed_slice_box(entries_cap),
            journal_records: vec![TxSlot::ZEROED; entries_cap].into_boxed_slice(),
            journal_requests: vec![RequestDescriptor::default(); entries_cap].into_boxed_slice(),
            op_sealed: 0,
            op_last: 0,
            mesh_reserve: config.transactions / 4,
            clock_offset_ns: 0,
            metrics,
            session_seen: Cell::new(SessionStats::default()),
        })
    }

    /// The state machine (read-only; it changes only by applying batches).
    pub fn state_machine(&self) -> &S {
        &self.state_machine
    }

    /// Highest op applied.
    pub fn op_last(&self) -> u64 {
        self.op_last
    }

    /// The batch controller (for metrics and tests).
    pub fn controller(&self) -> &BatchController {
        &self.controller
    }

    /// Transaction and batch pool statistics.
    pub fn pool_stats(&self) -> [PoolStats; 2] {
        [self.transactions.stats(), self.batches.stats()]
    }

    /// Records accepted but not yet applied: in the ring, the open batch and sealed batches.
    pub fn in_flight(&self) -> usize {
        let sealed: usize = self.sealed.iter().map(|h| self.batches.get(*h).len).sum();
        let open = self.open.map_or(0, |(h, _)| self.batches.get(h).len);
        self.transactions.in_use() + open + sealed
    }

    /// True when nothing is waiting anywhere in the core.
    pub fn is_idle(&self) -> bool {
        self.transactions.in_use() == 0 && self.open.is_none() && self.sealed.is_empty()
    }

    /// Whether a batch buffer is free (a follower can queue one more replicated batch).
    pub fn has_batch_room(&self) -> bool {
        self.batches.available() > 0
    }

    /// Whether one more record can be submitted now (a pool slot and a ring slot are free).
    pub fn has_room(&mut self) -> bool {
        self.transactions.available() > 0 && self.ring_producer.free_slots() > 0
    }

    /// How many client records (`Local` or `Ingress`) can be submitted now: free pool slots
    /// beyond the mesh reserve, and free ring slots.
    pub fn client_room(&mut self) -> usize {
        let pool = self
            .transactions
            .available()
            .saturating_sub(self.mesh_reserve);
        pool.min(self.ring_producer.free_slots())
    }

    /// Ends the core, handing back the state machine.
    pub fn into_state_machine(self) -> S {
        self.state_machine
    }

    /// Accepts one record for a batch of `operation`.
    ///
    /// Records from this shard's own clients (`Local`, `Ingress`) may not take the last
    /// quarter of the transaction pool: that reserve is for work arriving over the mesh
    /// (forwarded records, credit legs and their acknowledgements), which completes work
    /// already accepted. Without it, a busy shard's clients starve the acknowledgements that
    /// free cross-shard capacity, and throughput collapses.
    #[inline]
    pub fn submit(
        &mut self,
        operation: S::Operation,
        record: &S::Record,
        origin: Origin,
    ) -> Result<(), Backpressure> {
        self.submit_inner(operation, record, origin, RequestDescriptor::default())
    }

    /// Accepts one whole client request (`client_id`, `request_number`) of `operation`:
    /// every record or none (then [`Backpressure`] and nothing was taken). Its records stay
    /// together in one batch and the journal entry carries the request's descriptor, so the
    /// session table applies it once however often it is retried ([`percore_engine::session`]).
    /// `origin(i)` is record `i`'s origin.
    ///
    /// # Panics
    /// If `records` is empty or longer than one batch holds (the caller sends such a request
    /// record by record with [`ShardCore::submit`], without a session), or `client_id` is 0.
    pub fn submit_request(
        &mut self,
        operation: S::Operation,
        records: &[S::Record],
        origin: impl Fn(u32) -> Origin,
        client_id: u128,
        request_number: u64,
    ) -> Result<(), Backpressure> {
        assert!(!records.is_empty() && records.len() <= self.request_records_max());
        assert_ne!(client_id, 0, "client id 0 has no session");
        if self.client_room() < records.len() {
            return Err(Backpressure::PoolExhausted {
                capacity: self.config.transactions,
            });
        }
        for (index, record) in records.iter().enumerate() {
            let request = if index == 0 {
                RequestDescriptor {
                    client_id,
                    request_number,
                    record_start: 0,
                    record_count: records.len() as u32,
                }
            } else {
                RequestDescriptor::default()
            };
            let submitted = self.submit_inner(operation, record, origin(index as u32), request);
            // `client_room` counted pool and ring slots, and nothing else runs in between.
            assert!(submitted.is_ok(), "room was checked for the whole request");
        }
        Ok(())
    }

    /// The largest request [`ShardCore::submit_request`] takes: one batch, and no more
    /// than the client share of an idle pool and ring (else it could never get room).
    pub fn request_records_max(&self) -> usize {
        self.controller
            .entries_cap()
            .min(self.config.transactions - self.mesh_reserve)
            .min(self.config.tx_ring_capacity)
    }

    #[inline]
    fn submit_inner(
        &mut self,
        operation: S::Operation,
        record: &S::Record,
        origin: Origin,
        request: RequestDescriptor,
    ) -> Result<(), Backpressure> {
        let operation: u16 = operation.into();
        if matches!(origin, Origin::Local { .. } | Origin::Ingress { .. })
            && self.transactions.available() <= self.mesh_reserve
        {
            return Err(Backpressure::PoolExhausted {
                capacity: self.config.transactions,
            });
        }
        let slot = self
            .transactions
            .borrow()
            .map_err(|_| Backpressure::PoolExhausted {
                capacity: self.config.transactions,
            })?;
        *self.transactions.get_mut(slot) = TxSlot::from_record(*record);
        self.tx_origins[slot.index() as usize] = origin;
        self.tx_requests[slot.index() as usize] = request;
        match self.ring_producer.push(TxRef { slot, operation }) {
            Ok(()) => Ok(()),
            Err(_) => {
                let released = self.transactions.release(slot);
                debug_assert!(released.is_ok());
                Err(Backpressure::RingFull {
                    capacity: self.config.tx_ring_capacity,
                })
            }
        }
    }

    /// Feeds the batch controller one observation of the work waiting (ring plus open
    /// batch). The runtime calls it once per batcher turn, before sealing: observing after
    /// every seal would count the empty ring left by the last seal of a turn and drag the
    /// entry target down.
    pub fn observe_depth(&mut self) {
        let depth = self.ring_consumer.available();
        let open_len = self.open.map_or(0, |(h, _)| self.batches.get(h).len);
        self.controller.observe_depth(depth + open_len);
        ShardMetrics::set(&self.metrics.ring_depth, depth as u64);
    }

    /// Takes what the ring holds into the open batch and seals it if the controller says so.
    /// Returns the sealed batch, or `None` (nothing to seal yet, or no free batch buffer:
    /// then the ring keeps filling and submitters meet back-pressure).
    pub fn poll_seal(&mut self, now_us: u64) -> Option<Sealed> {
        let depth = self.ring_consumer.available();
        if self.open.is_none() && depth > 0 {
            let batch = self.batches.borrow().ok()?;
            let buffer = self.batches.get_mut(batch);
            buffer.len = 0;
            buffer.request_count = 0;
            buffer.operation = self
                .ring_consumer
                .read_chunk(1)
                .as_slices()
                .0
                .first()
                .map_or(0, |tx| tx.operation);
            self.open = Some((batch, now_us));
        }
        let (batch, oldest_us) = self.open?;
        // Everything already waiting joins this batch, up to the cap: the target only
        // decides whether to seal or linger. Cutting what is there into target-sized pieces
        // would cost one op (and one Prepare per follower) each and gain no latency, since a
        // turn's batches are made durable by the same group commit.
        let cap = self.controller.entries_cap();
        let boundary = self.take_from_ring(batch, cap);
        let buffer = self.batches.get(batch);
        let entries = buffer.len;
        let next_bytes = (entries + 1) * TX_SLOT_BYTES;
        if boundary && entries > 0 {
            // Batches are homogeneous and requests are not split: what waits behind this
            // batch cannot join it, so lingering would only delay both.
            return Some(self.seal(batch, SealReason::Drained, now_us));
        }
        let ring_empty = self.ring_consumer.available() == 0;
        let reason = self
            .controller
            .should_seal(now_us, entries, next_bytes, oldest_us, ring_empty)?;
        Some(self.seal(batch, reason, now_us))
    }

    /// Moves up to `target - len` records from the ring into the open batch, stopping at a
    /// record of another operation or at a client request that does not fit whole. Returns
    /// whether it stopped for one of those reasons.
    fn take_from_ring(&mut self, batch: Handle, target: usize) -> bool {
        let buffer = self.batches.get_mut(batch);
        let room = target
            .saturating_sub(buffer.len)
            .min(buffer.records.len() - buffer.len);
        let operation = buffer.operation;
        let mut operation_changed = false;
        let mut taken = 0;
        {
            let chunk = self.ring_consumer.read_chunk(room);
            let (first, second) = chunk.as_slices();
            for tx in first.iter().chain(second.iter()) {
                if tx.operation != operation {
                    operation_changed = true;
                    break;
                }
                let request = self.tx_requests[tx.slot.index() as usize];
                if request.record_count > 0 {
                    if taken + request.record_count as usize > room {
                        // The request's records are all in the ring (submitted at once),
                        // but not all fit: it starts the next batch.
                        operation_changed = true;
                        break;
                    }
                    buffer.requests[buffer.request_count] = RequestDescriptor {
                        record_start: buffer.len as u32,
                        ..request
                    };
                    buffer.request_count += 1;
                }
                let index = buffer.len;
                buffer.records[index] = *self.transactions.get(tx.slot);
                buffer.origins[index] = self.tx_origins[tx.slot.index() as usize];
                buffer.len += 1;
                let released = self.transactions.release(tx.slot);
                debug_assert!(released.is_ok(), "ring held a stale slot");
                taken += 1;
            }
            chunk.commit(taken);
        }
        operation_changed
    }

    fn seal(&mut self, batch: Handle, reason: SealReason, now_us: u64) -> Sealed {
        self.open = None;
        self.op_sealed += 1;
        let op = self.op_sealed;
        let buffer = self.batches.get_mut(batch);
        buffer.op = op;
        let entries = buffer.len;
        debug_assert!(entries > 0);
        let operation = S::Operation::try_from(buffer.operation)
            .ok()
            .expect("operations enter as S::Operation");
        let records: &mut [S::Record] = bytemuck::cast_slice_mut(&mut buffer.records[..entries]);
        let now_ns = self
            .clock_offset_ns
            .saturating_add(now_us.saturating_mul(1_000));
        self.state_machine.prepare(operation, now_ns, records);
        self.controller.on_sealed(entries, reason);
        self.sealed.push_back(batch);
        let state = self.controller.state();
        ShardMetrics::add(&self.metrics.batches_sealed_total, 1);
        ShardMetrics::set(
            &self.metrics.batch_entries_target,
            state.entries_target as u64,
        );
        ShardMetrics::set(&self.metrics.batch_linger_us, state.linger_us);
        self.metrics.batch_size.record(entries as u64, 1);
        Sealed {
            op,
            entries,
            reason,
        }
    }

    /// When the open batch must be sealed at the latest (µs), if one is open.
    pub fn seal_deadline_us(&self) -> Option<u64> {
        self.open
            .map(|(_, oldest_us)| self.controller.deadline_us(oldest_us))
    }

    /// Applies the oldest sealed batch and passes every record's origin and result to
    /// `complete`, in record order. Returns the op applied.
    pub fn apply_next(&mut self, mut complete: impl FnMut(Origin, &S::Result)) -> Option<u64> {
        let batch = self.sealed.pop_front()?;
        let buffer = self.batches.get(batch);
        let entries = buffer.len;
        let op = buffer.op;
        debug_assert_eq!(op, self.op_last + 1, "batches apply in op order");
        let operation = S::Operation::try_from(buffer.operation)
            .ok()
            .expect("operations enter as S::Operation");
        let records: &[S::Record] = bytemuck::cast_slice(&buffer.records[..entries]);
        let results = &mut self.results[..entries];
        let requests = &buffer.requests[..buffer.request_count];
        self.state_machine
            .apply_requests(op, operation, records, requests, results);
        let mut internal = 0u64;
        for (origin, result) in buffer.origins[..entries].iter().zip(results.iter()) {
            internal += u64::from(*origin == Origin::Internal);
            complete(*origin, result);
        }
        let released = self.batches.release(batch);
        debug_assert!(released.is_ok());
        self.op_last = op;
        ShardMetrics::add(&self.metrics.tx_applied_total, entries as u64 - internal);
        ShardMetrics::add(&self.metrics.internal_applied_total, internal);
        ShardMetrics::set(&self.metrics.commit_op, op);
        Some(op)
    }

    /// Replays a durable batch found by journal recovery: applies it with no one to answer
    /// and makes it the last op. Messages it produces for other shards are dropped: they
    /// were sent before the crash or are re-queued by the state machine after recovery.
    ///
    /// # Panics
    /// If `op` does not follow the last op, or the operation code or record bytes do not
    /// belong to this state machine: the journal verified them, so that is a bug.
    pub fn replay(&mut self, op: u64, operation: u16, records: &[u8], requests: &[u8]) {
        assert!(self.is_idle(), "replay happens before any client traffic");
        assert_eq!(op, self.op_last + 1, "journal ops are consecutive");
        self.apply_bytes(op, operation, records, requests);
        while self.state_machine.poll_outbound().is_some() {}
    }

    /// [`ShardCore::replay`] for BFT mode: what the batch emits for other shards goes to
    /// `outbound` (in order) instead of being dropped, so the driver can sign the replayed
    /// op's outputs again (`docs/bft.md` §12, restart).
    pub fn replay_keeping_outbound(
        &mut self,
        op: u64,
        (operation, records, requests): (u16, &[u8], &[u8]),
        outbound: &mut Vec<Outbound<S::Operation, S::Record>>,
    ) {
        assert!(self.is_idle(), "replay happens before any client traffic");
        assert_eq!(op, self.op_last + 1, "journal ops are consecutive");
        self.apply_bytes(op, operation, records, requests);
        outbound.extend(std::iter::from_fn(|| self.state_machine.poll_outbound()));
    }

    /// Restores a checkpoint found by journal recovery: the state machine's snapshot after
    /// applying `op`, which becomes the last op. Only before any replay or traffic. On an
    /// error the state machine is left empty (the shard must not start).
    ///
    /// # Panics
    /// If the core has applied anything or holds traffic: that is a bug.
    pub fn restore(&mut self, op: u64, bytes: &[u8]) -> Result<(), RestoreError> {
        assert!(self.is_idle(), "restore happens before any client traffic");
        assert_eq!(self.op_last, 0, "restore happens before any replay");
        assert!(op >= 1, "a checkpoint is taken after an op");
        self.state_machine.restore(bytes)?;
        while self.state_machine.poll_outbound().is_some() {}
        self.op_sealed = op;
        self.op_last = op;
        ShardMetrics::set(&self.metrics.commit_op, op);
        Ok(())
    }

    /// State sync: drops every queued batch (its journal is being replaced; the ops after
    /// the checkpoint are fetched again), then replaces the state with a checkpoint's
    /// snapshot at `op`, ahead of everything applied here. Records waiting for the dropped
    /// batches go to `abort` (a follower has none of its own).
    pub fn resync(
        &mut self,
        op: u64,
        bytes: &[u8],
        abort: impl FnMut(Origin),
    ) -> Result<(), RestoreError> {
        assert!(op > self.op_last, "a sync moves the state forward");
        self.truncate_queued(self.op_last, abort);
        self.state_machine.restore(bytes)?;
        while self.state_machine.poll_outbound().is_some() {}
        self.op_sealed = op;
        self.op_last = op;
        ShardMetrics::set(&self.metrics.commit_op, op);
        Ok(())
    }

    /// Follower: queues a batch the leader sealed (verified and staged in the journal) to be
    /// applied once committed, as if this core had sealed it. Returns `false`, queuing
    /// nothing, when no batch buffer is free (the entry is repaired later). No allocation.
    ///
    /// # Panics
    /// If `op` does not follow the last op queued, or the operation or record bytes are not
    /// this state machine's (the journal verified the entry, so that is a bug).
    pub fn enqueue_replicated(
        &mut self,
        op: u64,
        operation: u16,
        body: &[u8],
        requests: &[u8],
    ) -> bool {
        // Ops between the last queued and `op` may be in the journal only (after a restart
        // that replayed up to the commit number): `apply_from_journal` fills them.
        assert!(op > self.op_sealed, "replicated ops are queued in order");
        assert!(
            self.open.is_none(),
            "followers never seal their own batches"
        );
        let record_bytes = size_of::<S::Record>();
        assert!(body.len().is_multiple_of(record_bytes));
        let entries = body.len() / record_bytes;
        assert!(
            entries <= self.results.len(),
            "entry larger than the batch cap"
        );
        assert!(S::Operation::try_from(operation).is_ok());
        let Ok(batch) = self.batches.borrow() else {
            return false;
        };
        let buffer = self.batches.get_mut(batch);
        bytemuck::cast_slice_mut::<TxSlot, u8>(&mut buffer.records[..entries])
            .copy_from_slice(body);
        buffer.origins[..entries].fill(Origin::Internal);
        buffer.request_count = request_descriptors(requests, &mut buffer.requests)
            .expect("the journal verified the descriptors' size");
        assert!(
            descriptors_valid(&buffer.requests[..buffer.request_count], entries),
            "the leader wrote valid descriptors"
        );
        buffer.len = entries;
        buffer.op = op;
        buffer.operation = operation;
        self.op_sealed = op;
        self.sealed.push_back(batch);
        true
    }

    /// The op of the oldest queued batch, if any.
    pub fn queued_front_op(&self) -> Option<u64> {
        let batch = *self.sealed.front()?;
        Some(self.batches.get(batch).op)
    }

    /// Applies an op read back from the journal because it is not queued here (it was
    /// journaled before a restart that replayed only committed ops). Its records have no
    /// one to answer; what the state machine emits is left for `poll_outbound`.
    ///
    /// # Panics
    /// If `op` is not the next op to apply or is queued, or the bytes are not this state
    /// machine's (the journal verified them).
    pub fn apply_from_journal(&mut self, op: u64, operation: u16, body: &[u8], requests: &[u8]) {
        assert_eq!(op, self.op_last + 1, "ops apply in order");
        assert!(
            self.queued_front_op().is_none_or(|front| front > op),
            "a queued op is applied from its queue"
        );
        let entries = self.apply_bytes(op, operation, body, requests);
        ShardMetrics::add(&self.metrics.internal_applied_total, entries as u64);
    }

    /// BFT mode: checks committed batch bytes ([`BatchInvalid`]) and, if they are a batch of
    /// this shard, applies them as op `op` (the next one) and hands each client request's
    /// descriptor and results to `answer`. On an error nothing is applied and the op is not
    /// used. What the state machine emits is left for `poll_outbound`. No allocation.
    ///
    /// # Panics
    /// If `op` is not the next op, or a batch is queued (a BFT leader drops what it sealed
    /// once it has proposed it).
    pub fn apply_committed(
        &mut self,
        op: u64,
        operation: u16,
        body: &[u8],
        requests: &[u8],
        mut answer: impl FnMut(&RequestDescriptor, &[S::Result]),
    ) -> Result<usize, BatchInvalid> {
        assert_eq!(op, self.op_last + 1, "ops apply in order");
        assert!(self.sealed.is_empty(), "nothing is queued in BFT mode");
        let entries = self.check_committed(operation, body, requests)?;
        let operation_typed = S::client_operation(operation).expect("checked");
        let request_count = requests.len() / REQUEST_DESCRIPTOR_BYTES;
        let records: &[S::Record] = bytemuck::cast_slice(&self.journal_records[..entries]);
        self.state_machine.apply_requests(
            op,
            operation_typed,
            records,
            &self.journal_requests[..request_count],
            &mut self.results[..entries],
        );
        self.op_last = op;
        self.op_sealed = self.op_sealed.max(op);
        ShardMetrics::set(&self.metrics.commit_op, op);
        ShardMetrics::add(&self.metrics.tx_applied_total, entries as u64);
        for descriptor in &self.journal_requests[..request_count] {
            let start = descriptor.record_start as usize;
            answer(
                descriptor,
                &self.results[start..start + descriptor.record_count as usize],
            );
        }
        Ok(entries)
    }

    /// The checks of [`ShardCore::apply_committed`] alone: returns the record count and
    /// leaves the records and descriptors in the core's scratch buffers. No allocation.
    pub fn check_committed(
        &mut self,
        operation: u16,
        body: &[u8],
        requests: &[u8],
    ) -> Result<usize, BatchInvalid> {
        let Some(operation_typed) = S::client_operation(operation) else {
            if S::Operation::try_from(operation).is_ok() {
                return Err(BatchInvalid::InternalUnproven(operation));
            }
            return Err(BatchInvalid::Operation(operation));
        };
        let entries = self.whole_records(body)?;
        let request_count = request_descriptors(requests, &mut self.journal_requests)
            .ok_or(BatchInvalid::Descriptors)?;
        if !descriptors_valid(&self.journal_requests[..request_count], entries) {
            return Err(BatchInvalid::Descriptors);
        }
        bytemuck::cast_slice_mut::<TxSlot, u8>(&mut self.journal_records[..entries])
            .copy_from_slice(body);
        let records: &[S::Record] = bytemuck::cast_slice(&self.journal_records[..entries]);
        let (shard, shard_count) = (self.config.shard, self.config.shard_count);
        if let Some(foreign) = records
            .iter()
            .position(|record| S::route(operation_typed, record, shard_count) != shard)
        {
            return Err(BatchInvalid::ForeignRecord(foreign));
        }
        Ok(entries)
    }

    /// `1..=cap` whole records in `body`, or `RecordBytes`.
    fn whole_records(&self, body: &[u8]) -> Result<usize, BatchInvalid> {
        let record_bytes = size_of::<S::Record>();
        let entries = body.len() / record_bytes;
        if !body.len().is_multiple_of(record_bytes) || entries == 0 || entries > self.results.len()
        {
            return Err(BatchInvalid::RecordBytes(body.len()));
        }
        Ok(entries)
    }

    /// BFT mode: the check of the records of a proven batch (their certificates were
    /// verified by the caller, `Groups::verify_batch_bytes`): an internal operation of this
    /// state machine, `1..=cap` whole records, every one owned by this shard. Leaves the
    /// records in the core's scratch buffer stamped from `now_ns` and replicated state
    /// ([`StateMachine::stamp_internal`]), where [`ShardCore::checked_records`] reads them
    /// (for the journal). Returns the record count. No allocation.
    ///
    /// The stamp reads the state as it is now, so every replica must call this with every
    /// earlier op applied: the driver stages a proven batch only first in its turn.
    pub fn check_internal(
        &mut self,
        operation: u16,
        now_ns: u64,
        body: &[u8],
    ) -> Result<usize, BatchInvalid> {
        let Ok(operation_typed) = S::Operation::try_from(operation) else {
            return Err(BatchInvalid::Operation(operation));
        };
        if S::client_operation(operation).is_some() {
            return Err(BatchInvalid::NotInternal(operation));
        }
        let entries = self.whole_records(body)?;
        bytemuck::cast_slice_mut::<TxSlot, u8>(&mut self.journal_records[..entries])
            .copy_from_slice(body);
        let records: &mut [S::Record] =
            bytemuck::cast_slice_mut(&mut self.journal_records[..entries]);
        let (shard, shard_count) = (self.config.shard, self.config.shard_count);
        if let Some(foreign) = records
            .iter()
            .position(|record| S::route(operation_typed, record, shard_count) != shard)
        {
            return Err(BatchInvalid::ForeignRecord(foreign));
        }
        self.state_machine
            .stamp_internal(operation_typed, now_ns, records);
        Ok(entries)
    }

    /// The `entries` records [`ShardCore::check_internal`] left (stamped), as bytes.
    pub fn checked_records(&self, entries: usize) -> &[u8] {
        bytemuck::cast_slice(&self.journal_records[..entries])
    }

    /// BFT mode: checks ([`ShardCore::check_internal`]) and applies the records of a
    /// committed proven batch as op `op` (the next one). Nothing to answer: no client sent
    /// them. What the state machine emits is left for `poll_outbound`. No allocation.
    ///
    /// # Panics
    /// If `op` is not the next op, or a batch is queued.
    pub fn apply_internal(
        &mut self,
        op: u64,
        operation: u16,
        now_ns: u64,
        body: &[u8],
    ) -> Result<usize, BatchInvalid> {
        assert_eq!(op, self.op_last + 1, "ops apply in order");
        assert!(self.sealed.is_empty(), "nothing is queued in BFT mode");
        let entries = self.check_internal(operation, now_ns, body)?;
        let operation_typed = S::Operation::try_from(operation).ok().expect("checked");
        let records: &[S::Record] = bytemuck::cast_slice(&self.journal_records[..entries]);
        self.state_machine.apply_requests(
            op,
            operation_typed,
            records,
            &[],
            &mut self.results[..entries],
        );
        self.op_last = op;
        self.op_sealed = self.op_sealed.max(op);
        ShardMetrics::set(&self.metrics.commit_op, op);
        ShardMetrics::add(&self.metrics.internal_applied_total, entries as u64);
        Ok(entries)
    }

    /// BFT leader: reserves the fields `prepare` would assign to internal records it is
    /// about to propose (`body`, whole records, copied; [`StateMachine::reserve_internal`])
    /// and returns the `now_ns` to propose them with. Leader-local, like `prepare`.
    ///
    /// # Panics
    /// If `body` is not `1..=cap` whole records of an operation of this state machine (the
    /// caller took them from verified proofs).
    pub fn reserve_internal(&mut self, operation: u16, now_ns: u64, body: &[u8]) -> u64 {
        let operation = S::Operation::try_from(operation)
            .ok()
            .expect("an operation of this state machine");
        let entries = self.whole_records(body).expect("whole records");
        bytemuck::cast_slice_mut::<TxSlot, u8>(&mut self.journal_records[..entries])
            .copy_from_slice(body);
        let records: &mut [S::Record] =
            bytemuck::cast_slice_mut(&mut self.journal_records[..entries]);
        self.state_machine
            .reserve_internal(operation, now_ns, records)
    }

    /// The `now_ns` records prepared at `now_us` (the shard's clock) are stamped from:
    /// `clock_offset_ns + now_us × 1,000`.
    pub fn timestamp_ns(&self, now_us: u64) -> u64 {
        self.clock_offset_ns
            .saturating_add(now_us.saturating_mul(1_000))
    }

    /// Sets the offset [`ShardCore::timestamp_ns`] adds to the shard's clock. BFT mode sets
    /// the wall-clock time at which the shard's clock started, so that a restarted leader,
    /// whose shard clock starts again from 0, still stamps its batches after the ones it
    /// prepared before the restart (ops prepared then may commit after its first new
    /// batches, and committed timestamps must increase).
    pub fn set_clock_offset_ns(&mut self, offset_ns: u64) {
        self.clock_offset_ns = offset_ns;
    }

    /// Records one batch may hold (the batch cap).
    pub fn batch_records_max(&self) -> usize {
        self.results.len()
    }

    /// Applies journal bytes as op `op` (the next one): copies them into the aligned
    /// scratch records (journal bytes need not be aligned) and makes `op` the last op.
    /// Returns the records applied.
    fn apply_bytes(&mut self, op: u64, operation: u16, body: &[u8], requests: &[u8]) -> usize {
        let operation = S::Operation::try_from(operation)
            .ok()
            .expect("the journal holds operations of this state machine");
        let record_bytes = size_of::<S::Record>();
        assert!(body.len().is_multiple_of(record_bytes));
        let entries = body.len() / record_bytes;
        assert!(
            entries <= self.results.len(),
            "entry larger than the batch cap"
        );
        bytemuck::cast_slice_mut::<TxSlot, u8>(&mut self.journal_records[..entries])
            .copy_from_slice(body);
        let records: &[S::Record] = bytemuck::cast_slice(&self.journal_records[..entries]);
        let request_count = request_descriptors(requests, &mut self.journal_requests)
            .expect("the journal verified the descriptors' size");
        let requests = &self.journal_requests[..request_count];
        assert!(
            descriptors_valid(requests, entries),
            "the leader wrote valid descriptors"
        );
        self.state_machine.apply_requests(
            op,
            operation,
            records,
            requests,
            &mut self.results[..entries],
        );
        self.op_last = op;
        self.op_sealed = self.op_sealed.max(op);
        ShardMetrics::set(&self.metrics.commit_op, op);
        entries
    }

    /// A replica that no longer leads: hands every record not yet sealed (the ring and the
    /// open batch) to `abort` and releases its slot. Returns how many there were.
    pub fn abort_unsealed(&mut self, mut abort: impl FnMut(Origin)) -> usize {
        let mut aborted = 0;
        if let Some((batch, _)) = self.open.take() {
            let buffer = self.batches.get(batch);
            for origin in &buffer.origins[..buffer.len] {
                abort(*origin);
                aborted += 1;
            }
            let released = self.batches.release(batch);
            debug_assert!(released.is_ok());
        }
        while let Some(tx) = self.ring_consumer.pop() {
            abort(self.tx_origins[tx.slot.index() as usize]);
            let released = self.transactions.release(tx.slot);
            debug_assert!(released.is_ok());
            aborted += 1;
        }
        aborted
    }

    /// Drops every queued batch above `op` (a truncated suffix of an abandoned view),
    /// handing each record's origin to `abort`.
    pub fn truncate_queued(&mut self, op: u64, mut abort: impl FnMut(Origin)) {
        assert!(op >= self.op_last, "applied ops are never truncated");
        while let Some(&batch) = self.sealed.back() {
            let buffer = self.batches.get(batch);
            if buffer.op <= op {
                break;
            }
            for origin in &buffer.origins[..buffer.len] {
                abort(*origin);
            }
            self.sealed.pop_back();
            let released = self.batches.release(batch);
            debug_assert!(released.is_ok());
        }
        self.op_sealed = self.op_sealed.min(op).max(self.op_last);
    }

    /// A stopping leader whose group no longer commits: hands the origin of every record
    /// of this node's clients (`Local`, `Ingress`) in the sealed batches not yet applied to
    /// `abort`, and forgets it (the batches stay: they are in the journal, and should the
    /// group commit them after all, they apply and answer no one). Forwarded records keep
    /// their origin: their shard answers its own client. Returns the origins handed over.
    pub fn abort_sealed_origins(&mut self, mut abort: impl FnMut(Origin)) -> usize {
        let mut aborted = 0;
        for &batch in &self.sealed {
            let buffer = self.batches.get_mut(batch);
            for origin in &mut buffer.origins[..buffer.len] {
                if matches!(origin, Origin::Local { .. } | Origin::Ingress { .. }) {
                    abort(std::mem::replace(origin, Origin::Internal));
                    aborted += 1;
                }
            }
        }
        aborted
    }

    /// Highest op sealed (leader) or queued (follower).
    pub fn op_sealed(&self) -> u64 {
        self.op_sealed
    }

    /// The operation code, records and request descriptors of the oldest sealed batch not
    /// yet applied, with its op, as the journal writes them. `skip` selects a later sealed
    /// batch.
    pub fn sealed_batch(&self, skip: usize) -> Option<SealedBatch<'_>> {
        let batch = *self.sealed.get(skip)?;
        let buffer = self.batches.get(batch);
        Some(SealedBatch {
            op: buffer.op,
            operation: buffer.operation,
            records: bytemuck::cast_slice(&buffer.records[..buffer.len]),
            requests: bytemuck::cast_slice(&buffer.requests[..buffer.request_count]),
        })
    }

    /// Sealed batches waiting to be applied.
    pub fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// The next message the state machine wants delivered to another shard.
    pub fn poll_outbound(&mut self) -> Option<Outbound<S::Operation, S::Record>> {
        self.state_machine.poll_outbound()
    }

    /// Publishes pool gauges and the session table's counters, if the machine keeps one
    /// (called once per runtime turn, not per record).
    pub fn publish_pool_metrics(&self) {
        let [transactions, batches] = self.pool_stats();
        ShardMetrics::set(
            &self.metrics.pool_transactions_in_use,
            transactions.in_use as u64,
        );
        ShardMetrics::set(
            &self.metrics.pool_transactions_high_water,
            transactions.high_water as u64,
        );
        ShardMetrics::set(&self.metrics.pool_batches_in_use, batches.in_use as u64);
        ShardMetrics::set(
            &self.metrics.pool_batches_high_water,
            batches.high_water as u64,
        );
        if let Some(now) = self.state_machine.session_stats() {
            // The table's counters restart at a restore (state sync): count from there.
            let seen = self.session_seen.replace(now);
            let delta = |now: u64, seen: u64| now.checked_sub(seen).unwrap_or(now);
            let m = &self.metrics;
            for (counter, now, seen) in [
                (&m.session_requests_applied_total, now.applied, seen.applied),
                (
                    &m.session_requests_replayed_total,
                    now.replayed,
                    seen.replayed,
                ),
                (&m.session_fallbacks_total, now.fallbacks, seen.fallbacks),
                (&m.session_evictions_total, now.evicted, seen.evicted),
                (&m.session_requests_refused_total, now.refused, seen.refused),
            ] {
                ShardMetrics::add(counter, delta(now, seen));
            }
        }
    }
}
