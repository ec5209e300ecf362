//! The `StateMachine` trait: what a shard replicates and applies, and nothing else.
//!
//! A shard runtime is generic over one `StateMachine`: the reference `Ledger`, or a
//! validator's own machine. The contract is deterministic batch application: replicas that
//! apply the same committed batches, in the same order, reach the same state and the same
//! `digest`. A machine must never perform I/O, read a clock, draw randomness, iterate a
//! randomly seeded hash map, or allocate while applying; time enters only as `prepare`'s
//! `now_ns`, and cross-shard effects leave only through `poll_outbound`.
//!
//! # Batches and operations
//! A batch is homogeneous: one `Operation` for all its records, taken from the client frame's
//! `operation` field or, for internal traffic between shards, chosen by the runtime from the
//! `Outbound` it forwards. All records of a machine have one fixed size (`Record`), so the
//! runtime pools, batches and journals them without knowing their meaning.
//!
//! # Life of a batch
//! 1. The group leader seals a batch and calls `prepare(operation, now_ns, records)` once,
//!    before replication; `prepare` may rewrite records (timestamps) and nothing else may.
//! 2. The batch is replicated and committed as `op`.
//! 3. Every replica calls `apply(op, operation, records, results)`, which writes exactly one
//!    result per record.
//! 4. The runtime drains `poll_outbound` until `None` and forwards each message to its shard,
//!    where it becomes a record of a batch with the message's `operation`. Every replica
//!    produces the same messages; the runtime decides which replica sends them. Messages must
//!    be idempotent at the receiver, because they are resent after failures.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::fmt::Debug;

use bytemuck::Pod;

use crate::checksum::Digest256;

/// A message from one shard's state machine to another shard's: one record for a batch of
/// `operation` on shard `shard`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound<Operation, Record> {
    /// Destination shard index.
    pub shard: u32,
    /// Operation of the batch the record must join at the destination.
    pub operation: Operation,
    /// The record.
    pub record: Record,
}

/// Why `StateMachine::restore` rejected a snapshot. The machine is left empty after an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is shorter (or longer) than its header says.
    #[error("snapshot length {bytes} does not match its header ({expected} bytes)")]
    LengthMismatch {
        /// Bytes given.
        bytes: usize,
        /// Bytes the header describes (0 if not even a header fits).
        expected: usize,
    },
    /// The snapshot does not start with this machine's magic number.
    #[error("snapshot magic {magic:#x} is not this machine's")]
    BadMagic {
        /// Magic found.
        magic: u32,
    },
    /// The snapshot's format version is not supported.
    #[error("snapshot version {version} is not supported")]
    UnsupportedVersion {
        /// Version found.
        version: u32,
    },
    /// The snapshot was taken by a machine with another configuration (e.g. another shard).
    #[error("snapshot was taken with another configuration")]
    ConfigMismatch,
    /// The snapshot holds more entries than this machine's tables can.
    #[error("snapshot holds more entries than this machine's capacity")]
    CapacityExceeded,
    /// The snapshot is internally inconsistent (duplicate or misplaced entries, counters that
    /// disagree with the entries).
    #[error("snapshot is internally inconsistent")]
    Corrupt,
    /// The restored state's digest differs from the digest recorded in the snapshot.
    #[error("restored state digest differs from the snapshot's")]
    DigestMismatch,
}

/// A deterministic state machine a shard replicates. See the module documentation for the
/// life of a batch.
pub trait StateMachine {
    /// What a batch does; one per batch. Travels on the wire and in the journal as a `u16`.
    type Operation: Copy + Eq + Debug + Into<u16> + TryFrom<u16>;
    /// One fixed-size input record, for every operation.
    type Record: Pod;
    /// One per-record result.
    type Result: Pod;

    /// The operation a client frame's `operation` code asks for, or `None` if clients may not
    /// submit it (unknown, not a batch operation, or internal to the cluster). This is the
    /// boundary that keeps clients from injecting internal messages.
    fn client_operation(code: u16) -> Option<Self::Operation>;

    /// The shard that owns `record` of `operation` among `shard_count` shards: where the
    /// runtime must submit it. A pure function of its arguments, identical on every node and
    /// every version (it decides where data lives).
    fn route(operation: Self::Operation, record: &Self::Record, shard_count: u32) -> u32;

    /// Whether applying `record` of `operation` on its shard (`route`) would send a message
    /// to another shard among `shard_count` (for the ledger: a transfer whose credit account
    /// lives on another shard than its debit account). A pure function of its arguments,
    /// like `route`, for callers that must tell such records apart without applying them
    /// (BFT mode once refused them; it now certifies what one group sends another,
    /// `docs/bft.md` §12 and §14, and no longer asks). The default: a machine that never
    /// sends to other shards.
    fn crosses_shards(operation: Self::Operation, record: &Self::Record, shard_count: u32) -> bool {
        let _ = (operation, record, shard_count);
        false
    }

    /// BFT mode: resets in `record` the fields [`StateMachine::prepare`] assigns to what a
    /// client sends (the ledger: `timestamp`, 0). A client signs its records as it sends
    /// them; a replica checks that signature against records the leader prepared, so it
    /// hashes them with these fields reset (`docs/bft.md` §2). A pure function. The default,
    /// for a machine whose `prepare` rewrites nothing, leaves the record as it is.
    fn unprepare(operation: Self::Operation, record: &mut Self::Record) {
        let _ = (operation, record);
    }

    /// Called once by the batch leader before the batch is replicated. May rewrite records
    /// (e.g. assign timestamps); deterministic in `(self, operation, now_ns, records)`.
    fn prepare(&mut self, operation: Self::Operation, now_ns: u64, records: &mut [Self::Record]);

    /// BFT mode: assigns, at execution, the fields [`StateMachine::prepare`] would assign to
    /// internal records another group certified (`docs/bft.md` §14), from `now_ns` (the
    /// proposing leader's clock, carried in the committed batch) and replicated state only,
    /// so every replica stamps them alike; [`StateMachine::prepare`] reads leader-local
    /// state. Called by every replica right before [`StateMachine::apply`] of the same
    /// records. A correct leader reserves the values when it proposes (it runs `prepare`
    /// on a copy and proposes the first value as `now_ns`), so the stamp equals what it
    /// reserved and its later batches stay ordered after it. The default, for a machine
    /// whose `prepare` rewrites nothing, leaves the records as they are.
    fn stamp_internal(
        &self,
        operation: Self::Operation,
        now_ns: u64,
        records: &mut [Self::Record],
    ) {
        let _ = (operation, now_ns, records);
    }

    /// BFT mode, the leader of a group that proposes internal records another group
    /// certified: reserves for them the fields [`StateMachine::prepare`] assigns (on
    /// `records`, a copy the leader does not propose) and returns the `now_ns` to propose
    /// with them, so that [`StateMachine::stamp_internal`] at execution gives every replica
    /// exactly the reserved values and the leader's later batches stay ordered after them
    /// (`docs/bft.md` §14). Leader-local like `prepare`. The default, for a machine whose
    /// `prepare` rewrites nothing: `now_ns`.
    fn reserve_internal(
        &mut self,
        operation: Self::Operation,
        now_ns: u64,
        records: &mut [Self::Record],
    ) -> u64 {
        let _ = (operation, records);
        now_ns
    }

    /// Applies the committed batch `op` in record order, writing `results[i]` for
    /// `records[i]`. `results.len() == records.len()`; `op` increases from batch to batch.
    /// Must not allocate. Pushes at most one `Outbound` per record; the runtime drains them
    /// with `poll_outbound` (the machine's outbox is sized for a full batch).
    fn apply(
        &mut self,
        op: u64,
        operation: Self::Operation,
        records: &[Self::Record],
        results: &mut [Self::Result],
    );

    /// [`StateMachine::apply`] of an entry that carries client request descriptors
    /// (records `record_start..+record_count` of the entry are one client request, see
    /// [`crate::session`]). The runtime always calls this one. The default ignores the
    /// descriptors; [`crate::session::Sessioned`] uses them to apply each request once.
    fn apply_requests(
        &mut self,
        op: u64,
        operation: Self::Operation,
        records: &[Self::Record],
        requests: &[crate::session::RequestDescriptor],
        results: &mut [Self::Result],
    ) {
        let _ = requests;
        self.apply(op, operation, records, results);
    }

    /// The kept reply of request `request_number` of `client_id` with `record_count`
    /// records, if this machine keeps one (a request already applied). BFT mode answers a
    /// request that reaches a replica after it was committed from here, so the replica does
    /// not wait for a commit that already happened. The default keeps none.
    fn session_reply(
        &self,
        client_id: u128,
        request_number: u64,
        record_count: u32,
    ) -> Option<&[Self::Result]> {
        let _ = (client_id, request_number, record_count);
        None
    }

    /// Whether request `request_number` of `client_id` (of `record_count` records) is
    /// behind this machine's session for the client: at or below the highest number it
    /// applied for the client, with no reply kept for it (older than the reply window, or
    /// another record count). Such a request was applied before, or is a stale duplicate;
    /// BFT mode answers it at once instead of waiting for a commit that no correct leader
    /// will propose again. The default keeps no sessions: never.
    fn session_stale(&self, client_id: u128, request_number: u64, record_count: u32) -> bool {
        let _ = (client_id, request_number, record_count);
        false
    }

    /// The result of the `index`-th record of an entry whose request a session table
    /// refused without applying it ([`crate::session::Disposition::Refused`]: BFT mode, a
    /// request that cannot be told apart from a replay of an old one). No correct client
    /// waits for it, but it should not read as success. The default is all zeros: a
    /// machine whose zero result means success overrides it, as the ledger does.
    fn refused_result(index: u32) -> Self::Result {
        let _ = index;
        <Self::Result as bytemuck::Zeroable>::zeroed()
    }

    /// Makes this machine's session table, if it keeps one, refuse replays
    /// ([`crate::session::SessionTable::refuse_replays`]); returns whether it keeps one.
    /// BFT mode calls it on every copy of the machine before the first op it applies, since
    /// a Byzantine leader may propose a client's old signed request again. The default keeps
    /// no sessions: `false` (the machine's own idempotency is then all there is).
    fn refuse_session_replays(&mut self) -> bool {
        false
    }

    /// The counters of this machine's session table, if it keeps one (not replicated state:
    /// they restart at a restore). The runtime exports them. The default keeps none.
    fn session_stats(&self) -> Option<crate::session::SessionStats> {
        None
    }

    /// The next message for another shard produced by `apply`, oldest first.
    fn poll_outbound(&mut self) -> Option<Outbound<Self::Operation, Self::Record>>;

    /// BFT mode: whether outputs this machine emitted (`records` of `operation`, as
    /// [`StateMachine::poll_outbound`] gave them) need no further delivery, so the runtime
    /// may stop certifying and resending them (`docs/bft.md` §14). Must answer from
    /// replicated state only. The default, for a machine whose messages need no
    /// confirmation: settled.
    fn outputs_settled(&self, operation: Self::Operation, records: &[Self::Record]) -> bool {
        let _ = (operation, records);
        true
    }

    /// Every message already produced whose delivery is not yet confirmed, exactly as first
    /// sent, oldest first. The runtime resends them after recovery (messages drained from
    /// `poll_outbound` before a crash may never have arrived); receivers must deduplicate.
    /// Machines that send nothing to other shards keep the default.
    fn unconfirmed_outbound(&self, each: &mut dyn FnMut(Outbound<Self::Operation, Self::Record>)) {
        let _ = each;
    }

    /// Appends a self-describing snapshot of the replicated state to `out`.
    fn snapshot(&self, out: &mut Vec<u8>);

    /// [`StateMachine::snapshot`] and [`StateMachine::digest`] together, for whoever needs
    /// both (checkpoints). A machine whose snapshot embeds its digest overrides it to hash
    /// its state once instead of twice.
    fn snapshot_and_digest(&self, out: &mut Vec<u8>) -> Digest256 {
        self.snapshot(out);
        self.digest()
    }

    /// The most bytes `snapshot` can append for this machine's configuration (its tables
    /// full), if bounded: whoever takes snapshots sizes its buffer once, at start-up.
    /// Machines that cannot tell keep the default, and the buffer grows when needed.
    fn snapshot_bytes_max(&self) -> Option<usize> {
        None
    }

    /// Replaces the state with a snapshot taken by `snapshot`.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError>;

    /// Digest of the canonical replicated state (independent of memory layout), for
    /// comparing replicas.
    fn digest(&self) -> Digest256;

    /// Digest of the settings that decide results (a bound whose value changes what a batch
    /// returns, such as the width of a duplicate-detection window or of a session table).
    /// Every replica of a shard must use the same: the runtime puts this digest in the peer
    /// handshake, and replicas whose digests differ refuse each other, instead of
    /// diverging at the first batch the settings decide; each journal records it too, and a
    /// node restarted under another digest is refused before it replays (ops replayed under
    /// other settings could reach another state than the one acknowledged). Machines whose
    /// results depend on no setting keep the default.
    fn settings_digest(&self) -> u64 {
        0
    }
}
