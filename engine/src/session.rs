//! Client sessions: a retried request is applied once and answered with its original reply,
//! also when the retry reaches another leader (docs/protocol.md section 10).
//!
//! Every client request the runtime can keep whole in one batch travels in the journal
//! entry with a [`RequestDescriptor`]: the client's id, its request number and the records
//! of the batch that are the request. Applying an entry, every replica consults and updates
//! the same [`SessionTable`] (replicated state, in the snapshot and the digest), so whichever
//! replica leads later knows which requests were applied and what they answered:
//!
//! * a request number above the client's highest applied one is **applied**, and its results
//!   are kept as the reply;
//! * a request number the table holds a reply for is a **retry**: its records are not applied
//!   again, and the retry is answered with the kept results;
//! * a request the table cannot answer is applied again, and the state machine's own
//!   idempotency (the ledger's transfer ids) then answers `Exists`: the documented fallback.
//!   That happens when the client's session was evicted to make room for another client
//!   (counted in [`SessionStats::evicted`]; the request then starts a new session), or
//!   when the number is older than the kept window ([`SessionStats::fallbacks`]).
//!
//! A table that **refuses replays** ([`SessionTable::refuse_replays`], BFT mode, where a
//! Byzantine leader may propose a client's old signed request again) has no fallback: it
//! never evicts (a new client in a full table is refused), and a request at or below its
//! session's highest number is applied only if the table can tell it never was, that is
//! when it is inside the reply window ([`SESSION_REPLIES_PER_CLIENT`] numbers) and its reply
//! slot holds an older number. Anything else is [`Disposition::Refused`]: nothing applied,
//! [`StateMachine::refused_result`] as results, counted in [`SessionStats::refused`]. A
//! correct client's request in flight is never refused as long as its requests in flight
//! to one shard stay within a window of that many numbers: it sends number `n + 4` there
//! only once `n` is answered (the Rust `BftClient` keeps one request in flight). Within
//! one entry, "highest" counts the requests applied earlier in it too
//! (`tests/session_replays.rs` checks all of this against a leader that reorders,
//! duplicates and replays requests at will).
//!
//! There is no registration: a client id the table does not know starts a session with
//! whatever request number it sends (a client numbers its requests across every shard).
//!
//! A client keeps at most [`SESSION_REPLIES_PER_CLIENT`] requests in flight (the Rust client's
//! window is bounded by it), so a retry of an unanswered request always finds its reply.
//! The table holds `clients_max` sessions; a new client in a full table evicts the session
//! whose last request applied longest ago (ties by client id): the same choice on every
//! replica. All memory is taken at construction.
//!
//! [`Sessioned`] wraps any [`StateMachine`] with a table, so the checkpoint, the snapshot that
//! state sync moves, and the digest that compares replicas all cover the sessions too.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use bytemuck::{Pod, Zeroable};

use crate::checksum::{Digest256, Digest256Hasher};
use crate::state_machine::{Outbound, RestoreError, StateMachine};

/// Size of one [`RequestDescriptor`] on disk and on the wire (bytes).
pub const REQUEST_DESCRIPTOR_BYTES: usize = 32;
/// Replies kept per client: the most requests one client may have in flight.
pub const SESSION_REPLIES_PER_CLIENT: usize = 4;
/// Default number of client sessions per shard.
pub const SESSION_CLIENTS_MAX_DEFAULT: usize = 64;

const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"PCSS");
const SNAPSHOT_VERSION: u32 = 1;
/// Trailer of a [`Sessioned`] snapshot: the inner snapshot's length and the table's.
const SNAPSHOT_TRAILER_BYTES: usize = 16;
/// Header of a [`SessionTable`] snapshot: magic, version, sessions, `records_max` (`u32`
/// each).
const TABLE_SNAPSHOT_HEADER_BYTES: usize = 4 * size_of::<u32>();
/// Each session's slot index in a [`SessionTable`] snapshot (`u32`).
const TABLE_SNAPSHOT_INDEX_BYTES: usize = size_of::<u32>();

/// One client request inside a journal entry: records `record_start ..
/// record_start + record_count` of the entry are request `request_number` of `client_id`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct RequestDescriptor {
    /// The client's identity (the frame's `client_id`; never 0).
    pub client_id: u128,
    /// The client's request number (≥ 1, increasing per client).
    pub request_number: u64,
    /// Index of the request's first record in the entry.
    pub record_start: u32,
    /// Records of the request (≥ 1).
    pub record_count: u32,
}

const _: () = assert!(size_of::<RequestDescriptor>() == REQUEST_DESCRIPTOR_BYTES);

/// What applying an entry does with one of its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Apply the records; keep the results as the reply.
    Apply,
    /// A retry answered from the table: reply slot `slot` (do not apply the records).
    Replay {
        /// Index of the kept reply.
        slot: usize,
    },
    /// A retry of a request applied earlier in the same entry (the `index`-th descriptor):
    /// copy its results.
    ReplayInEntry {
        /// The earlier descriptor.
        index: usize,
    },
    /// No reply kept (evicted session or too old a number): apply again, no reply kept.
    Fallback,
    /// A table that refuses replays cannot tell that this request never applied, or has
    /// no room for a new client: apply nothing, answer [`StateMachine::refused_result`].
    Refused,
}

/// Counters of a session table (not replicated state: not in the digest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Requests applied and kept as replies.
    pub applied: u64,
    /// Retries answered with a kept reply.
    pub replayed: u64,
    /// Requests the table could not answer and applied again.
    pub fallbacks: u64,
    /// Sessions evicted to make room for a new client.
    pub evicted: u64,
    /// Requests refused unapplied by a table that refuses replays.
    pub refused: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct Session {
    /// 0: the slot is free.
    client_id: u128,
    /// Highest request number applied.
    request_number_max: u64,
    /// Op that applied it (eviction order).
    op_last: u64,
    /// Request number kept in each reply slot (0: none), slot = number % replies.
    reply_numbers: [u64; SESSION_REPLIES_PER_CLIENT],
    /// Results in each reply slot.
    reply_counts: [u32; SESSION_REPLIES_PER_CLIENT],
}

/// The replicated table of client sessions. See the module docs.
pub struct SessionTable<R: Pod> {
    sessions: Box<[Session]>,
    /// `clients_max * SESSION_REPLIES_PER_CLIENT * records_max` results.
    replies: Box<[R]>,
    records_max: usize,
    stats: SessionStats,
    /// See [`SessionTable::refuse_replays`].
    refuse_replays: bool,
}

impl<R: Pod> std::fmt::Debug for SessionTable<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("clients_max", &self.sessions.len())
            .field("records_max", &self.records_max)
            .field("stats", &self.stats)
            .field("refuse_replays", &self.refuse_replays)
            .finish_non_exhaustive()
    }
}

impl<R: Pod> SessionTable<R> {
    /// A table of `clients_max` sessions whose replies hold up to `records_max` results
    /// each (the batch's entry cap: a request with a descriptor fits one batch).
    ///
    /// # Panics
    /// If `clients_max` or `records_max` is zero.
    pub fn new(clients_max: usize, records_max: usize) -> Self {
        assert!(clients_max > 0 && records_max > 0);
        Self {
            sessions: vec![Session::zeroed(); clients_max].into_boxed_slice(),
            replies: bytemuck::allocation::zeroed_slice_box(
                clients_max * SESSION_REPLIES_PER_CLIENT * records_max,
            ),
            records_max,
            stats: SessionStats::default(),
            refuse_replays: false,
        }
    }

    /// From now on: never evict, and refuse what cannot be told apart from a replay (see
    /// the module docs). Every replica of a group must agree, from the first op: the
    /// dispositions decide the state.
    pub fn refuse_replays(&mut self) {
        self.refuse_replays = true;
    }

    /// Whether [`SessionTable::refuse_replays`] was called.
    pub fn refuses_replays(&self) -> bool {
        self.refuse_replays
    }

    /// Sessions a new client may still take without an eviction.
    pub fn free(&self) -> usize {
        self.sessions.len() - self.len()
    }

    /// Sessions the table holds at most.
    pub fn clients_max(&self) -> usize {
        self.sessions.len()
    }

    /// Results one reply holds at most.
    pub fn records_max(&self) -> usize {
        self.records_max
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.sessions.iter().filter(|s| s.client_id != 0).count()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find(&self, client_id: u128) -> Option<usize> {
        self.sessions.iter().position(|s| s.client_id == client_id)
    }

    /// The highest request number applied for `client_id`, if it has a session.
    pub fn request_number_max(&self, client_id: u128) -> Option<u64> {
        self.find(client_id)
            .map(|index| self.sessions[index].request_number_max)
    }

    /// What to do with `descriptor` (read-only: call [`SessionTable::commit`] after applying).
    ///
    /// A table that refuses replays answers [`Disposition::Apply`] for a client without a
    /// session even when it is full: the caller refuses it when no session is free for it
    /// (several new clients in one entry share what [`SessionTable::free`] says).
    pub fn classify(&self, descriptor: &RequestDescriptor) -> Disposition {
        let Some(index) = self.find(descriptor.client_id) else {
            // A new client, or one whose session was evicted: a retry of the latter is
            // applied again (the documented fallback; evictions are counted). A table that
            // refuses replays never evicted it: it never applied a request of this client.
            return Disposition::Apply;
        };
        let session = &self.sessions[index];
        if descriptor.request_number > session.request_number_max {
            return Disposition::Apply;
        }
        let reply = reply_slot(descriptor.request_number);
        let kept = session.reply_numbers[reply];
        if kept == descriptor.request_number
            && session.reply_counts[reply] == descriptor.record_count
        {
            return Disposition::Replay {
                slot: index * SESSION_REPLIES_PER_CLIENT + reply,
            };
        }
        if !self.refuse_replays {
            return Disposition::Fallback;
        }
        // Inside the window, a slot holding an older number proves this one never applied:
        // had it, the slot would hold it or a number a whole window above it, which would be
        // above the session's highest.
        if inside_window(session.request_number_max, descriptor.request_number)
            && kept < descriptor.request_number
        {
            Disposition::Apply
        } else {
            Disposition::Refused
        }
    }

    /// The kept results of reply `slot` (from [`Disposition::Replay`]).
    pub fn reply(&self, slot: usize) -> &[R] {
        let session = &self.sessions[slot / SESSION_REPLIES_PER_CLIENT];
        let count = session.reply_counts[slot % SESSION_REPLIES_PER_CLIENT] as usize;
        let start = slot * self.records_max;
        &self.replies[start..start + count]
    }

    /// Records the outcome of `descriptor`, applied (or replayed) in `op` with `results`.
    /// Counts the disposition; keeps the reply of an applied request.
    pub fn commit(
        &mut self,
        op: u64,
        descriptor: &RequestDescriptor,
        disposition: Disposition,
        results: &[R],
    ) {
        match disposition {
            Disposition::Replay { .. } | Disposition::ReplayInEntry { .. } => {
                self.stats.replayed += 1;
                return;
            }
            Disposition::Fallback => {
                self.stats.fallbacks += 1;
                return;
            }
            Disposition::Refused => {
                self.stats.refused += 1;
                return;
            }
            Disposition::Apply => self.stats.applied += 1,
        }
        assert!(
            results.len() <= self.records_max,
            "reply larger than a batch"
        );
        let index = match self.find(descriptor.client_id) {
            Some(index) => index,
            None => self.admit(descriptor.client_id),
        };
        let session = &mut self.sessions[index];
        session.request_number_max = session.request_number_max.max(descriptor.request_number);
        session.op_last = op;
        let reply = reply_slot(descriptor.request_number);
        session.reply_numbers[reply] = descriptor.request_number;
        session.reply_counts[reply] = results.len() as u32;
        let start = (index * SESSION_REPLIES_PER_CLIENT + reply) * self.records_max;
        self.replies[start..start + results.len()].copy_from_slice(results);
    }

    /// A slot for a new client: a free one, else the least recently used (ties by id).
    fn admit(&mut self, client_id: u128) -> usize {
        let index = match self.sessions.iter().position(|s| s.client_id == 0) {
            Some(free) => free,
            None => {
                assert!(
                    !self.refuse_replays,
                    "a table that refuses replays admitted a client it has no room for"
                );
                self.stats.evicted += 1;
                (0..self.sessions.len())
                    .min_by_key(|&i| (self.sessions[i].op_last, self.sessions[i].client_id))
                    .expect("clients_max > 0")
            }
        };
        self.sessions[index] = Session {
            client_id,
            ..Session::zeroed()
        };
        index
    }

    /// Empties the table (counters too).
    pub fn clear(&mut self) {
        self.sessions.fill(Session::zeroed());
        self.stats = SessionStats::default();
    }

    /// Bytes [`SessionTable::snapshot`] appends at most (every session live, every reply
    /// of `records_max` results).
    pub fn snapshot_bytes_max(&self) -> usize {
        TABLE_SNAPSHOT_HEADER_BYTES
            + self.sessions.len()
                * (TABLE_SNAPSHOT_INDEX_BYTES
                    + size_of::<Session>()
                    + SESSION_REPLIES_PER_CLIENT * self.records_max * size_of::<R>())
    }

    /// Appends the live sessions, in slot order, with their kept replies: header (magic,
    /// version, sessions, records_max), then per session its fixed part and each kept
    /// reply's results.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&SNAPSHOT_MAGIC.to_le_bytes());
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.records_max as u32).to_le_bytes());
        for (index, session) in self.sessions.iter().enumerate() {
            if session.client_id == 0 {
                continue;
            }
            out.extend_from_slice(&(index as u32).to_le_bytes());
            out.extend_from_slice(bytemuck::bytes_of(session));
            for reply in 0..SESSION_REPLIES_PER_CLIENT {
                let slot = index * SESSION_REPLIES_PER_CLIENT + reply;
                let count = session.reply_counts[reply] as usize;
                let first = slot * self.records_max;
                out.extend_from_slice(bytemuck::cast_slice(&self.replies[first..first + count]));
            }
        }
        debug_assert!(out.len() - start <= self.snapshot_bytes_max());
    }

    /// Replaces the table with a snapshot from [`SessionTable::snapshot`]; the counters
    /// restart at zero. On an error the table is left empty.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        self.clear();
        let restored = self.restore_into_empty(bytes);
        if restored.is_err() {
            self.clear();
        }
        restored
    }

    fn restore_into_empty(&mut self, mut bytes: &[u8]) -> Result<(), RestoreError> {
        let mut take = |n: usize| -> Result<&[u8], RestoreError> {
            if bytes.len() < n {
                return Err(RestoreError::Corrupt);
            }
            let (head, rest) = bytes.split_at(n);
            bytes = rest;
            Ok(head)
        };
        let word = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let magic = word(take(4)?);
        if magic != SNAPSHOT_MAGIC {
            return Err(RestoreError::BadMagic { magic });
        }
        let version = word(take(4)?);
        if version != SNAPSHOT_VERSION {
            return Err(RestoreError::UnsupportedVersion { version });
        }
        let count = word(take(4)?) as usize;
        // The writer's `records_max`: informative; each reply is checked against ours.
        let _records_max = word(take(4)?);
        if count > self.sessions.len() {
            return Err(RestoreError::CapacityExceeded);
        }
        let mut previous: Option<usize> = None;
        for _ in 0..count {
            let index = word(take(4)?) as usize;
            if index >= self.sessions.len() || previous.is_some_and(|p| p >= index) {
                return Err(RestoreError::Corrupt);
            }
            previous = Some(index);
            let session: Session = bytemuck::pod_read_unaligned(take(size_of::<Session>())?);
            if session.client_id == 0 {
                return Err(RestoreError::Corrupt);
            }
            for reply in 0..SESSION_REPLIES_PER_CLIENT {
                let count = session.reply_counts[reply] as usize;
                if count > self.records_max {
                    return Err(RestoreError::Corrupt);
                }
                let start = (index * SESSION_REPLIES_PER_CLIENT + reply) * self.records_max;
                let source = take(count * size_of::<R>())?;
                bytemuck::cast_slice_mut::<R, u8>(&mut self.replies[start..start + count])
                    .copy_from_slice(source);
            }
            self.sessions[index] = session;
        }
        if !bytes.is_empty() {
            return Err(RestoreError::LengthMismatch {
                bytes: bytes.len(),
                expected: 0,
            });
        }
        Ok(())
    }

    /// Feeds the replicated content (live sessions in slot order and their kept replies;
    /// never the counters) to `hasher`.
    pub fn digest_into(&self, hasher: &mut Digest256Hasher) {
        hasher.update(b"percore.sessions.v1");
        for (index, session) in self.sessions.iter().enumerate() {
            if session.client_id == 0 {
                continue;
            }
            hasher.update(&(index as u32).to_le_bytes());
            hasher.update(bytemuck::bytes_of(session));
            for reply in 0..SESSION_REPLIES_PER_CLIENT {
                let count = session.reply_counts[reply] as usize;
                let start = (index * SESSION_REPLIES_PER_CLIENT + reply) * self.records_max;
                hasher.update(bytemuck::cast_slice(&self.replies[start..start + count]));
            }
        }
    }
}

/// Whether `request_number`, at or below a client's `highest`, is inside the reply window
/// below it (fewer than [`SESSION_REPLIES_PER_CLIENT`] numbers behind; no overflow).
fn inside_window(highest: u64, request_number: u64) -> bool {
    highest.saturating_sub(request_number) < SESSION_REPLIES_PER_CLIENT as u64
}

fn reply_slot(request_number: u64) -> usize {
    (request_number % SESSION_REPLIES_PER_CLIENT as u64) as usize
}

/// Checks an entry's descriptors against its record count: each request non-empty, inside
/// the entry, in record order and not overlapping, with a nonzero client id. The journal and
/// the peer protocol verify checksums, not meaning: a leader's bug must not become an
/// out-of-bounds apply on every replica.
pub fn descriptors_valid(descriptors: &[RequestDescriptor], records: usize) -> bool {
    let mut next = 0u64;
    descriptors.iter().all(|d| {
        let start = u64::from(d.record_start);
        let end = start + u64::from(d.record_count);
        let ok = d.client_id != 0 && d.record_count > 0 && start >= next && end <= records as u64;
        next = end;
        ok
    })
}

/// [`StateMachine::settings_digest`] of a [`Sessioned`] machine of `clients_max` sessions
/// whose inner machine's digest is `inner`: the width decides which client's session a new
/// one evicts, so which retries are still answered.
pub fn settings_digest(clients_max: usize, inner: u64) -> u64 {
    let mut hasher = crate::checksum::Digest256Hasher::new();
    hasher
        .update(b"percore.sessions.settings.v1")
        .update(&(clients_max as u64).to_le_bytes())
        .update(&inner.to_le_bytes());
    hasher.finalize_u64()
}

/// A state machine with a client session table: see the module docs. Everything but
/// [`StateMachine::apply_requests`], the snapshot and the digest is the inner machine's.
pub struct Sessioned<S: StateMachine> {
    inner: S,
    sessions: SessionTable<S::Result>,
    dispositions: Box<[Disposition]>,
    /// Requests of the last entry applied (their dispositions lead `dispositions`).
    last_requests: usize,
    /// Records to apply when some requests of an entry are retries (compacted).
    scratch_records: Box<[S::Record]>,
    scratch_results: Box<[S::Result]>,
}

impl<S: StateMachine> std::fmt::Debug for Sessioned<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessioned")
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Sessioned<S> {
    /// Wraps `inner` with a table of `clients_max` sessions for batches of at most
    /// `records_max` records.
    pub fn new(inner: S, clients_max: usize, records_max: usize) -> Self {
        Self {
            inner,
            sessions: SessionTable::new(clients_max, records_max),
            dispositions: vec![Disposition::Apply; records_max].into_boxed_slice(),
            last_requests: 0,
            scratch_records: bytemuck::allocation::zeroed_slice_box(records_max),
            scratch_results: bytemuck::allocation::zeroed_slice_box(records_max),
        }
    }

    /// The wrapped machine.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The session table.
    pub fn sessions(&self) -> &SessionTable<S::Result> {
        &self.sessions
    }

    /// What the last [`StateMachine::apply_requests`] did with each of its requests (a
    /// checker counts the records a retry did not apply again).
    pub fn last_dispositions(&self) -> &[Disposition] {
        &self.dispositions[..self.last_requests]
    }
}

impl<S: StateMachine> StateMachine for Sessioned<S> {
    type Operation = S::Operation;
    type Record = S::Record;
    type Result = S::Result;

    fn client_operation(code: u16) -> Option<Self::Operation> {
        S::client_operation(code)
    }

    fn route(operation: Self::Operation, record: &Self::Record, shard_count: u32) -> u32 {
        S::route(operation, record, shard_count)
    }

    fn crosses_shards(operation: Self::Operation, record: &Self::Record, shard_count: u32) -> bool {
        S::crosses_shards(operation, record, shard_count)
    }

    fn unprepare(operation: Self::Operation, record: &mut Self::Record) {
        S::unprepare(operation, record);
    }

    fn prepare(&mut self, operation: Self::Operation, now_ns: u64, records: &mut [Self::Record]) {
        self.inner.prepare(operation, now_ns, records);
    }

    fn stamp_internal(
        &self,
        operation: Self::Operation,
        now_ns: u64,
        records: &mut [Self::Record],
    ) {
        self.inner.stamp_internal(operation, now_ns, records);
    }

    fn outputs_settled(&self, operation: Self::Operation, records: &[Self::Record]) -> bool {
        self.inner.outputs_settled(operation, records)
    }

    fn reserve_internal(
        &mut self,
        operation: Self::Operation,
        now_ns: u64,
        records: &mut [Self::Record],
    ) -> u64 {
        self.inner.reserve_internal(operation, now_ns, records)
    }

    fn apply(
        &mut self,
        op: u64,
        operation: Self::Operation,
        records: &[Self::Record],
        results: &mut [Self::Result],
    ) {
        self.last_requests = 0;
        self.inner.apply(op, operation, records, results);
    }

    fn apply_requests(
        &mut self,
        op: u64,
        operation: Self::Operation,
        records: &[Self::Record],
        requests: &[RequestDescriptor],
        results: &mut [Self::Result],
    ) {
        assert!(
            descriptors_valid(requests, records.len()),
            "descriptors verified before apply"
        );
        let mut retries = false;
        self.last_requests = requests.len();
        // Clients seen in this entry so far, as a 64-bit filter: most entries hold each
        // client once, and then no earlier descriptor needs scanning.
        let mut seen = 0u64;
        // A table that refuses replays: sessions still free for new clients of this entry,
        // counted when one first needs one.
        let mut free = None;
        for (index, request) in requests.iter().enumerate() {
            let bit = 1u64 << (request.client_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 122);
            let first = seen & bit == 0;
            let mut disposition = if first {
                self.sessions.classify(request)
            } else {
                self.classify_after_earlier(requests, index)
            };
            seen |= bit;
            if disposition == Disposition::Apply
                && self.sessions.refuses_replays()
                && self
                    .sessions
                    .request_number_max(request.client_id)
                    .is_none()
                && (first || !self.applied_earlier(requests, index))
            {
                let free = free.get_or_insert_with(|| self.sessions.free());
                match free.checked_sub(1) {
                    Some(left) => *free = left,
                    None => disposition = Disposition::Refused,
                }
            }
            retries |= !matches!(disposition, Disposition::Apply | Disposition::Fallback);
            self.dispositions[index] = disposition;
        }
        if !retries {
            self.inner.apply(op, operation, records, results);
        } else {
            // Apply every record except the retried requests', as one batch, in order.
            let mut kept = 0;
            let mut next_request = 0;
            for (index, record) in records.iter().enumerate() {
                while next_request < requests.len()
                    && (requests[next_request].record_start + requests[next_request].record_count)
                        as usize
                        <= index
                {
                    next_request += 1;
                }
                let retried = requests.get(next_request).is_some_and(|r| {
                    r.record_start as usize <= index
                        && !matches!(
                            self.dispositions[next_request],
                            Disposition::Apply | Disposition::Fallback
                        )
                });
                if !retried {
                    self.scratch_records[kept] = *record;
                    kept += 1;
                }
            }
            if kept > 0 {
                self.inner.apply(
                    op,
                    operation,
                    &self.scratch_records[..kept],
                    &mut self.scratch_results[..kept],
                );
            }
            // Scatter: applied results in order, retried requests' kept replies.
            let mut taken = 0;
            let mut next_request = 0;
            let mut index = 0;
            while index < records.len() {
                while next_request < requests.len()
                    && (requests[next_request].record_start + requests[next_request].record_count)
                        as usize
                        <= index
                {
                    next_request += 1;
                }
                let request = requests.get(next_request);
                let inside = request.is_some_and(|r| r.record_start as usize <= index);
                match (inside, self.dispositions.get(next_request)) {
                    (true, Some(Disposition::Replay { slot })) => {
                        let r = request.expect("inside");
                        let count = r.record_count as usize;
                        results[index..index + count].copy_from_slice(self.sessions.reply(*slot));
                        index += count;
                    }
                    (true, Some(Disposition::ReplayInEntry { index: earlier })) => {
                        let count = request.expect("inside").record_count as usize;
                        let source = requests[*earlier].record_start as usize;
                        results.copy_within(source..source + count, index);
                        index += count;
                    }
                    (true, Some(Disposition::Refused)) => {
                        let count = request.expect("inside").record_count as usize;
                        for (at, result) in results[index..index + count].iter_mut().enumerate() {
                            *result = S::refused_result((index + at) as u32);
                        }
                        index += count;
                    }
                    _ => {
                        results[index] = self.scratch_results[taken];
                        taken += 1;
                        index += 1;
                    }
                }
            }
            debug_assert_eq!(taken, kept);
        }
        for (index, request) in requests.iter().enumerate() {
            let start = request.record_start as usize;
            let end = start + request.record_count as usize;
            self.sessions
                .commit(op, request, self.dispositions[index], &results[start..end]);
        }
    }

    fn session_stale(&self, client_id: u128, request_number: u64, record_count: u32) -> bool {
        client_id != 0
            && matches!(
                self.sessions.classify(&RequestDescriptor {
                    client_id,
                    request_number,
                    record_start: 0,
                    record_count,
                }),
                Disposition::Fallback | Disposition::Refused
            )
    }

    fn refused_result(index: u32) -> Self::Result {
        S::refused_result(index)
    }

    fn session_stats(&self) -> Option<SessionStats> {
        Some(self.sessions.stats())
    }

    /// Makes the session table refuse replays ([`SessionTable::refuse_replays`]).
    fn refuse_session_replays(&mut self) -> bool {
        self.sessions.refuse_replays();
        true
    }

    fn session_reply(
        &self,
        client_id: u128,
        request_number: u64,
        record_count: u32,
    ) -> Option<&[Self::Result]> {
        if client_id == 0 || record_count == 0 {
            return None;
        }
        let descriptor = RequestDescriptor {
            client_id,
            request_number,
            record_start: 0,
            record_count,
        };
        match self.sessions.classify(&descriptor) {
            Disposition::Replay { slot } => Some(self.sessions.reply(slot)),
            _ => None,
        }
    }

    fn poll_outbound(&mut self) -> Option<Outbound<Self::Operation, Self::Record>> {
        self.inner.poll_outbound()
    }

    fn unconfirmed_outbound(&self, each: &mut dyn FnMut(Outbound<Self::Operation, Self::Record>)) {
        self.inner.unconfirmed_outbound(each);
    }

    /// The inner snapshot, then the table's, then both lengths (16 bytes).
    fn snapshot(&self, out: &mut Vec<u8>) {
        let _ = self.snapshot_and_digest(out);
    }

    fn snapshot_and_digest(&self, out: &mut Vec<u8>) -> Digest256 {
        let start = out.len();
        let inner_digest = self.inner.snapshot_and_digest(out);
        let inner_bytes = out.len() - start;
        self.sessions.snapshot(out);
        let table_bytes = out.len() - start - inner_bytes;
        out.extend_from_slice(&(inner_bytes as u64).to_le_bytes());
        out.extend_from_slice(&(table_bytes as u64).to_le_bytes());
        self.digest_with(inner_digest)
    }

    fn snapshot_bytes_max(&self) -> Option<usize> {
        let inner = self.inner.snapshot_bytes_max()?;
        Some(inner + self.sessions.snapshot_bytes_max() + SNAPSHOT_TRAILER_BYTES)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let Some(split) = bytes.len().checked_sub(SNAPSHOT_TRAILER_BYTES) else {
            return Err(RestoreError::LengthMismatch {
                bytes: bytes.len(),
                expected: SNAPSHOT_TRAILER_BYTES,
            });
        };
        let (body, trailer) = bytes.split_at(split);
        let length = |b: &[u8]| {
            usize::try_from(u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .map_err(|_| RestoreError::Corrupt)
        };
        let inner_bytes = length(&trailer[..8])?;
        let table_bytes = length(&trailer[8..])?;
        if inner_bytes.checked_add(table_bytes) != Some(body.len()) {
            return Err(RestoreError::LengthMismatch {
                bytes: body.len(),
                expected: inner_bytes.saturating_add(table_bytes),
            });
        }
        let (inner, table) = body.split_at(inner_bytes);
        self.inner.restore(inner)?;
        self.sessions.restore(table)
    }

    fn digest(&self) -> Digest256 {
        self.digest_with(self.inner.digest())
    }

    /// [`settings_digest`] of the table's width and the inner machine's digest.
    fn settings_digest(&self) -> u64 {
        settings_digest(self.sessions.clients_max(), self.inner.settings_digest())
    }
}

impl<S: StateMachine> Sessioned<S> {
    /// Classifies `requests[index]` when the same client has requests earlier in the entry,
    /// which the table does not show yet (it is updated after the entry applies).
    fn classify_after_earlier(&self, requests: &[RequestDescriptor], index: usize) -> Disposition {
        let request = &requests[index];
        let mut applied_max = None;
        for (earlier, other) in requests[..index].iter().enumerate() {
            if other.client_id != request.client_id
                || self.dispositions[earlier] != Disposition::Apply
            {
                continue;
            }
            if other.request_number == request.request_number {
                return if other.record_count == request.record_count {
                    Disposition::ReplayInEntry { index: earlier }
                } else if self.sessions.refuses_replays() {
                    Disposition::Refused
                } else {
                    Disposition::Fallback
                };
            }
            applied_max = applied_max.max(Some(other.request_number));
        }
        // Above every number applied, in the table and earlier in this entry: new. (Only
        // the entry's is not enough: a table that refuses replays applies a number below the
        // table's highest that never applied, and a copy of the table's highest after it
        // would then pass for new.)
        let table_max = self.sessions.request_number_max(request.client_id);
        match applied_max {
            Some(max)
                if request.request_number > max
                    && table_max.is_none_or(|table_max| request.request_number > table_max) =>
            {
                Disposition::Apply
            }
            // The table's highest does not count this entry's: a number a whole window
            // behind one applied earlier here is refused as in a later entry (applied, it
            // would take that one's reply slot, and that one would then apply again).
            Some(max)
                if self.sessions.refuses_replays()
                    && !inside_window(max, request.request_number) =>
            {
                Disposition::Refused
            }
            _ => self.sessions.classify(request),
        }
    }

    /// Whether a request of `requests[index]`'s client earlier in the entry was applied.
    fn applied_earlier(&self, requests: &[RequestDescriptor], index: usize) -> bool {
        let client_id = requests[index].client_id;
        requests[..index]
            .iter()
            .zip(&self.dispositions[..index])
            .any(|(other, disposition)| {
                other.client_id == client_id && *disposition == Disposition::Apply
            })
    }

    fn digest_with(&self, inner: Digest256) -> Digest256 {
        let mut hasher = Digest256Hasher::new();
        hasher.update(b"percore.sessioned.v1").update(&inner);
        self.sessions.digest_into(&mut hasher);
        hasher.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A machine that adds each record to a running sum and answers the sum after it: any
    /// record applied twice shows in every later result.
    #[derive(Default)]
    struct Sum {
        total: u64,
        applied: u64,
        op_last: u64,
    }

    impl StateMachine for Sum {
        type Operation = u16;
        type Record = u64;
        type Result = u64;

        fn client_operation(code: u16) -> Option<u16> {
            Some(code)
        }

        fn route(_: u16, _: &u64, _: u32) -> u32 {
            0
        }

        fn prepare(&mut self, _: u16, _: u64, _: &mut [u64]) {}

        fn apply(&mut self, op: u64, _: u16, records: &[u64], results: &mut [u64]) {
            assert!(op > self.op_last, "one apply per op");
            self.op_last = op;
            for (record, result) in records.iter().zip(results.iter_mut()) {
                self.total += record;
                self.applied += 1;
                *result = self.total;
            }
        }

        fn poll_outbound(&mut self) -> Option<Outbound<u16, u64>> {
            None
        }

        fn snapshot(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.total.to_le_bytes());
            out.extend_from_slice(&self.applied.to_le_bytes());
            out.extend_from_slice(&self.op_last.to_le_bytes());
        }

        fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
            if bytes.len() != 24 {
                return Err(RestoreError::Corrupt);
            }
            let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8"));
            (self.total, self.applied, self.op_last) = (word(0), word(8), word(16));
            Ok(())
        }

        fn digest(&self) -> Digest256 {
            let mut bytes = Vec::new();
            self.snapshot(&mut bytes);
            crate::checksum::digest256(&bytes)
        }

        fn refused_result(index: u32) -> u64 {
            REFUSED + u64::from(index)
        }
    }

    /// [`Sum`]'s refused results, plus the record's index: no sum reaches them.
    const REFUSED: u64 = 1 << 60;

    fn request(client_id: u128, request_number: u64, start: u32, count: u32) -> RequestDescriptor {
        RequestDescriptor {
            client_id,
            request_number,
            record_start: start,
            record_count: count,
        }
    }

    fn apply(
        machine: &mut Sessioned<Sum>,
        op: u64,
        records: &[u64],
        requests: &[RequestDescriptor],
    ) -> Vec<u64> {
        let mut results = vec![0; records.len()];
        machine.apply_requests(op, 0, records, requests, &mut results);
        results
    }

    #[test]
    fn a_retry_in_a_later_entry_gets_the_original_reply_and_applies_nothing() {
        let mut machine = Sessioned::new(Sum::default(), 4, 16);
        let first = apply(&mut machine, 1, &[1, 2], &[request(7, 1, 0, 2)]);
        assert_eq!(first, [1, 3]);
        // Op 2: another client's request, then the retry of client 7's request 1.
        let second = apply(
            &mut machine,
            2,
            &[10, 1, 2],
            &[request(8, 1, 0, 1), request(7, 1, 1, 2)],
        );
        assert_eq!(second, [13, 1, 3], "the retry answers as first answered");
        assert_eq!(
            machine.inner().applied,
            3,
            "the retried records applied once"
        );
        assert_eq!(machine.sessions().stats().replayed, 1);
        // The next request of client 7 applies.
        assert_eq!(apply(&mut machine, 3, &[5], &[request(7, 2, 0, 1)]), [18]);
    }

    #[test]
    fn a_request_behind_its_session_with_no_reply_kept_is_stale() {
        let mut machine = Sessioned::new(Sum::default(), 4, 16);
        assert!(!machine.session_stale(7, 1, 1), "no session yet");
        for number in 1..=(SESSION_REPLIES_PER_CLIENT as u64 + 2) {
            apply(&mut machine, number, &[1], &[request(7, number, 0, 1)]);
        }
        let max = SESSION_REPLIES_PER_CLIENT as u64 + 2;
        assert!(
            machine.session_stale(7, 1, 1),
            "older than the reply window"
        );
        assert!(machine.session_stale(7, 2, 1));
        assert!(!machine.session_stale(7, max, 1), "its reply is kept");
        assert!(machine.session_stale(7, max, 2), "another record count");
        assert!(!machine.session_stale(7, max + 1, 1), "the next request");
        assert!(!machine.session_stale(8, 1, 1), "another client");
        assert!(!machine.session_stale(0, 1, 1), "no client id");
    }

    #[test]
    fn a_retry_in_the_same_entry_copies_the_first_results() {
        let mut machine = Sessioned::new(Sum::default(), 4, 16);
        let results = apply(
            &mut machine,
            1,
            &[1, 2, 100, 1, 2],
            &[
                request(7, 1, 0, 2),
                request(9, 1, 2, 1),
                request(7, 1, 3, 2),
            ],
        );
        assert_eq!(results, [1, 3, 103, 1, 3]);
        assert_eq!(machine.inner().total, 103);
    }

    #[test]
    fn records_outside_requests_apply_in_order_around_a_retry() {
        let mut machine = Sessioned::new(Sum::default(), 4, 16);
        apply(&mut machine, 1, &[1], &[request(7, 1, 0, 1)]);
        // An internal record, the retry, another internal record.
        let results = apply(&mut machine, 2, &[10, 1, 20], &[request(7, 1, 1, 1)]);
        assert_eq!(results, [11, 1, 31]);
    }

    #[test]
    fn the_window_keeps_the_last_replies_of_a_pipelining_client() {
        let mut machine = Sessioned::new(Sum::default(), 2, 4);
        for number in 1..=6u64 {
            apply(&mut machine, number, &[number], &[request(7, number, 0, 1)]);
        }
        // Requests 3..=6 (the last SESSION_REPLIES_PER_CLIENT) are answered from the table.
        let oldest_kept = 6 - SESSION_REPLIES_PER_CLIENT as u64 + 1;
        for number in oldest_kept..=6 {
            let expected: u64 = (1..=number).sum();
            assert_eq!(
                apply(
                    &mut machine,
                    6 + number,
                    &[number],
                    &[request(7, number, 0, 1)]
                ),
                [expected]
            );
        }
        assert_eq!(machine.inner().applied, 6);
        // Request 2 is too old: applied again (the documented fallback), and counted.
        apply(&mut machine, 20, &[2], &[request(7, 2, 0, 1)]);
        assert_eq!(machine.inner().applied, 7);
        assert_eq!(machine.sessions().stats().fallbacks, 1);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_session_the_same_way_everywhere() {
        let run = || {
            let mut machine = Sessioned::new(Sum::default(), 2, 4);
            apply(&mut machine, 1, &[1], &[request(1, 1, 0, 1)]);
            apply(&mut machine, 2, &[1], &[request(2, 1, 0, 1)]);
            apply(&mut machine, 3, &[1], &[request(1, 2, 0, 1)]);
            // Client 3 evicts client 2 (its last request applied longest ago).
            apply(&mut machine, 4, &[1], &[request(3, 1, 0, 1)]);
            machine
        };
        let (a, b) = (run(), run());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.sessions().request_number_max(2), None);
        assert_eq!(a.sessions().request_number_max(1), Some(2));
        assert_eq!(a.sessions().stats().evicted, 1);
        // Client 2's retry finds no session: applied again (the documented fallback; the
        // ledger's transfer ids answer `Exists`), and client 2 has a session again.
        let mut a = a;
        apply(&mut a, 5, &[1], &[request(2, 1, 0, 1)]);
        assert_eq!(a.inner().applied, 5);
        assert_eq!(a.sessions().request_number_max(2), Some(1));
        assert_eq!(a.sessions().stats().evicted, 2);
    }

    /// A Byzantine leader proposes a client's request again once its reply has left the
    /// window: a table that refuses replays applies nothing and answers refused, where the
    /// default table applies it a second time.
    #[test]
    fn a_table_refusing_replays_refuses_a_request_behind_its_window() {
        let run = |refuse: bool| {
            let mut machine = Sessioned::new(Sum::default(), 4, 4);
            if refuse {
                assert!(machine.refuse_session_replays());
            }
            for number in 1..=6 {
                apply(&mut machine, number, &[1], &[request(7, number, 0, 1)]);
            }
            // Request 1 again, inside an entry with another client's request.
            let results = apply(
                &mut machine,
                7,
                &[10, 1],
                &[request(8, 1, 0, 1), request(7, 1, 1, 1)],
            );
            (machine, results)
        };
        let (lenient, results) = run(false);
        assert_eq!(results, [16, 17], "applied again");
        assert_eq!(lenient.sessions().stats().fallbacks, 1);
        let (strict, results) = run(true);
        assert_eq!(results, [16, REFUSED + 1], "refused, nothing applied");
        assert_eq!(strict.inner().applied, 7);
        assert_eq!(strict.sessions().stats().refused, 1);
        assert_eq!(strict.sessions().stats().fallbacks, 0);
        assert_eq!(
            strict.last_dispositions(),
            [Disposition::Apply, Disposition::Refused]
        );
        // The door answers it stale too, in both; a request still in the window is not.
        for machine in [&lenient, &strict] {
            assert!(machine.session_stale(7, 1, 1));
            assert!(!machine.session_stale(7, 6, 1));
        }
        // Replayed alone, it applies nothing either.
        let mut strict = strict;
        assert_eq!(
            apply(&mut strict, 8, &[1], &[request(7, 2, 0, 1)]),
            [REFUSED]
        );
        assert_eq!(strict.inner().applied, 7);
    }

    /// Inside the window a slot holding an older number proves the request never applied:
    /// a client's request committed after a later one of its (a view change reordered them)
    /// still applies, once; the same number with another record count is refused.
    #[test]
    fn a_table_refusing_replays_applies_a_late_request_inside_its_window_once() {
        let mut machine = Sessioned::new(Sum::default(), 4, 4);
        machine.refuse_session_replays();
        apply(&mut machine, 1, &[1], &[request(7, 1, 0, 1)]);
        apply(&mut machine, 2, &[1], &[request(7, 3, 0, 1)]);
        apply(&mut machine, 3, &[1], &[request(7, 4, 0, 1)]);
        // Request 2 comes last: behind the session's highest (4), never applied.
        assert_eq!(apply(&mut machine, 4, &[5], &[request(7, 2, 0, 1)]), [8]);
        assert_eq!(machine.last_dispositions(), [Disposition::Apply]);
        // Its retry is answered from the table; with another record count, refused.
        assert_eq!(apply(&mut machine, 5, &[5], &[request(7, 2, 0, 1)]), [8]);
        assert_eq!(
            apply(&mut machine, 6, &[5, 5], &[request(7, 2, 0, 2)]),
            [REFUSED, REFUSED + 1]
        );
        // In one entry: a request applied, then the same number with another count.
        assert_eq!(
            apply(
                &mut machine,
                7,
                &[1, 1, 1],
                &[request(7, 5, 0, 1), request(7, 5, 1, 2)]
            ),
            [9, REFUSED + 1, REFUSED + 2]
        );
        assert_eq!(machine.inner().applied, 5);
        assert_eq!(machine.sessions().stats().refused, 2);
        assert_eq!(machine.sessions().request_number_max(7), Some(5));
    }

    /// Within one entry the table does not show the requests applied earlier in it: a
    /// lower number a whole window behind one applied earlier in the entry (a client's
    /// request that timed out and was given up, proposed after its later one) must be
    /// refused as it would be in a later entry. Applied, it would take the later one's
    /// reply slot, and that request proposed again would then apply a second time.
    #[test]
    fn a_table_refusing_replays_refuses_a_number_a_window_behind_one_applied_in_the_entry() {
        for known in [true, false] {
            let mut machine = Sessioned::new(Sum::default(), 4, 4);
            machine.refuse_session_replays();
            let mut op = 1;
            if known {
                apply(&mut machine, op, &[1], &[request(7, 8, 0, 1)]);
                op += 1;
            }
            let applied = machine.inner().applied;
            // Request 13, then request 9 (same reply slot), in one entry.
            let results = apply(
                &mut machine,
                op,
                &[1, 1],
                &[request(7, 13, 0, 1), request(7, 9, 1, 1)],
            );
            assert_eq!(results[1], REFUSED + 1, "known session: {known}");
            assert_eq!(machine.inner().applied, applied + 1);
            // Request 13 proposed again: answered from the table, not applied again.
            let replayed = apply(&mut machine, op + 1, &[1], &[request(7, 13, 0, 1)]);
            assert_eq!(replayed, [results[0]], "known session: {known}");
            assert_eq!(machine.inner().applied, applied + 1);
        }
    }

    /// A client's request numbers are its own (signed, not checked against anything):
    /// numbers at the top of the range are refused or applied like any other, never an
    /// overflow (a panic on every replica in a build that checks).
    #[test]
    fn a_table_refusing_replays_takes_request_numbers_at_the_top_of_the_range() {
        let mut machine = Sessioned::new(Sum::default(), 4, 4);
        machine.refuse_session_replays();
        assert_eq!(
            apply(&mut machine, 1, &[1], &[request(7, u64::MAX, 0, 1)]),
            [1]
        );
        assert!(!machine.session_stale(7, u64::MAX - 1, 1));
        assert_eq!(
            apply(&mut machine, 2, &[1], &[request(7, u64::MAX - 1, 0, 1)]),
            [2],
            "inside the window, never applied"
        );
        assert_eq!(
            apply(
                &mut machine,
                3,
                &[1, 1],
                &[request(8, u64::MAX, 0, 1), request(8, u64::MAX - 2, 1, 1)]
            ),
            [3, 4]
        );
        assert_eq!(
            apply(&mut machine, 4, &[1], &[request(7, u64::MAX - 1, 0, 1)]),
            [2],
            "answered from the table"
        );
    }

    /// Found by `tests/session_replays.rs`: request 4 applied, then an entry holding a copy
    /// of 4 (answered from the table), request 3 (below the table's highest, never
    /// applied: applies) and another copy of 4. Above the entry's highest applied (3) but
    /// not the table's, the last copy must be answered too, not applied again.
    #[test]
    fn a_table_refusing_replays_answers_a_copy_above_a_late_request_in_the_entry() {
        let mut machine = Sessioned::new(Sum::default(), 4, 4);
        machine.refuse_session_replays();
        assert_eq!(apply(&mut machine, 1, &[1], &[request(7, 4, 0, 1)]), [1]);
        let results = apply(
            &mut machine,
            2,
            &[1, 10, 1],
            &[
                request(7, 4, 0, 1),
                request(7, 3, 1, 1),
                request(7, 4, 2, 1),
            ],
        );
        assert_eq!(results, [1, 11, 1]);
        assert_eq!(machine.inner().applied, 2);
        assert!(matches!(
            machine.last_dispositions(),
            [
                Disposition::Replay { .. },
                Disposition::Apply,
                Disposition::Replay { .. }
            ]
        ));
    }

    /// A table that refuses replays never evicts: a session evicted could not tell its
    /// client's old requests from new ones. A new client finds no room and is refused,
    /// in later entries and within one entry, the same way on every replica.
    #[test]
    fn a_full_table_refusing_replays_refuses_new_clients_instead_of_evicting() {
        let run = || {
            let mut machine = Sessioned::new(Sum::default(), 3, 4);
            machine.refuse_session_replays();
            apply(&mut machine, 1, &[1], &[request(1, 1, 0, 1)]);
            apply(&mut machine, 2, &[1], &[request(2, 1, 0, 1)]);
            // One session left; clients 3 (two requests) and 4 in one entry: 3 takes it.
            let results = apply(
                &mut machine,
                3,
                &[1, 1, 1],
                &[
                    request(3, 1, 0, 1),
                    request(4, 1, 1, 1),
                    request(3, 2, 2, 1),
                ],
            );
            assert_eq!(results, [3, REFUSED + 1, 4]);
            assert_eq!(
                machine.last_dispositions(),
                [Disposition::Apply, Disposition::Refused, Disposition::Apply]
            );
            // Full: client 5 is refused; the known clients go on.
            assert_eq!(
                apply(&mut machine, 4, &[1], &[request(5, 1, 0, 1)]),
                [REFUSED]
            );
            assert_eq!(apply(&mut machine, 5, &[1], &[request(1, 2, 0, 1)]), [5]);
            machine
        };
        let (a, b) = (run(), run());
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.sessions().stats().evicted, 0);
        assert_eq!(a.sessions().stats().refused, 2);
        assert_eq!(a.sessions().request_number_max(4), None);
        assert_eq!(a.sessions().request_number_max(5), None);
        assert_eq!(a.sessions().free(), 0);
    }

    #[test]
    fn a_new_clients_pipelined_requests_in_one_entry_all_get_sessions() {
        // A client's first request here need not be number 1 (the client numbers requests
        // across every shard), and several may share the entry.
        let mut machine = Sessioned::new(Sum::default(), 4, 16);
        let results = apply(
            &mut machine,
            1,
            &[1, 2, 3],
            &[
                request(7, 5, 0, 1),
                request(7, 6, 1, 1),
                request(7, 7, 2, 1),
            ],
        );
        assert_eq!(results, [1, 3, 6]);
        assert_eq!(machine.sessions().stats().applied, 3);
        assert_eq!(machine.sessions().request_number_max(7), Some(7));
        // All three are retried in the next entry: answered from the table.
        let results = apply(
            &mut machine,
            2,
            &[1, 2, 3],
            &[
                request(7, 5, 0, 1),
                request(7, 6, 1, 1),
                request(7, 7, 2, 1),
            ],
        );
        assert_eq!(results, [1, 3, 6]);
        assert_eq!(machine.inner().applied, 3);
    }

    #[test]
    fn snapshot_and_restore_keep_sessions_and_replies() {
        let mut machine = Sessioned::new(Sum::default(), 4, 8);
        apply(&mut machine, 1, &[1, 2], &[request(7, 1, 0, 2)]);
        apply(&mut machine, 2, &[3], &[request(8, 1, 0, 1)]);
        let mut snapshot = Vec::new();
        let digest = machine.snapshot_and_digest(&mut snapshot);
        assert_eq!(digest, machine.digest());
        assert!(snapshot.len() <= 24 + machine.sessions().snapshot_bytes_max() + 16);
        // Restored into a table with larger replies (an inspector's): same digest, and the
        // retry still answers from the restored reply.
        let mut restored = Sessioned::new(Sum::default(), 4, 16);
        restored.restore(&snapshot).expect("restores");
        assert_eq!(restored.digest(), digest);
        assert_eq!(
            apply(&mut restored, 3, &[1, 2], &[request(7, 1, 0, 2)]),
            [1, 3]
        );
        assert_eq!(restored.inner().applied, 3);

        // Every truncation and a flipped count are refused, leaving the table empty.
        for cut in [1, 8, 17, snapshot.len() - 1] {
            let mut broken = Sessioned::new(Sum::default(), 4, 8);
            assert!(broken.restore(&snapshot[..snapshot.len() - cut]).is_err());
            assert!(broken.sessions().is_empty());
        }
        let mut too_small = Sessioned::new(Sum::default(), 1, 8);
        assert_eq!(
            too_small.restore(&snapshot),
            Err(RestoreError::CapacityExceeded)
        );
    }

    #[test]
    fn a_full_table_snapshot_fits_snapshot_bytes_max() {
        let (clients_max, records_max) = (3, 5);
        let mut table = SessionTable::<u64>::new(clients_max, records_max);
        let results: Vec<u64> = (1..=records_max as u64).collect();
        let mut op = 0;
        for client_id in 1..=clients_max as u128 {
            for request_number in 1..=SESSION_REPLIES_PER_CLIENT as u64 {
                op += 1;
                let descriptor = request(client_id, request_number, 0, records_max as u32);
                table.commit(op, &descriptor, Disposition::Apply, &results);
            }
        }
        let mut snapshot = Vec::new();
        table.snapshot(&mut snapshot);
        assert!(
            snapshot.len() <= table.snapshot_bytes_max(),
            "{} > {}",
            snapshot.len(),
            table.snapshot_bytes_max()
        );
        assert_eq!(
            snapshot.len(),
            table.snapshot_bytes_max(),
            "the bound is tight"
        );
    }

    #[test]
    fn descriptors_must_be_inside_the_entry_in_order_and_non_empty() {
        assert!(descriptors_valid(&[], 0));
        assert!(descriptors_valid(
            &[request(1, 1, 0, 2), request(2, 1, 3, 1)],
            4
        ));
        assert!(!descriptors_valid(&[request(1, 1, 0, 0)], 4), "empty");
        assert!(!descriptors_valid(&[request(0, 1, 0, 1)], 4), "client 0");
        assert!(
            !descriptors_valid(&[request(1, 1, 3, 2)], 4),
            "past the end"
        );
        assert!(
            !descriptors_valid(&[request(1, 1, 0, 2), request(2, 1, 1, 1)], 4),
            "overlapping"
        );
        assert!(
            !descriptors_valid(&[request(1, 1, u32::MAX, u32::MAX)], 4),
            "overflowing"
        );
    }
}
