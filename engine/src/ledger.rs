//! The reference double-entry ledger: one shard's accounts, a window of its recent transfers
//! and its cross-shard credit legs, as a [`StateMachine`].
//!
//! A `Ledger` is one shard (`shard_index` of `shard_count`). It owns the accounts with
//! `shard_of(id) == shard_index`, a window of the transfers debited from them, the credit legs
//! it sent and has not seen acknowledged, and, per other shard, a replay window of the credit
//! legs it received. Every table is allocated (and its memory touched) once in
//! [`Ledger::new`]; `apply` never allocates, and memory stays flat however long the shard
//! runs. It must never perform I/O, read a clock, or let anything but the committed batches
//! decide its state.
//!
//! # Idempotency window
//! Transfer ids are deduplicated within a bounded window: the most recent
//! [`LedgerConfig::transfers_max`] transfers applied on this shard. Once the window is full,
//! each new transfer evicts the oldest one (first in, first out). A transfer whose id is in
//! the window gets `Exists` or `ExistsWithDifferentFields`; an id older than the window is
//! treated as new, and applied again. TigerBeetle keeps every transfer on disk and
//! deduplicates forever; percore applies millions of transfers per second per shard, so it
//! keeps a bounded window in memory. The full history is the journal's (coming later), and
//! client retries are deduplicated by the runtime's session table (also later): a client
//! must not count on `Exists` for a transfer older than the window (at 5M transfers/s, a
//! window of 2^20 transfers spans about 0.2 s).
//!
//! # Storage
//! Accounts live in an open-addressing table of the records themselves (linear probing,
//! power-of-two capacity, at most two-thirds full): a transfer finds and updates an account
//! with one memory access. The transfer window is a ring of records found through an index of
//! 8-byte entries, probed a cache line at a time: checking a new id reads one line of index
//! instead of 128-byte records, and evicting the oldest transfer removes its index entry by
//! backward-shift deletion (no tombstones, so probes stay short however many times the ring
//! wraps). The table hash is seeded from the configuration
//! so clients cannot choose ids that collide; layouts may differ between replicas, so digests
//! and snapshots never depend on them (they depend on the window's order, which is the order
//! transfers were applied in, and decides which transfer is evicted next).
//!
//! # Cross-shard transfers
//! A transfer is submitted to its debit account's shard (the origin). If the credit account
//! is local, both legs post at once. Otherwise the origin posts the debit and emits the credit
//! leg (the transfer with flags `CROSS_SHARD_CREDIT`) as an `ApplyCreditLegs` record for the
//! credit shard, which applies it and answers with an `AckCreditLegs` record (the leg echoed
//! back). Until the acknowledgement is applied the leg is *in flight*: its amount counts in
//! [`Ledger::in_flight`], and the leg is kept in the origin's in-flight ring, outside the
//! transfer window, so evicting its transfer loses nothing. [`Ledger::credit_legs_unacked`]
//! lists the ring's legs so the runtime can resend them.
//!
//! Each origin numbers its legs 1, 2, 3, ... (one counter per origin, over all credit
//! shards). The number travels in `reserved[0..8]` (little-endian) of the leg and of its
//! acknowledgement (see [`credit_leg_sequence`]); the rest of `reserved` is zero. With
//! `W = credit_legs_in_flight_max`:
//! - Origin rule: the leg numbered `s` is emitted only once every leg numbered `s - W` or
//!   below is acknowledged. Otherwise the transfer is refused with `CreditLegsInFlightFull`
//!   and changes nothing (back-pressure: a leg left unacknowledged stops cross-shard
//!   transfers once `W - 1` later legs were emitted, until a resend gets it acknowledged).
//! - Credit shard rule: per origin it keeps the highest number it applied, `max`, and a
//!   fingerprint of each leg it applied numbered in `(max - W, max]`. A leg numbered
//!   `max - W` or below is a stale duplicate; one in the range is new unless its fingerprint
//!   is there (a different fingerprint is a `LegConflict`). Duplicates are acknowledged again
//!   and change nothing.
//!
//! Why no leg is ever applied twice, however late a duplicate arrives: the leg numbered `max`
//! was emitted only after every leg numbered `max - W` or below was acknowledged, and a credit
//! shard acknowledges only a leg it applied (or knows, by this very argument, it applied). So
//! every leg from that origin numbered `max - W` or below was applied at its credit shard,
//! and every leg above is remembered exactly. An
//! acknowledgement frees its leg's ring slot, and a second one finds the slot empty
//! (`Duplicate`), so `in_flight` drops by each leg's amount exactly once, even if the
//! transfer left the window long ago. (A window of the last N legs received, found by id,
//! would not do, whatever N: legs from other origins can push a leg out while a duplicate of
//! it, resent before the acknowledgement arrived, is still on its way.) A client retry of a
//! transfer older than the window is a new transfer with a new leg number: debited and
//! credited again, so money is still conserved.
//!
//! The origin cannot check a remote credit account. Rule: the credit shard never refuses
//! money. A leg whose credit account is missing, on another ledger or would overflow is parked
//! in the shard's suspense balance ([`Ledger::suspense`]) and acknowledged like any other; an
//! operator settles suspense later (from the journal: legs are not kept here).
//!
//! # Conservation
//! [`Ledger::conservation_sum`] is the sum over local accounts of `credits_posted -
//! debits_posted`, plus suspense. Summed over all shards, plus the amounts of legs emitted but
//! not yet applied at their credit shard, it is always 0 (modulo 2^128).
//!
//! # Transfer ids
//! Ids are unique per debit shard within the window: the ledger cannot see other shards' ids,
//! so two transfers with one id but debit accounts on different shards are both accepted.
//! Clients must draw ids from a space they own (e.g. time-ordered random 128-bit ids), as
//! with TigerBeetle.
//!
//! # Timestamps
//! The leader's `prepare` stamps each account, transfer and credit leg with its clock's
//! `now_ns`, kept strictly increasing (at least the last timestamp plus one). `apply` does
//! not trust them: it records each record's timestamp as `max(carried, last committed + 1)`
//! (the carried one capped at [`TIMESTAMP_MAX`]), stores and sends the record with it, and
//! so keeps the committed timestamps, the transfer window's order and every snapshot valid
//! on every replica alike, whatever a batch carries. A correctly prepared batch keeps its
//! own timestamps; a Byzantine leader in BFT mode (backups cannot check what `prepare`
//! assigned) chooses their values, not their order.
//!
//! # Memory
//! Allocated and touched in [`Ledger::new`] ([`LedgerConfig::memory_bytes`] adds it up):
//! - accounts: 128 B per slot of a power-of-two table of 1.5x to 3x `accounts_max` slots;
//! - transfer window: 128 B per transfer, plus 8 B per index slot, a power of two between
//!   1.5x and 3x `transfers_max`: 140 to 152 B per transfer (`2^20` transfers: 144 MiB);
//! - in-flight ring: 128 B per leg, `credit_legs_in_flight_max` of them;
//! - replay windows: 4 B per leg, `credit_legs_in_flight_max` per shard of the cluster;
//! - the digest's account order: 32 B per account, `accounts_max` of them, and 64 KiB.
//!
//! The defaults of [`LedgerConfig::new`] take about 170 MiB per shard (168 MiB of tables). An index of `2^k`
//! slots serves up to about `2^k * 2/3` transfers (e.g. 1,398,000 transfers use the same
//! `2^21`-slot index as `2^20`), so such sizes give the most window per byte.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;

use bytemuck::{Pod, Zeroable};

use crate::checksum::{Digest256, Digest256Hasher};
use crate::frame::Operation as ClientOperation;
use crate::limits::{BATCH_ENTRIES_MAX_DEFAULT, BATCH_ENTRIES_MAX_LIMIT};
use crate::pool::table::zeroed_table;
use crate::record::{
    Account, CreateAccountResult, CreateTransferResult, CreditAckResult, CreditLegResult,
    RECORD_BYTES, RecordResult, RecordSlot, Transfer, account_flags, hash_id, shard_of,
    slots_as_accounts, slots_as_accounts_mut, slots_as_transfers, slots_as_transfers_mut,
    transfer_flags, wire_enum,
};
use crate::state_machine::{Outbound, RestoreError, StateMachine};

wire_enum! {
    /// What one ledger batch does. Client operations share their codes with
    /// [`crate::frame::Operation`]; internal operations (from other shards) start at 256 and
    /// are never accepted from a client.
    pub enum LedgerOperation: u16 {
        /// Records are [`Account`]s; results are [`CreateAccountResult`]s.
        CreateAccounts = 2,
        /// Records are [`Transfer`]s; results are [`CreateTransferResult`]s.
        CreateTransfers = 3,
        /// Internal. Records are credit legs; results are [`CreditLegResult`]s.
        ApplyCreditLegs = 256,
        /// Internal. Records are applied credit legs echoed back to their origin; results are
        /// [`CreditAckResult`]s.
        AckCreditLegs = 257,
    }
}

const _: () =
    assert!(LedgerOperation::CreateAccounts as u16 == ClientOperation::CreateAccounts as u16);
const _: () =
    assert!(LedgerOperation::CreateTransfers as u16 == ClientOperation::CreateTransfers as u16);

/// A message the ledger sends to another shard.
pub type LedgerOutbound = Outbound<LedgerOperation, RecordSlot>;

/// Default [`LedgerConfig::accounts_max`]: 16 MiB of account table.
pub const ACCOUNTS_MAX_DEFAULT: usize = 1 << 16;
/// Default [`LedgerConfig::transfers_max`]: 144 MiB of transfer window.
pub const TRANSFERS_MAX_DEFAULT: usize = 1 << 20;
/// Default [`LedgerConfig::credit_legs_in_flight_max`]: 8 MiB of in-flight ring, plus
/// 256 KiB of replay window per shard. At 1M cross-shard transfers/s, room for 65 ms of
/// acknowledgement round trip.
pub const CREDIT_LEGS_IN_FLIGHT_MAX_DEFAULT: usize = 1 << 16;
/// Largest `accounts_max`.
pub const ACCOUNTS_MAX_LIMIT: usize = u32::MAX as usize - 1;
/// Largest `transfers_max` (the window's index must have at most 2^32 slots).
pub const TRANSFERS_MAX_LIMIT: usize = 1 << 30;
/// Largest `credit_legs_in_flight_max`.
pub const CREDIT_LEGS_IN_FLIGHT_MAX_LIMIT: usize = 1 << 24;

/// Sizes and identity of one ledger shard. Every bound is fixed here; nothing grows later.
///
/// `accounts_max`, `transfers_max` and `credit_legs_in_flight_max` decide results (when
/// `AccountsTableFull` is answered, which ids are still duplicates, when back-pressure
/// starts): every replica of a shard must use the same values. The peer handshake enforces
/// it ([`StateMachine::settings_digest`]); the state digest covers the last two, and a
/// snapshot restores only into a ledger with the same values of those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// This shard's index, `< shard_count`.
    pub shard_index: u32,
    /// Number of shards accounts are spread over (see [`shard_of`]).
    pub shard_count: u32,
    /// Most accounts this shard holds (accounts are never evicted).
    pub accounts_max: usize,
    /// Size of the idempotency window: duplicate transfer ids are detected among the most
    /// recent `transfers_max` transfers debited on this shard, and an older id counts as new
    /// (see the module documentation). 140 to 152 bytes per transfer.
    pub transfers_max: usize,
    /// Most credit legs in flight from this shard, counted from the oldest one not yet
    /// acknowledged (beyond it, cross-shard transfers get `CreditLegsInFlightFull`); also the
    /// width of the replay window this shard keeps per origin shard for the legs it receives,
    /// so it must be the same on every shard of the cluster (a credit shard's value must be at
    /// least every origin's). 128 bytes per leg, plus 4 bytes per leg per shard.
    pub credit_legs_in_flight_max: usize,
    /// Most records in one batch; also the outbox capacity (one message per record at most).
    pub batch_entries_max: usize,
}

/// A ledger configuration that cannot work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LedgerConfigError {
    /// `shard_count` is 0 or `shard_index` is not below it.
    #[error("shard_index {shard_index} must be below shard_count {shard_count}")]
    ShardIndex {
        /// The configured index.
        shard_index: u32,
        /// The configured count.
        shard_count: u32,
    },
    /// A bound is zero or too large.
    #[error("{name} = {value} must be in 1..={max}")]
    OutOfRange {
        /// The field's name.
        name: &'static str,
        /// The configured value.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },
}

impl LedgerConfig {
    /// Shard `shard_index` of `shard_count`, with the default bounds
    /// ([`ACCOUNTS_MAX_DEFAULT`], [`TRANSFERS_MAX_DEFAULT`],
    /// [`CREDIT_LEGS_IN_FLIGHT_MAX_DEFAULT`], [`BATCH_ENTRIES_MAX_DEFAULT`]).
    pub fn new(shard_index: u32, shard_count: u32) -> LedgerConfig {
        LedgerConfig {
            shard_index,
            shard_count,
            accounts_max: ACCOUNTS_MAX_DEFAULT,
            transfers_max: TRANSFERS_MAX_DEFAULT,
            credit_legs_in_flight_max: CREDIT_LEGS_IN_FLIGHT_MAX_DEFAULT,
            batch_entries_max: BATCH_ENTRIES_MAX_DEFAULT,
        }
    }

    /// [`StateMachine::settings_digest`] of a ledger of this configuration: the shard count,
    /// `accounts_max` (a full table answers `AccountsTableFull`), `transfers_max` and
    /// `credit_legs_in_flight_max`. Not `shard_index` (a group's replicas share it) nor
    /// `batch_entries_max` (it bounds, it does not decide).
    pub fn settings_digest(&self) -> u64 {
        let mut hasher = Digest256Hasher::new();
        hasher
            .update(b"percore.ledger.settings.v1")
            .update(&self.shard_count.to_le_bytes())
            .update(&(self.accounts_max as u64).to_le_bytes())
            .update(&(self.transfers_max as u64).to_le_bytes())
            .update(&(self.credit_legs_in_flight_max as u64).to_le_bytes());
        hasher.finalize_u64()
    }

    /// Checks every bound. The replay windows need no relation checked here: a credit shard
    /// keeps one window of `credit_legs_in_flight_max` legs per origin, which is as wide as
    /// that origin's in-flight span when the value is the same on every shard.
    pub fn validate(&self) -> Result<(), LedgerConfigError> {
        if self.shard_index >= self.shard_count {
            return Err(LedgerConfigError::ShardIndex {
                shard_index: self.shard_index,
                shard_count: self.shard_count,
            });
        }
        let bounds = [
            ("accounts_max", self.accounts_max, ACCOUNTS_MAX_LIMIT),
            ("transfers_max", self.transfers_max, TRANSFERS_MAX_LIMIT),
            (
                "credit_legs_in_flight_max",
                self.credit_legs_in_flight_max,
                CREDIT_LEGS_IN_FLIGHT_MAX_LIMIT,
            ),
            (
                "batch_entries_max",
                self.batch_entries_max,
                BATCH_ENTRIES_MAX_LIMIT,
            ),
        ];
        for (name, value, max) in bounds {
            if value == 0 || value > max {
                return Err(LedgerConfigError::OutOfRange { name, value, max });
            }
        }
        Ok(())
    }

    /// Bytes [`Ledger::new`] allocates and touches for this configuration (tables only; the
    /// outbox adds `batch_entries_max` small messages). For a valid configuration.
    pub fn memory_bytes(&self) -> usize {
        let index_slots = table_capacity(self.transfers_max + 1).max(INDEX_BUCKET_ENTRIES);
        let index_bytes = size_of::<IndexEntry>() * index_slots;
        RECORD_BYTES * table_capacity(self.accounts_max)
            + RECORD_BYTES * self.transfers_max
            + index_bytes
            + RECORD_BYTES * self.credit_legs_in_flight_max
            + size_of::<u32>() * self.credit_legs_in_flight_max * self.shard_count as usize
            + size_of::<u64>() * self.shard_count as usize
            + size_of::<(u128, usize)>() * self.accounts_max
            + RECORD_BYTES * DIGEST_STAGING_ACCOUNTS
    }
}

/// Latest timestamp a batch's stamp may take from a clock (ns since the Unix epoch:
/// 2262-04-11, the last instant an `i64` of nanoseconds holds). A larger `now_ns` or carried
/// timestamp counts as this one, so no clock, however wrong or Byzantine, brings timestamps
/// near `u64::MAX`: past this ceiling each record takes the last timestamp plus one, and the
/// `2^63` values above it outlast any shard (58,000 years at 5M records/s). A refusal at a
/// ceiling would not do: one batch stamped there by a Byzantine leader would have every
/// later record refused.
pub const TIMESTAMP_MAX: u64 = i64::MAX as u64;

/// Timestamps left above [`TIMESTAMP_MAX`]: records one shard can be stamped past it.
const TIMESTAMPS_PAST_MAX: u64 = u64::MAX - TIMESTAMP_MAX;
const _: () = assert!(TIMESTAMPS_PAST_MAX >= 1 << 62);

/// The timestamp of the record after one stamped `last`, proposed as `proposed` (a clock's
/// `now_ns` or a committed record's timestamp): `max(min(proposed, TIMESTAMP_MAX), last +
/// 1)`. The one rule of `prepare`, `stamp_internal` and `apply`: a correct leader's stamps
/// are what every replica records, and whatever a batch carries the recorded timestamps
/// strictly increase.
///
/// # Panics
/// If `last` is `u64::MAX`, reached only after [`TIMESTAMPS_PAST_MAX`] records stamped past
/// [`TIMESTAMP_MAX`] (see there).
#[inline]
fn timestamp_after(last: u64, proposed: u64) -> u64 {
    let next = last
        .checked_add(1)
        .expect("2^63 records stamped past TIMESTAMP_MAX");
    proposed.min(TIMESTAMP_MAX).max(next)
}

/// Table hash seed of [`Ledger::new`]. Public knowledge: a runtime that serves untrusted
/// clients should use [`Ledger::with_hash_seed`] instead.
pub const HASH_SEED_DEFAULT: u64 = u64::from_le_bytes(*b"PCTABLE1");

/// Seed of credit-leg fingerprints. Fixed, unlike the table seed: fingerprints are replicated
/// state, covered by the digest.
const LEG_FINGERPRINT_SEED: u64 = u64::from_le_bytes(*b"PCLEGFP1");

/// Snapshot magic (`"PCLS"`, percore ledger snapshot) and format version (2: transfer
/// window in ring order, in-flight legs, replay windows; 3: the same bytes, with the digest
/// hashing the accounts in id order instead of summing their hashes).
const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"PCLS");
const SNAPSHOT_VERSION: u32 = 3;

/// Accounts the digest copies into one contiguous run before hashing it (64 KiB: BLAKE3
/// hashes a long input several 1 KiB chunks at a time).
const DIGEST_STAGING_ACCOUNTS: usize = 512;

/// Records per group in `apply`: the table slots of a whole group are loaded together
/// before the group is applied, so their memory misses overlap (see `touch_transfers`).
const TOUCH_GROUP_RECORDS: usize = 16;

/// The sequence number of a credit leg (or of its acknowledgement, or of the stored transfer
/// that emitted it): `reserved[0..8]`, little-endian. 0 for anything else.
pub fn credit_leg_sequence(leg: &Transfer) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&leg.reserved[..8]);
    u64::from_le_bytes(bytes)
}

fn with_credit_leg_sequence(transfer: Transfer, sequence: u64) -> Transfer {
    let mut numbered = transfer;
    numbered.reserved[..8].copy_from_slice(&sequence.to_le_bytes());
    numbered
}

/// Whether `reserved` holds at most a leg sequence (bytes 8.. are zero).
fn reserved_beyond_sequence_is_zero(transfer: &Transfer) -> bool {
    transfer.reserved[8..] == [0; 24]
}

/// 32 bits that tell a leg from another leg with its origin and sequence; never 0 (the
/// empty slot). Covers the fields a leg's acknowledgement must match, not the timestamp
/// (each credit shard stamps its own) nor the flags.
fn credit_leg_fingerprint(leg: &Transfer) -> u32 {
    let mut hash = LEG_FINGERPRINT_SEED ^ credit_leg_sequence(leg);
    let kind = u128::from(leg.ledger) << 16 | u128::from(leg.code);
    for field in [
        leg.id,
        leg.debit_account_id,
        leg.credit_account_id,
        leg.amount,
        leg.user_data,
        kind,
    ] {
        hash = hash_id(field, hash);
    }
    (hash >> 32) as u32 | 1
}

/// A record kept in a table, found by a 128-bit id; id 0 never names a record.
trait Keyed: Pod {
    fn id(&self) -> u128;
}

impl Keyed for Account {
    fn id(&self) -> u128 {
        self.id
    }
}

impl Keyed for Transfer {
    fn id(&self) -> u128 {
        self.id
    }
}

/// Power-of-two number of slots for `len_max` entries, at most two-thirds full: a probe for
/// a new id (the common case) then stays under ~5 slots on average.
fn table_capacity(len_max: usize) -> usize {
    assert!(len_max > 0, "a table holds at least one entry");
    let capacity = len_max
        .checked_add(len_max / 2 + 1)
        .and_then(usize::checked_next_power_of_two)
        .expect("table capacity overflows usize");
    debug_assert!(capacity > len_max && len_max * 2 <= capacity * 3);
    capacity
}

enum SlotProbe {
    Found(usize),
    Vacant(usize),
}

/// Open addressing with linear probing over the records themselves. No deletion: entries
/// live forever. For records that are found and updated (accounts): one access does both.
struct SlotTable<T> {
    slots: Box<[T]>,
    mask: usize,
    len: usize,
    len_max: usize,
    seed: u64,
}

impl<T: Keyed> SlotTable<T> {
    fn new(len_max: usize, seed: u64) -> SlotTable<T> {
        let capacity = table_capacity(len_max);
        SlotTable {
            slots: zeroed_table(capacity),
            mask: capacity - 1,
            len: 0,
            len_max,
            seed,
        }
    }

    fn is_full(&self) -> bool {
        self.len == self.len_max
    }

    fn home_slot(&self, id: u128) -> usize {
        hash_id(id, self.seed) as usize & self.mask
    }

    /// Loads the slot's first cache line; see `Ledger::touch_transfers`.
    fn touch(&self, slot: usize) -> u128 {
        self.slots[slot].id()
    }

    /// The slot holding `id`, or the empty slot where it would go.
    #[inline]
    fn probe(&self, id: u128) -> SlotProbe {
        debug_assert_ne!(id, 0, "id 0 marks an empty slot");
        let mut slot = self.home_slot(id);
        // Bounded: `len <= len_max < capacity`, so an empty slot ends every probe.
        for _ in 0..self.slots.len() {
            let slot_id = self.slots[slot].id();
            if slot_id == id {
                return SlotProbe::Found(slot);
            }
            if slot_id == 0 {
                return SlotProbe::Vacant(slot);
            }
            slot = (slot + 1) & self.mask;
        }
        unreachable!("a table always keeps an empty slot");
    }

    fn insert_at(&mut self, slot: usize, entry: T) {
        assert!(self.len < self.len_max);
        debug_assert_ne!(entry.id(), 0);
        debug_assert_eq!(self.slots[slot].id(), 0, "slot is occupied");
        self.slots[slot] = entry;
        self.len += 1;
    }

    fn entries(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter(|entry| entry.id() != 0)
    }

    fn clear(&mut self) {
        self.slots.fill(T::zeroed());
        self.len = 0;
    }
}

/// An entry of an `IndexedWindow`'s index: 8 bytes, eight to a cache line.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct IndexEntry {
    /// The low 32 bits of the hash of the record's id: most mismatches are settled without
    /// reading the record, and deletion finds an entry's home slot without reading it either
    /// (the index has at most 2^32 slots, so the home is in these bits).
    tag: u32,
    /// Position of the record plus one; 0 marks an empty entry.
    ordinal: u32,
}

/// Entries per cache line of an index.
const INDEX_BUCKET_ENTRIES: usize = 8;

/// One cache line of an index, aligned as one.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct IndexBucket {
    entries: [IndexEntry; INDEX_BUCKET_ENTRIES],
}

const _: () = assert!(size_of::<IndexBucket>() == 64);

enum LogProbe {
    Found(usize),
    Vacant { index_slot: usize, hash: u64 },
}

/// The last `len_max` records appended, in a ring, found by id through an open-addressing
/// index. For records written once and rarely read (transfers): appends are sequential, a
/// probe for a new id reads 8-byte index entries only, and once the ring is full each
/// append evicts the oldest record and deletes its index entry (backward shift).
///
/// The index is linear probing whose home slots are the first slots of cache lines (bucketed
/// linear probing): a probe or a deletion that starts at a line usually ends in it, so the
/// one line `Ledger::touch_transfers` loads ahead is all it reads. Once the window is full
/// the index stays at its highest load, where plain linear probing would often run into the
/// next line.
///
/// Invariants: the index holds exactly one entry per record in the ring, each reachable from
/// its home slot without crossing an empty entry; ids in the ring are distinct.
struct IndexedWindow<T> {
    records: Box<[T]>,
    /// Position of the next append; once the ring is full, also that of the oldest record.
    head: usize,
    len: usize,
    index: Box<[IndexBucket]>,
    /// Number of index slots minus one.
    mask: usize,
    seed: u64,
}

impl<T: Keyed> IndexedWindow<T> {
    fn new(len_max: usize, seed: u64) -> IndexedWindow<T> {
        assert!(
            len_max <= TRANSFERS_MAX_LIMIT,
            "positions and home slots are u32"
        );
        // One entry to spare: `push` files the new record before it deletes the evicted one.
        let capacity = table_capacity(len_max + 1).max(INDEX_BUCKET_ENTRIES);
        debug_assert!(capacity <= 1 << 32);
        IndexedWindow {
            records: zeroed_table(len_max),
            head: 0,
            len: 0,
            index: zeroed_table(capacity / INDEX_BUCKET_ENTRIES),
            mask: capacity - 1,
            seed,
        }
    }

    fn len_max(&self) -> usize {
        self.records.len()
    }

    fn is_full(&self) -> bool {
        self.len == self.len_max()
    }

    /// Index slots in all.
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    fn entry(&self, index_slot: usize) -> IndexEntry {
        self.index[index_slot / INDEX_BUCKET_ENTRIES].entries[index_slot % INDEX_BUCKET_ENTRIES]
    }

    fn set_entry(&mut self, index_slot: usize, entry: IndexEntry) {
        let bucket = &mut self.index[index_slot / INDEX_BUCKET_ENTRIES];
        bucket.entries[index_slot % INDEX_BUCKET_ENTRIES] = entry;
    }

    /// The first slot of the cache line a hash (or its low 32 bits) belongs to.
    fn home_of(&self, hash: u64) -> usize {
        hash as usize & self.mask & !(INDEX_BUCKET_ENTRIES - 1)
    }

    fn home_slot(&self, id: u128) -> usize {
        self.home_of(hash_id(id, self.seed))
    }

    /// Loads an index line; see `Ledger::touch_transfers`.
    fn touch(&self, index_slot: usize) -> u128 {
        u128::from(self.entry(index_slot).tag)
    }

    /// The home slot of the record the `ahead`-th next push evicts (the record is read in
    /// ring order, so sequentially), or `None` while the ring is not full.
    fn eviction_home_slot(&self, ahead: usize) -> Option<usize> {
        if !self.is_full() {
            return None;
        }
        let mut position = self.head + ahead;
        if position >= self.len_max() {
            position -= self.len_max();
        }
        Some(self.home_slot(self.records.get(position)?.id()))
    }

    /// The position of the record with `id`, or the index entry where it would be filed.
    #[inline]
    fn probe(&self, id: u128) -> LogProbe {
        debug_assert_ne!(id, 0);
        let hash = hash_id(id, self.seed);
        let tag = hash as u32;
        let mut index_slot = self.home_of(hash);
        // Bounded: the index is at most two-thirds full, so an empty entry ends every probe.
        for _ in 0..self.capacity() {
            let entry = self.entry(index_slot);
            if entry.ordinal == 0 {
                return LogProbe::Vacant { index_slot, hash };
            }
            if entry.tag == tag {
                let position = entry.ordinal as usize - 1;
                if self.records[position].id() == id {
                    return LogProbe::Found(position);
                }
            }
            index_slot = (index_slot + 1) & self.mask;
        }
        unreachable!("an index always keeps an empty entry");
    }

    /// Appends `record` (whose id `probe` just found vacant at `index_slot`) and returns the
    /// id of the record it evicted, if the ring was full.
    fn push(&mut self, index_slot: usize, hash: u64, record: T) -> Option<u128> {
        debug_assert_eq!(hash, hash_id(record.id(), self.seed));
        debug_assert_eq!(self.entry(index_slot).ordinal, 0, "index entry is taken");
        let position = self.head;
        // Found before the new entry is filed: both carry this position's ordinal.
        let evicted = self
            .is_full()
            .then(|| (self.records[position].id(), self.index_slot_of(position)));
        if evicted.is_none() {
            self.len += 1;
        }
        self.records[position] = record;
        let entry = IndexEntry {
            tag: hash as u32,
            ordinal: position as u32 + 1,
        };
        self.set_entry(index_slot, entry);
        self.head = if position + 1 == self.len_max() {
            0
        } else {
            position + 1
        };
        // Filing the new entry moved no other entry, so the evicted entry is still there.
        evicted.map(|(evicted_id, evicted_slot)| {
            self.remove_index_entry(evicted_slot);
            evicted_id
        })
    }

    /// The index slot of the entry for the record at `position`.
    fn index_slot_of(&self, position: usize) -> usize {
        let ordinal = position as u32 + 1;
        let mut index_slot = self.home_slot(self.records[position].id());
        for _ in 0..self.capacity() {
            let entry = self.entry(index_slot);
            if entry.ordinal == ordinal {
                return index_slot;
            }
            assert_ne!(
                entry.ordinal, 0,
                "a record in the window lost its index entry"
            );
            index_slot = (index_slot + 1) & self.mask;
        }
        unreachable!("an index always keeps an empty entry");
    }

    /// Deletes the entry at `hole` by backward shift (Knuth's Algorithm R): each later entry
    /// of the cluster moves back into the hole unless that would put it before its home slot.
    /// Leaves the index exactly as if the deleted id had never been inserted.
    fn remove_index_entry(&mut self, mut hole: usize) {
        debug_assert_ne!(self.entry(hole).ordinal, 0);
        let mut next = (hole + 1) & self.mask;
        // Bounded: an empty entry ends the cluster.
        for _ in 0..self.capacity() {
            let entry = self.entry(next);
            if entry.ordinal == 0 {
                break;
            }
            let home = self.home_of(u64::from(entry.tag));
            // The entry may move back to `hole` iff its home is not in `(hole, next]`, i.e. it
            // is at least as far from its home as the hole is from it.
            let home_distance = next.wrapping_sub(home) & self.mask;
            let hole_distance = next.wrapping_sub(hole) & self.mask;
            if home_distance >= hole_distance {
                self.set_entry(hole, entry);
                hole = next;
            }
            next = (next + 1) & self.mask;
        }
        self.set_entry(hole, IndexEntry::zeroed());
    }

    /// Appends a record that must not be present yet, without evicting (snapshot restore).
    fn append_new(&mut self, record: T) -> Result<(), RestoreError> {
        if record.id() == 0 || self.is_full() {
            return Err(RestoreError::Corrupt);
        }
        match self.probe(record.id()) {
            LogProbe::Found(_) => Err(RestoreError::Corrupt),
            LogProbe::Vacant { index_slot, hash } => {
                let evicted = self.push(index_slot, hash, record);
                debug_assert!(evicted.is_none());
                Ok(())
            }
        }
    }

    /// The records, oldest first, as the two contiguous parts of the ring.
    fn as_slices(&self) -> (&[T], &[T]) {
        if self.is_full() {
            let (newer, older) = self.records.split_at(self.head);
            (older, newer)
        } else {
            debug_assert_eq!(self.head, self.len);
            (&self.records[..self.len], &[])
        }
    }

    #[cfg(test)]
    fn oldest_first(&self) -> impl Iterator<Item = &T> {
        let (older, newer) = self.as_slices();
        older.iter().chain(newer)
    }

    fn clear(&mut self) {
        // Positions `len..` were never written: once full, the ring stays full.
        self.records[..self.len].fill(T::zeroed());
        self.index.fill(IndexBucket::zeroed());
        self.len = 0;
        self.head = 0;
    }
}

/// The credit legs this shard emitted and has not seen acknowledged, by sequence number:
/// slot `sequence % width` holds the leg numbered `sequence` while it is in flight (id 0
/// marks an empty slot). Every leg in flight is numbered in `[sequence_oldest,
/// sequence_next)`, a span of at most `width`, so no two share a slot.
struct LegsInFlight {
    slots: Box<[Transfer]>,
    /// Number of the next leg; legs are numbered from 1.
    sequence_next: u64,
    /// Lowest number still in flight, or `sequence_next` when none is.
    sequence_oldest: u64,
    count: u64,
    /// Sum of the amounts in flight (mod 2^128).
    amount: u128,
}

impl LegsInFlight {
    fn new(width: usize) -> LegsInFlight {
        assert!(width > 0);
        LegsInFlight {
            slots: zeroed_table(width),
            sequence_next: 1,
            sequence_oldest: 1,
            count: 0,
            amount: 0,
        }
    }

    fn width(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, sequence: u64) -> usize {
        (sequence % self.width()) as usize
    }

    /// Whether the origin rule allows the next leg: every leg `width` or more below it is
    /// acknowledged.
    fn has_room(&self) -> bool {
        self.sequence_next - self.sequence_oldest < self.width()
    }

    /// Numbers `leg` with the next sequence and keeps it in flight; returns it as numbered.
    fn push(&mut self, leg: Transfer) -> Transfer {
        assert!(self.has_room(), "the caller checked room");
        let leg = with_credit_leg_sequence(leg, self.sequence_next);
        let slot = self.slot(self.sequence_next);
        debug_assert_eq!(
            self.slots[slot].id, 0,
            "the leg `width` before was acknowledged"
        );
        self.slots[slot] = leg;
        self.sequence_next += 1;
        self.count += 1;
        self.amount = self.amount.wrapping_add(leg.amount);
        leg
    }

    /// The leg numbered `sequence`, if it is in flight.
    fn get(&self, sequence: u64) -> Option<&Transfer> {
        if sequence < self.sequence_oldest || sequence >= self.sequence_next {
            return None;
        }
        let leg = &self.slots[self.slot(sequence)];
        debug_assert!(leg.id == 0 || credit_leg_sequence(leg) == sequence);
        (leg.id != 0).then_some(leg)
    }

    /// Settles the leg `ack` acknowledges, at most once.
    fn acknowledge(&mut self, ack: &Transfer) -> CreditAckResult {
        let sequence = credit_leg_sequence(ack);
        if sequence == 0 || sequence >= self.sequence_next {
            return CreditAckResult::TransferNotFound;
        }
        // Below the oldest in flight, or an emptied slot: acknowledged before.
        let Some(leg) = self.get(sequence) else {
            return CreditAckResult::Duplicate;
        };
        if leg.id != ack.id || !transfer_fields_equal(leg, ack) {
            return CreditAckResult::Mismatch;
        }
        let amount = leg.amount;
        let slot = self.slot(sequence);
        self.slots[slot] = Transfer::zeroed();
        assert!(self.count > 0);
        self.count -= 1;
        self.amount = self.amount.wrapping_sub(amount);
        self.advance_oldest();
        CreditAckResult::Ok
    }

    /// Moves `sequence_oldest` past acknowledged legs. Amortised O(1): each number is passed
    /// once.
    fn advance_oldest(&mut self) {
        while self.sequence_oldest < self.sequence_next
            && self.slots[self.slot(self.sequence_oldest)].id == 0
        {
            self.sequence_oldest += 1;
        }
        debug_assert!(self.count > 0 || self.sequence_oldest == self.sequence_next);
    }

    /// The legs in flight, oldest (lowest number) first.
    fn oldest_first(&self) -> impl Iterator<Item = &Transfer> {
        (self.sequence_oldest..self.sequence_next).filter_map(|sequence| self.get(sequence))
    }

    /// Puts back a leg from a snapshot, after `sequence_next` was set; call
    /// `restore_finish` once all are back.
    fn restore(&mut self, leg: Transfer) -> Result<(), RestoreError> {
        let sequence = credit_leg_sequence(&leg);
        let slot = self.slot(sequence);
        if sequence < self.span_first()
            || sequence >= self.sequence_next
            || self.slots[slot].id != 0
        {
            return Err(RestoreError::Corrupt);
        }
        self.slots[slot] = leg;
        self.count += 1;
        self.amount = self.amount.wrapping_add(leg.amount);
        Ok(())
    }

    fn restore_finish(&mut self) {
        self.sequence_oldest = self.span_first();
        self.advance_oldest();
    }

    /// The lowest number a leg in flight can have: `width` below the next, or 1.
    fn span_first(&self) -> u64 {
        self.sequence_next.saturating_sub(self.width()).max(1)
    }

    fn clear(&mut self) {
        self.slots.fill(Transfer::zeroed());
        self.sequence_next = 1;
        self.sequence_oldest = 1;
        self.count = 0;
        self.amount = 0;
    }
}

/// What a credit leg is to the replay window of its origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LegReplay {
    /// Not applied yet.
    New,
    /// Applied before (its fingerprint is in the window).
    Duplicate,
    /// At least `width` below the highest number applied: applied before (module docs).
    Stale,
    /// A different leg with this number was applied.
    Conflict,
}

/// What this shard remembers of the credit legs it received, per origin shard: the highest
/// sequence applied, `sequence_max`, and the fingerprint of every leg applied numbered in
/// `(sequence_max - width, sequence_max]`, at slot `sequence % width` (0: not applied).
struct LegReplayWindows {
    width: u64,
    sequence_max: Box<[u64]>,
    fingerprints: Box<[u32]>,
}

impl LegReplayWindows {
    fn new(shard_count: u32, width: usize) -> LegReplayWindows {
        assert!(width > 0);
        let slots = width
            .checked_mul(shard_count as usize)
            .expect("replay windows overflow usize");
        LegReplayWindows {
            width: width as u64,
            sequence_max: zeroed_table(shard_count as usize),
            fingerprints: zeroed_table(slots),
        }
    }

    fn slot(&self, origin: u32, sequence: u64) -> usize {
        origin as usize * self.width as usize + (sequence % self.width) as usize
    }

    fn check(&self, origin: u32, sequence: u64, fingerprint: u32) -> LegReplay {
        debug_assert!(sequence > 0 && fingerprint != 0);
        let sequence_max = self.sequence_max[origin as usize];
        if sequence > sequence_max {
            return LegReplay::New;
        }
        if sequence_max - sequence >= self.width {
            return LegReplay::Stale;
        }
        match self.fingerprints[self.slot(origin, sequence)] {
            0 => LegReplay::New,
            seen if seen == fingerprint => LegReplay::Duplicate,
            _ => LegReplay::Conflict,
        }
    }

    /// Remembers a leg `check` found `New`, sliding the origin's window forward if needed.
    fn record(&mut self, origin: u32, sequence: u64, fingerprint: u32) {
        debug_assert_eq!(self.check(origin, sequence, fingerprint), LegReplay::New);
        let sequence_max = self.sequence_max[origin as usize];
        if sequence > sequence_max {
            // Numbers that slide out are stale from now on; clear their slots for the new
            // numbers, `sequence_max + 1 ..= sequence`.
            let row_first = self.slot(origin, 0);
            let row = &mut self.fingerprints[row_first..row_first + self.width as usize];
            if sequence - sequence_max >= self.width {
                row.fill(0);
            } else {
                for skipped in sequence_max + 1..=sequence {
                    row[(skipped % self.width) as usize] = 0;
                }
            }
            self.sequence_max[origin as usize] = sequence;
        }
        let slot = self.slot(origin, sequence);
        debug_assert_eq!(self.fingerprints[slot], 0);
        self.fingerprints[slot] = fingerprint;
    }

    fn clear(&mut self) {
        self.sequence_max.fill(0);
        self.fingerprints.fill(0);
    }
}

/// The on-disk header of a ledger snapshot. After it: the accounts, the transfer window
/// oldest first and the legs in flight lowest number first (128 bytes each), then the replay
/// windows: `shard_count` highest sequences (`u64`), then `shard_count *
/// credit_legs_in_flight_max` fingerprints (`u32`), all little-endian.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct SnapshotHeader {
    magic: u32,
    version: u32,
    shard_index: u32,
    shard_count: u32,
    in_flight: u128,
    suspense: u128,
    transfers_max: u64,
    credit_legs_in_flight_max: u64,
    accounts_count: u64,
    transfers_count: u64,
    credit_legs_unacked: u64,
    credit_leg_sequence_next: u64,
    credit_legs_applied: u64,
    commit_op_last: u64,
    commit_timestamp_last: u64,
    reserved: u64,
    digest: [u8; 32],
}

const SNAPSHOT_HEADER_BYTES: usize = size_of::<SnapshotHeader>();
const _: () = assert!(SNAPSHOT_HEADER_BYTES == 160);

/// One shard of the reference double-entry ledger. See the module documentation.
pub struct Ledger {
    config: LedgerConfig,
    accounts: SlotTable<Account>,
    /// The idempotency window. A cross-shard transfer carries its leg's sequence number in
    /// `reserved[0..8]`; a local one, 0. Records are never changed once appended.
    transfers: IndexedWindow<Transfer>,
    legs_in_flight: LegsInFlight,
    legs_received: LegReplayWindows,
    /// Credit legs received and applied or parked, since the beginning.
    credit_legs_applied: u64,
    outbox: VecDeque<LedgerOutbound>,
    /// Sum of the amounts of parked credit legs.
    suspense: u128,
    commit_op_last: u64,
    commit_timestamp_last: u64,
    /// Leader-only: the last timestamp handed out by `prepare` (not replicated state).
    prepare_timestamp_last: u64,
    /// Scratch of [`StateMachine::digest`], sized at construction, refilled by each digest.
    digest_scratch: RefCell<DigestScratch>,
}

/// See [`Ledger::digest_scratch`].
struct DigestScratch {
    /// `(id, slot)` of every account, sorted by id: the order the digest hashes them in.
    order: Vec<(u128, usize)>,
    /// The accounts copied in that order, [`DIGEST_STAGING_ACCOUNTS`] at a time, so that
    /// BLAKE3 hashes many chunks per call.
    staging: Vec<Account>,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("config", &self.config)
            .field("accounts", &self.accounts.len)
            .field("transfers", &self.transfers.len)
            .field("credit_legs_unacked", &self.legs_in_flight.count)
            .field("in_flight", &self.legs_in_flight.amount)
            .field(
                "credit_leg_sequence_next",
                &self.legs_in_flight.sequence_next,
            )
            .field("credit_legs_applied", &self.credit_legs_applied)
            .field("outbox", &self.outbox.len())
            .field("suspense", &self.suspense)
            .field("commit_op_last", &self.commit_op_last)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// An empty shard with every table allocated and its memory committed, hashing with
    /// [`HASH_SEED_DEFAULT`].
    ///
    /// # Panics
    /// If `config` is invalid (see [`LedgerConfig::validate`]).
    pub fn new(config: LedgerConfig) -> Ledger {
        Ledger::with_hash_seed(config, HASH_SEED_DEFAULT)
    }

    /// As [`Ledger::new`], with the table hash seeded by `hash_seed`.
    ///
    /// Clients choose ids, and the hash is public: with a known seed a client can choose ids
    /// that all land in one probe chain and slow every lookup to a crawl. Any seed is correct
    /// and replicas need not agree (digests and snapshots never depend on table layout), so
    /// a runtime should draw this unpredictably at start-up (e.g. from the OS).
    ///
    /// # Panics
    /// As [`Ledger::new`].
    pub fn with_hash_seed(config: LedgerConfig, hash_seed: u64) -> Ledger {
        if let Err(error) = config.validate() {
            panic!("invalid ledger configuration: {error}");
        }
        // Distinct seeds per table: a collision in one says nothing about another.
        let seed = |table: u64| hash_seed ^ table.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ledger {
            config,
            accounts: SlotTable::new(config.accounts_max, seed(1)),
            transfers: IndexedWindow::new(config.transfers_max, seed(2)),
            legs_in_flight: LegsInFlight::new(config.credit_legs_in_flight_max),
            legs_received: LegReplayWindows::new(
                config.shard_count,
                config.credit_legs_in_flight_max,
            ),
            credit_legs_applied: 0,
            outbox: VecDeque::with_capacity(config.batch_entries_max),
            suspense: 0,
            commit_op_last: 0,
            commit_timestamp_last: 0,
            prepare_timestamp_last: 0,
            digest_scratch: RefCell::new({
                // Touched now, like the tables: the first digest takes no new memory.
                let mut order = vec![(u128::MAX, usize::MAX); config.accounts_max];
                order.clear();
                let mut staging = vec![Account::zeroed(); DIGEST_STAGING_ACCOUNTS];
                staging.clear();
                DigestScratch { order, staging }
            }),
        }
    }

    /// The configuration this shard was built with.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// The account with `id`, if this shard holds it.
    pub fn lookup_account(&self, id: u128) -> Option<Account> {
        if id == 0 {
            return None;
        }
        match self.accounts.probe(id) {
            SlotProbe::Found(slot) => Some(self.accounts.slots[slot]),
            SlotProbe::Vacant(_) => None,
        }
    }

    /// The transfer with `id` debited on this shard, if it is in the idempotency window: as
    /// submitted, with its timestamp, and with `CREDIT_IN_FLIGHT` set while its credit leg is
    /// not acknowledged. (A leg in flight whose transfer left the window is still listed by
    /// [`Ledger::credit_legs_unacked`].)
    pub fn lookup_transfer(&self, id: u128) -> Option<Transfer> {
        if id == 0 {
            return None;
        }
        match self.transfers.probe(id) {
            LogProbe::Found(position) => {
                Some(self.transfer_as_seen(&self.transfers.records[position]))
            }
            LogProbe::Vacant { .. } => None,
        }
    }

    /// Whether this shard applied (or parked) `leg`, a credit leg emitted by another shard
    /// (as listed by that shard's [`Ledger::credit_legs_unacked`]). Exact for every leg
    /// still in flight at its origin.
    pub fn credit_leg_applied(&self, leg: &Transfer) -> bool {
        let sequence = credit_leg_sequence(leg);
        let origin = shard_of(leg.debit_account_id, self.config.shard_count);
        if sequence == 0 || origin == self.config.shard_index {
            return false;
        }
        let replay = self
            .legs_received
            .check(origin, sequence, credit_leg_fingerprint(leg));
        matches!(replay, LegReplay::Duplicate | LegReplay::Stale)
    }

    /// Every account held, in table order: the order depends on the hash seed, so sort
    /// (e.g. by id) wherever it must be the same across replicas or runs. Scans the whole
    /// table: for inspection tools, not for the hot path.
    pub fn accounts(&self) -> impl Iterator<Item = &Account> + '_ {
        self.accounts.entries()
    }

    /// Number of accounts held.
    pub fn accounts_count(&self) -> usize {
        self.accounts.len
    }

    /// Number of transfers in the idempotency window (at most `transfers_max`).
    pub fn transfers_count(&self) -> usize {
        self.transfers.len
    }

    /// Number of credit legs received and applied or parked, since the beginning.
    pub fn credit_legs_count(&self) -> u64 {
        self.credit_legs_applied
    }

    /// Sum of the amounts of credit legs emitted and not yet acknowledged (mod 2^128).
    pub fn in_flight(&self) -> u128 {
        self.legs_in_flight.amount
    }

    /// Number of credit legs emitted and not yet acknowledged.
    pub fn credit_legs_unacked_count(&self) -> u64 {
        self.legs_in_flight.count
    }

    /// Sum of the amounts of credit legs parked on this shard.
    pub fn suspense(&self) -> u128 {
        self.suspense
    }

    /// The op of the last batch applied (0 before the first).
    pub fn commit_op_last(&self) -> u64 {
        self.commit_op_last
    }

    /// `sum(credits_posted - debits_posted)` over local accounts, plus suspense, wrapping
    /// (mod 2^128). Over all shards, plus the amounts of legs not yet applied at their credit
    /// shard, this is 0. Scans the whole account table: a checker, not for the hot path.
    pub fn conservation_sum(&self) -> i128 {
        let mut sum = self.suspense;
        for account in self.accounts.entries() {
            sum = sum
                .wrapping_add(account.credits_posted)
                .wrapping_sub(account.debits_posted);
        }
        sum as i128
    }

    /// Every credit leg emitted and not yet acknowledged, lowest sequence (oldest) first, as
    /// the messages to resend (after a view change, a restart, or a resend timeout): each
    /// exactly as first sent. Walks the in-flight span (at most `credit_legs_in_flight_max`
    /// slots), whether or not the transfers are still in the window.
    pub fn credit_legs_unacked(&self) -> impl Iterator<Item = LedgerOutbound> + '_ {
        self.legs_in_flight
            .oldest_first()
            .map(|leg| self.credit_leg_outbound(leg))
    }

    /// Whether this shard owns `account_id`.
    #[inline]
    fn owns(&self, account_id: u128) -> bool {
        self.config.shard_count == 1
            || shard_of(account_id, self.config.shard_count) == self.config.shard_index
    }

    /// A stored transfer as `lookup_transfer` shows it.
    fn transfer_as_seen(&self, stored: &Transfer) -> Transfer {
        let sequence = credit_leg_sequence(stored);
        let mut seen = Transfer {
            reserved: [0; 32],
            ..*stored
        };
        if sequence != 0 && self.legs_in_flight.get(sequence).is_some() {
            seen.flags |= transfer_flags::CREDIT_IN_FLIGHT;
        }
        seen
    }

    fn credit_leg_outbound(&self, leg: &Transfer) -> LedgerOutbound {
        debug_assert_eq!(leg.flags, transfer_flags::CROSS_SHARD_CREDIT);
        Outbound {
            shard: shard_of(leg.credit_account_id, self.config.shard_count),
            operation: LedgerOperation::ApplyCreditLegs,
            record: RecordSlot::from_transfer(leg),
        }
    }

    fn push_outbound(&mut self, outbound: LedgerOutbound) {
        // `apply` checked room for one message per record, so this never reallocates.
        debug_assert!(self.outbox.len() < self.config.batch_entries_max);
        self.outbox.push_back(outbound);
    }

    /// Records the next record's timestamp from the one its batch carries, and returns it:
    /// [`timestamp_after`] the last committed one. A correctly prepared record keeps its
    /// own; any other (a Byzantine leader's, in BFT mode, which backups cannot check) gets
    /// the same timestamp on every replica, above the last, so the transfer window stays
    /// in time order and its snapshots restore.
    fn observe_timestamp(&mut self, carried: u64) -> u64 {
        let timestamp = timestamp_after(self.commit_timestamp_last, carried);
        self.commit_timestamp_last = timestamp;
        timestamp
    }

    /// Loads the table slots `create_transfer` will probe first, for a group of transfers.
    ///
    /// A probe of a large table is a cache and TLB miss (hundreds of ns on a busy machine).
    /// Applying records one by one pays those misses one after another. Here the home slots
    /// are computed first (arithmetic, and a sequential read of the records the group will
    /// evict from a full window), then loaded in one tight loop of independent loads that the
    /// CPU keeps in flight together; the probes that follow hit the cache. A prefetch
    /// instruction would not even occupy the core, but needs `unsafe`, which this module
    /// forbids. Returns a value only so the loads are not optimised away.
    fn touch_transfers(&self, transfers: &[Transfer]) -> u128 {
        debug_assert!(transfers.len() <= TOUCH_GROUP_RECORDS);
        let mut homes = [(0_usize, 0_usize, 0_usize, 0_usize); TOUCH_GROUP_RECORDS];
        for (ahead, (home, transfer)) in homes.iter_mut().zip(transfers).enumerate() {
            let transfer_slot = self.transfers.home_slot(transfer.id);
            *home = (
                transfer_slot,
                self.accounts.home_slot(transfer.debit_account_id),
                self.accounts.home_slot(transfer.credit_account_id),
                // Assumes every transfer of the group succeeds; a wrong guess costs a load.
                self.transfers
                    .eviction_home_slot(ahead)
                    .unwrap_or(transfer_slot),
            );
        }
        let mut touched = 0;
        for &(transfer_slot, debit_slot, credit_slot, evicted_slot) in &homes[..transfers.len()] {
            touched ^= self.transfers.touch(transfer_slot)
                ^ self.accounts.touch(debit_slot)
                ^ self.accounts.touch(credit_slot)
                ^ self.transfers.touch(evicted_slot);
        }
        touched
    }

    fn create_account(&mut self, account: &Account) -> CreateAccountResult {
        use CreateAccountResult as R;
        let account = &Account {
            timestamp: self.observe_timestamp(account.timestamp),
            ..*account
        };
        if let Err(result) = validate_account(account) {
            return result;
        }
        if !self.owns(account.id) {
            return R::AccountNotOnShard;
        }
        match self.accounts.probe(account.id) {
            SlotProbe::Found(slot) => {
                if account_fields_equal(&self.accounts.slots[slot], account) {
                    R::Exists
                } else {
                    R::ExistsWithDifferentFields
                }
            }
            SlotProbe::Vacant(_) if self.accounts.is_full() => R::AccountsTableFull,
            SlotProbe::Vacant(slot) => {
                self.accounts.insert_at(slot, *account);
                R::Ok
            }
        }
    }

    fn create_transfer(&mut self, transfer: &Transfer) -> CreateTransferResult {
        use CreateTransferResult as R;
        // Stored, and sent with its leg, with the timestamp recorded.
        let transfer = &Transfer {
            timestamp: self.observe_timestamp(transfer.timestamp),
            ..*transfer
        };
        if let Err(result) = validate_transfer(transfer) {
            return result;
        }
        if !self.owns(transfer.debit_account_id) {
            return R::DebitAccountNotOnShard;
        }
        // Idempotency before balances: a retry of an applied transfer reports `Exists` even
        // if the balance has since changed (while it is in the window).
        let (index_slot, hash) = match self.transfers.probe(transfer.id) {
            LogProbe::Found(position) => {
                let existing = &self.transfers.records[position];
                return if transfer_fields_equal(existing, transfer) {
                    R::Exists
                } else {
                    R::ExistsWithDifferentFields
                };
            }
            LogProbe::Vacant { index_slot, hash } => (index_slot, hash),
        };
        let SlotProbe::Found(debit_slot) = self.accounts.probe(transfer.debit_account_id) else {
            return R::DebitAccountNotFound;
        };
        let credit_slot = if self.owns(transfer.credit_account_id) {
            match self.accounts.probe(transfer.credit_account_id) {
                SlotProbe::Found(slot) => Some(slot),
                SlotProbe::Vacant(_) => return R::CreditAccountNotFound,
            }
        } else {
            None
        };

        let debit = &self.accounts.slots[debit_slot];
        let credit = credit_slot.map(|slot| &self.accounts.slots[slot]);
        if debit.ledger != transfer.ledger
            || credit.is_some_and(|credit| credit.ledger != transfer.ledger)
        {
            return R::LedgerMismatch;
        }
        let Some(debits_posted) = debit.debits_posted.checked_add(transfer.amount) else {
            return R::OverflowsDebits;
        };
        if debit.flags & account_flags::ALLOW_NEGATIVE == 0 && debits_posted > debit.credits_posted
        {
            return R::ExceedsCredits;
        }
        let credits_posted = match credit {
            Some(credit) => match credit.credits_posted.checked_add(transfer.amount) {
                Some(credits_posted) => Some(credits_posted),
                None => return R::OverflowsCredits,
            },
            None => None,
        };
        if credit_slot.is_none() && !self.legs_in_flight.has_room() {
            return R::CreditLegsInFlightFull;
        }

        // Commit point: every check passed, nothing below can fail.
        self.accounts.slots[debit_slot].debits_posted = debits_posted;
        let mut stored = *transfer;
        if let (Some(slot), Some(credits_posted)) = (credit_slot, credits_posted) {
            self.accounts.slots[slot].credits_posted = credits_posted;
        } else {
            let leg = self.legs_in_flight.push(Transfer {
                flags: transfer_flags::CROSS_SHARD_CREDIT,
                ..*transfer
            });
            stored.reserved = leg.reserved;
            let outbound = self.credit_leg_outbound(&leg);
            self.push_outbound(outbound);
        }
        // The evicted transfer, if any, needs nothing more: its leg (if in flight) is in
        // `legs_in_flight`.
        self.transfers.push(index_slot, hash, stored);
        R::Ok
    }

    fn apply_credit_leg(&mut self, leg: &Transfer) -> CreditLegResult {
        use CreditLegResult as R;
        // Acknowledged with the timestamp recorded.
        let leg = &Transfer {
            timestamp: self.observe_timestamp(leg.timestamp),
            ..*leg
        };
        let sequence = credit_leg_sequence(leg);
        if leg.flags != transfer_flags::CROSS_SHARD_CREDIT
            || leg.id == 0
            || leg.debit_account_id == 0
            || leg.credit_account_id == 0
            || leg.amount == 0
            || sequence == 0
            || !reserved_beyond_sequence_is_zero(leg)
        {
            return R::LegInvalid;
        }
        let origin = shard_of(leg.debit_account_id, self.config.shard_count);
        if origin == self.config.shard_index {
            return R::LegInvalid;
        }
        let fingerprint = credit_leg_fingerprint(leg);
        match self.legs_received.check(origin, sequence, fingerprint) {
            LegReplay::New => {}
            LegReplay::Duplicate | LegReplay::Stale => {
                // The first acknowledgement may have been lost: acknowledge again.
                self.push_ack(origin, leg);
                return R::Duplicate;
            }
            LegReplay::Conflict => return R::LegConflict,
        }

        let mut stored = *leg;
        let result = match self.credit_leg_target(leg) {
            Ok((account_slot, credits_posted)) => {
                self.accounts.slots[account_slot].credits_posted = credits_posted;
                R::Ok
            }
            Err(parked) => {
                // Wrapping (mod 2^128), as the conservation sum is: refusing at the top
                // protected nothing, and a client could park `u128::MAX` once (from an
                // account that may go negative) and from then on have every leg that parks
                // here refused and never acknowledged, until the in-flight bound of every
                // shard sending to this one refused all their transfers between shards.
                self.suspense = self.suspense.wrapping_add(leg.amount);
                stored.flags |= transfer_flags::CREDIT_PARKED;
                parked
            }
        };
        self.legs_received.record(origin, sequence, fingerprint);
        self.credit_legs_applied += 1;
        self.push_ack(origin, &stored);
        result
    }

    /// The account slot and new `credits_posted` for a leg, or why it must be parked.
    fn credit_leg_target(&self, leg: &Transfer) -> Result<(usize, u128), CreditLegResult> {
        use CreditLegResult as R;
        if !self.owns(leg.credit_account_id) {
            return Err(R::ParkedCreditAccountNotOnShard);
        }
        let SlotProbe::Found(slot) = self.accounts.probe(leg.credit_account_id) else {
            return Err(R::ParkedCreditAccountNotFound);
        };
        let account = &self.accounts.slots[slot];
        if account.ledger != leg.ledger {
            return Err(R::ParkedLedgerMismatch);
        }
        match account.credits_posted.checked_add(leg.amount) {
            Some(credits_posted) => Ok((slot, credits_posted)),
            None => Err(R::ParkedOverflowsCredits),
        }
    }

    fn push_ack(&mut self, origin: u32, applied: &Transfer) {
        self.push_outbound(Outbound {
            shard: origin,
            operation: LedgerOperation::AckCreditLegs,
            record: RecordSlot::from_transfer(applied),
        });
    }

    fn ack_credit_leg(&mut self, ack: &Transfer) -> CreditAckResult {
        if ack.id == 0 || !self.owns(ack.debit_account_id) {
            return CreditAckResult::TransferNotFound;
        }
        self.legs_in_flight.acknowledge(ack)
    }

    fn apply_transfers(&mut self, transfers: &[Transfer], results: &mut [RecordResult]) {
        let groups = transfers
            .chunks(TOUCH_GROUP_RECORDS)
            .zip(results.chunks_mut(TOUCH_GROUP_RECORDS));
        for (group, (group_transfers, group_results)) in groups.enumerate() {
            std::hint::black_box(self.touch_transfers(group_transfers));
            let index_first = group * TOUCH_GROUP_RECORDS;
            let pairs = group_transfers.iter().zip(group_results);
            for (offset, (transfer, result)) in pairs.enumerate() {
                *result = RecordResult {
                    index: (index_first + offset) as u32,
                    code: self.create_transfer(transfer).into(),
                };
            }
        }
    }

    fn reset(&mut self) {
        self.accounts.clear();
        self.transfers.clear();
        self.legs_in_flight.clear();
        self.legs_received.clear();
        self.credit_legs_applied = 0;
        self.outbox.clear();
        self.suspense = 0;
        self.commit_op_last = 0;
        self.commit_timestamp_last = 0;
        self.prepare_timestamp_last = 0;
    }

    /// Appends the snapshot whose header records `digest` (the state's digest).
    fn snapshot_with_digest(&self, digest: Digest256, out: &mut Vec<u8>) {
        let header = SnapshotHeader {
            magic: SNAPSHOT_MAGIC,
            version: SNAPSHOT_VERSION,
            shard_index: self.config.shard_index,
            shard_count: self.config.shard_count,
            in_flight: self.legs_in_flight.amount,
            suspense: self.suspense,
            transfers_max: self.config.transfers_max as u64,
            credit_legs_in_flight_max: self.config.credit_legs_in_flight_max as u64,
            accounts_count: self.accounts.len as u64,
            transfers_count: self.transfers.len as u64,
            credit_legs_unacked: self.legs_in_flight.count,
            credit_leg_sequence_next: self.legs_in_flight.sequence_next,
            credit_legs_applied: self.credit_legs_applied,
            commit_op_last: self.commit_op_last,
            commit_timestamp_last: self.commit_timestamp_last,
            reserved: 0,
            digest,
        };
        let bytes = self
            .snapshot_bytes(
                self.accounts.len,
                self.transfers.len,
                self.legs_in_flight.count as usize,
            )
            .expect("the tables fit in memory, so their snapshot length fits in usize");
        out.reserve(bytes);
        let start = out.len();
        out.extend_from_slice(bytemuck::bytes_of(&header));
        for account in self.accounts.entries() {
            out.extend_from_slice(bytemuck::bytes_of(account));
        }
        let (older, newer) = self.transfers.as_slices();
        out.extend_from_slice(bytemuck::cast_slice(older));
        out.extend_from_slice(bytemuck::cast_slice(newer));
        for leg in self.legs_in_flight.oldest_first() {
            out.extend_from_slice(bytemuck::bytes_of(leg));
        }
        for sequence_max in self.legs_received.sequence_max.iter() {
            out.extend_from_slice(&sequence_max.to_le_bytes());
        }
        out.extend_from_slice(bytemuck::cast_slice(&self.legs_received.fingerprints[..]));
        debug_assert_eq!(out.len() - start, bytes);
    }

    /// Snapshot body length for a header's counts, if it fits in `usize`.
    fn snapshot_bytes(&self, accounts: usize, transfers: usize, legs: usize) -> Option<usize> {
        let shards = self.config.shard_count as usize;
        let records = accounts.checked_add(transfers)?.checked_add(legs)?;
        let replay_bytes =
            shards * size_of::<u64>() + self.legs_received.fingerprints.len() * size_of::<u32>();
        records
            .checked_mul(RECORD_BYTES)?
            .checked_add(SNAPSHOT_HEADER_BYTES + replay_bytes)
    }

    /// Checks a snapshot header against this ledger; returns the record counts.
    fn restore_header(&self, bytes: &[u8]) -> Result<(SnapshotHeader, [usize; 3]), RestoreError> {
        let Some(header_bytes) = bytes.get(..SNAPSHOT_HEADER_BYTES) else {
            return Err(RestoreError::LengthMismatch {
                bytes: bytes.len(),
                expected: SNAPSHOT_HEADER_BYTES,
            });
        };
        let header: SnapshotHeader = bytemuck::pod_read_unaligned(header_bytes);
        if header.magic != SNAPSHOT_MAGIC {
            return Err(RestoreError::BadMagic {
                magic: header.magic,
            });
        }
        if header.version != SNAPSHOT_VERSION {
            return Err(RestoreError::UnsupportedVersion {
                version: header.version,
            });
        }
        if header.shard_index != self.config.shard_index
            || header.shard_count != self.config.shard_count
            || header.transfers_max != self.config.transfers_max as u64
            || header.credit_legs_in_flight_max != self.config.credit_legs_in_flight_max as u64
        {
            return Err(RestoreError::ConfigMismatch);
        }
        let count = |count: u64, max: usize| match usize::try_from(count) {
            Ok(count) if count <= max => Ok(count),
            _ => Err(RestoreError::CapacityExceeded),
        };
        let counts = [
            count(header.accounts_count, self.accounts.len_max)?,
            count(header.transfers_count, self.config.transfers_max)?,
            count(
                header.credit_legs_unacked,
                self.config.credit_legs_in_flight_max,
            )?,
        ];
        let expected = self
            .snapshot_bytes(counts[0], counts[1], counts[2])
            .ok_or(RestoreError::Corrupt)?;
        if bytes.len() != expected {
            return Err(RestoreError::LengthMismatch {
                bytes: bytes.len(),
                expected,
            });
        }
        if header.credit_leg_sequence_next == 0 {
            return Err(RestoreError::Corrupt);
        }
        Ok((header, counts))
    }

    fn restore_into_empty(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let (header, [accounts_count, transfers_count, legs_count]) = self.restore_header(bytes)?;
        self.legs_in_flight.sequence_next = header.credit_leg_sequence_next;
        let (record_bytes, replay_bytes) = bytes[SNAPSHOT_HEADER_BYTES..]
            .split_at((accounts_count + transfers_count + legs_count) * RECORD_BYTES);
        let mut records = record_bytes.chunks_exact(RECORD_BYTES);
        for chunk in records.by_ref().take(accounts_count) {
            self.restore_account(bytemuck::pod_read_unaligned(chunk))?;
        }
        let mut timestamp_previous = 0;
        for chunk in records.by_ref().take(transfers_count) {
            let transfer: Transfer = bytemuck::pod_read_unaligned(chunk);
            if transfer.timestamp <= timestamp_previous {
                return Err(RestoreError::Corrupt); // the window is in apply order
            }
            timestamp_previous = transfer.timestamp;
            self.restore_transfer(transfer)?;
        }
        for chunk in records.by_ref().take(legs_count) {
            self.restore_leg_in_flight(bytemuck::pod_read_unaligned(chunk))?;
        }
        debug_assert!(records.next().is_none());
        self.legs_in_flight.restore_finish();
        self.restore_replay_windows(replay_bytes)?;

        // Counters derived from the records must agree with the header.
        if self.legs_in_flight.amount != header.in_flight {
            return Err(RestoreError::Corrupt);
        }
        self.suspense = header.suspense;
        self.credit_legs_applied = header.credit_legs_applied;
        self.commit_op_last = header.commit_op_last;
        self.commit_timestamp_last = header.commit_timestamp_last;
        self.prepare_timestamp_last = header.commit_timestamp_last;
        if self.digest() != header.digest {
            return Err(RestoreError::DigestMismatch);
        }
        Ok(())
    }

    fn restore_account(&mut self, account: Account) -> Result<(), RestoreError> {
        if account.id == 0 || account.id == u128::MAX || !self.owns(account.id) {
            return Err(RestoreError::Corrupt);
        }
        match self.accounts.probe(account.id) {
            SlotProbe::Vacant(slot) if !self.accounts.is_full() => {
                self.accounts.insert_at(slot, account);
                Ok(())
            }
            _ => Err(RestoreError::Corrupt),
        }
    }

    fn restore_transfer(&mut self, transfer: Transfer) -> Result<(), RestoreError> {
        let sequence = credit_leg_sequence(&transfer);
        // A leg number exactly when the credit is remote, and one already handed out.
        let numbered_rightly = if self.owns(transfer.credit_account_id) {
            sequence == 0
        } else {
            sequence != 0 && sequence < self.legs_in_flight.sequence_next
        };
        if transfer.debit_account_id == 0
            || !self.owns(transfer.debit_account_id)
            || !numbered_rightly
            || !reserved_beyond_sequence_is_zero(&transfer)
        {
            return Err(RestoreError::Corrupt);
        }
        self.transfers.append_new(transfer)
    }

    fn restore_leg_in_flight(&mut self, leg: Transfer) -> Result<(), RestoreError> {
        if leg.flags != transfer_flags::CROSS_SHARD_CREDIT
            || leg.id == 0
            || leg.amount == 0
            || leg.debit_account_id == 0
            || !self.owns(leg.debit_account_id)
            || self.owns(leg.credit_account_id)
            || !reserved_beyond_sequence_is_zero(&leg)
        {
            return Err(RestoreError::Corrupt);
        }
        self.legs_in_flight.restore(leg)
    }

    fn restore_replay_windows(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let windows = &mut self.legs_received;
        let (maxima, fingerprints) = bytes.split_at(windows.sequence_max.len() * size_of::<u64>());
        debug_assert_eq!(
            fingerprints.len(),
            windows.fingerprints.len() * size_of::<u32>()
        );
        for (sequence_max, chunk) in windows.sequence_max.iter_mut().zip(maxima.chunks_exact(8)) {
            *sequence_max = bytemuck::pod_read_unaligned(chunk);
        }
        for (fingerprint, chunk) in windows
            .fingerprints
            .iter_mut()
            .zip(fingerprints.chunks_exact(4))
        {
            *fingerprint = bytemuck::pod_read_unaligned(chunk);
        }
        // A shard receives no legs from itself.
        let own = self.config.shard_index;
        let own_row = windows.slot(own, 0)..windows.slot(own, 0) + windows.width as usize;
        if windows.sequence_max[own as usize] != 0
            || windows.fingerprints[own_row].iter().any(|&f| f != 0)
        {
            return Err(RestoreError::Corrupt);
        }
        Ok(())
    }
}

/// Stateless checks of a client account, in the order their results take precedence.
fn validate_account(account: &Account) -> Result<(), CreateAccountResult> {
    use CreateAccountResult as R;
    let failure = if account.reserved != [0; 48] {
        R::ReservedFieldNotZero
    } else if account.flags & !account_flags::CLIENT_MASK != 0 {
        R::FlagsInvalid
    } else if account.id == 0 {
        R::IdMustNotBeZero
    } else if account.id == u128::MAX {
        R::IdMustNotBeIntMax
    } else if account.debits_posted != 0 {
        R::DebitsPostedMustBeZero
    } else if account.credits_posted != 0 {
        R::CreditsPostedMustBeZero
    } else if account.ledger == 0 {
        R::LedgerMustNotBeZero
    } else if account.code == 0 {
        R::CodeMustNotBeZero
    } else {
        return Ok(());
    };
    Err(failure)
}

/// Stateless checks of a client transfer, in the order their results take precedence.
fn validate_transfer(transfer: &Transfer) -> Result<(), CreateTransferResult> {
    use CreateTransferResult as R;
    let failure = if transfer.reserved != [0; 32] {
        R::ReservedFieldNotZero
    } else if transfer.flags & !transfer_flags::CLIENT_MASK != 0 {
        R::FlagsInvalid
    } else if transfer.id == 0 {
        R::IdMustNotBeZero
    } else if transfer.id == u128::MAX {
        R::IdMustNotBeIntMax
    } else if transfer.debit_account_id == 0 {
        R::DebitAccountIdMustNotBeZero
    } else if transfer.credit_account_id == 0 {
        R::CreditAccountIdMustNotBeZero
    } else if transfer.debit_account_id == transfer.credit_account_id {
        R::AccountsMustBeDifferent
    } else if transfer.amount == 0 {
        R::AmountMustNotBeZero
    } else if transfer.ledger == 0 {
        R::LedgerMustNotBeZero
    } else if transfer.code == 0 {
        R::CodeMustNotBeZero
    } else {
        return Ok(());
    };
    Err(failure)
}

/// Whether two accounts with one id carry the same client-chosen fields.
fn account_fields_equal(a: &Account, b: &Account) -> bool {
    a.user_data == b.user_data && a.ledger == b.ledger && a.code == b.code && a.flags == b.flags
}

/// Whether two transfers with one id carry the same client-chosen fields (timestamps and
/// ledger-internal flags are not the client's).
fn transfer_fields_equal(a: &Transfer, b: &Transfer) -> bool {
    a.debit_account_id == b.debit_account_id
        && a.credit_account_id == b.credit_account_id
        && a.amount == b.amount
        && a.user_data == b.user_data
        && a.ledger == b.ledger
        && a.code == b.code
        && (a.flags & transfer_flags::CLIENT_MASK) == (b.flags & transfer_flags::CLIENT_MASK)
}

/// Writes `results[i] = (i, apply_one(&records[i]))`.
fn apply_each<R>(
    records: &[R],
    results: &mut [RecordResult],
    mut apply_one: impl FnMut(&R) -> u32,
) {
    for (index, (record, result)) in records.iter().zip(results.iter_mut()).enumerate() {
        *result = RecordResult {
            index: index as u32,
            code: apply_one(record),
        };
    }
}

impl StateMachine for Ledger {
    type Operation = LedgerOperation;
    type Record = RecordSlot;
    type Result = RecordResult;

    fn client_operation(code: u16) -> Option<LedgerOperation> {
        match ClientOperation::try_from(code) {
            Ok(ClientOperation::CreateAccounts) => Some(LedgerOperation::CreateAccounts),
            Ok(ClientOperation::CreateTransfers) => Some(LedgerOperation::CreateTransfers),
            _ => None,
        }
    }

    /// Accounts go to the shard of their id; transfers and acknowledgements to the shard of
    /// the debit account (where the transfer is stored); credit legs to the shard of the
    /// credit account. Never panics on a malformed record (it is merely routed somewhere and
    /// refused there).
    fn route(operation: LedgerOperation, record: &RecordSlot, shard_count: u32) -> u32 {
        let account_id = match operation {
            LedgerOperation::CreateAccounts => record.as_account().id,
            LedgerOperation::CreateTransfers | LedgerOperation::AckCreditLegs => {
                record.as_transfer().debit_account_id
            }
            LedgerOperation::ApplyCreditLegs => record.as_transfer().credit_account_id,
        };
        shard_of(account_id, shard_count)
    }

    /// A client transfer whose credit account lives on another shard than its debit
    /// account: applying it sends a credit leg. Account creation never crosses; neither do
    /// the internal operations (legs and acknowledgements are the crossing itself, and
    /// clients cannot submit them).
    fn crosses_shards(operation: LedgerOperation, record: &RecordSlot, shard_count: u32) -> bool {
        match operation {
            LedgerOperation::CreateTransfers => {
                let transfer = record.as_transfer();
                shard_of(transfer.debit_account_id, shard_count)
                    != shard_of(transfer.credit_account_id, shard_count)
            }
            LedgerOperation::CreateAccounts
            | LedgerOperation::ApplyCreditLegs
            | LedgerOperation::AckCreditLegs => false,
        }
    }

    /// Resets the timestamp `prepare` assigns (clients send 0).
    fn unprepare(operation: LedgerOperation, record: &mut RecordSlot) {
        match operation {
            LedgerOperation::CreateAccounts => {
                let mut account = *record.as_account();
                account.timestamp = 0;
                *record = RecordSlot::from_account(&account);
            }
            LedgerOperation::CreateTransfers => {
                let mut transfer = *record.as_transfer();
                transfer.timestamp = 0;
                *record = RecordSlot::from_transfer(&transfer);
            }
            LedgerOperation::ApplyCreditLegs | LedgerOperation::AckCreditLegs => {}
        }
    }

    /// Assigns strictly increasing timestamps: the first record gets
    /// `max(min(now_ns, TIMESTAMP_MAX), last timestamp + 1)` (see [`TIMESTAMP_MAX`]), each
    /// next one its predecessor's plus one. Acknowledgements carry no timestamp of their
    /// own.
    fn prepare(&mut self, operation: LedgerOperation, now_ns: u64, records: &mut [RecordSlot]) {
        if records.is_empty() || operation == LedgerOperation::AckCreditLegs {
            return;
        }
        let timestamp_last = self.prepare_timestamp_last.max(self.commit_timestamp_last);
        let mut timestamp = timestamp_last;
        match operation {
            LedgerOperation::CreateAccounts => {
                for account in slots_as_accounts_mut(records) {
                    timestamp = timestamp_after(timestamp, now_ns);
                    account.timestamp = timestamp;
                }
            }
            LedgerOperation::CreateTransfers | LedgerOperation::ApplyCreditLegs => {
                for transfer in slots_as_transfers_mut(records) {
                    timestamp = timestamp_after(timestamp, now_ns);
                    transfer.timestamp = timestamp;
                }
            }
            LedgerOperation::AckCreditLegs => unreachable!(),
        }
        debug_assert!(timestamp - timestamp_last >= records.len() as u64);
        self.prepare_timestamp_last = timestamp;
    }

    /// Stamps certified credit legs from `now_ns` and the last committed timestamp only:
    /// the first gets `max(min(now_ns, TIMESTAMP_MAX), last committed timestamp + 1)`, each
    /// next one its predecessor's plus one. That is what `prepare` assigns on a leader whose
    /// prepared timestamps are all committed, and what a correct leader reserved (its
    /// `prepare` on a copy, the first timestamp proposed as `now_ns`): the committed
    /// timestamps before the batch are at most its prepared ones, so the stamp is `now_ns`
    /// itself (below [`TIMESTAMP_MAX`]; past it, the last committed one plus one, never
    /// above what it reserved). A `now_ns` from a Byzantine leader cannot make timestamps
    /// decrease or overflow. Acknowledgements carry no timestamp; client operations are
    /// never internal records and are left as they are.
    fn stamp_internal(&self, operation: LedgerOperation, now_ns: u64, records: &mut [RecordSlot]) {
        if operation != LedgerOperation::ApplyCreditLegs || records.is_empty() {
            return;
        }
        let mut timestamp = self.commit_timestamp_last;
        for transfer in slots_as_transfers_mut(records) {
            timestamp = timestamp_after(timestamp, now_ns);
            transfer.timestamp = timestamp;
        }
    }

    /// Runs `prepare` on the copy (so this leader's later batches are ordered after the
    /// legs) and proposes the first leg's timestamp: `stamp_internal` at execution then
    /// gives every replica the timestamps reserved here. Acknowledgements carry none.
    fn reserve_internal(
        &mut self,
        operation: LedgerOperation,
        now_ns: u64,
        records: &mut [RecordSlot],
    ) -> u64 {
        if operation != LedgerOperation::ApplyCreditLegs || records.is_empty() {
            return now_ns;
        }
        self.prepare(operation, now_ns, records);
        records[0].as_transfer().timestamp
    }

    fn apply(
        &mut self,
        op: u64,
        operation: LedgerOperation,
        records: &[RecordSlot],
        results: &mut [RecordResult],
    ) {
        assert_eq!(records.len(), results.len(), "one result per record");
        assert!(
            records.len() <= self.config.batch_entries_max,
            "batch too large"
        );
        // At most one message per record; the runtime drains between batches. This bound is
        // a precondition, not a result: results never depend on when the runtime drains.
        assert!(
            self.outbox.len() + records.len() <= self.config.batch_entries_max,
            "outbox not drained"
        );
        assert!(op > self.commit_op_last, "batches apply once, in op order");
        self.commit_op_last = op;
        match operation {
            LedgerOperation::CreateAccounts => {
                apply_each(slots_as_accounts(records), results, |account| {
                    self.create_account(account).into()
                });
            }
            LedgerOperation::CreateTransfers => {
                self.apply_transfers(slots_as_transfers(records), results);
            }
            LedgerOperation::ApplyCreditLegs => {
                apply_each(slots_as_transfers(records), results, |leg| {
                    self.apply_credit_leg(leg).into()
                });
            }
            LedgerOperation::AckCreditLegs => {
                apply_each(slots_as_transfers(records), results, |ack| {
                    self.ack_credit_leg(ack).into()
                });
            }
        }
    }

    /// Credit legs are settled once every one is acknowledged (none is in flight any
    /// more); acknowledgements need no confirmation of their own (a lost one is repaired
    /// by the leg's resend, which the credit shard acknowledges again).
    fn outputs_settled(&self, operation: LedgerOperation, records: &[RecordSlot]) -> bool {
        match operation {
            LedgerOperation::ApplyCreditLegs => records.iter().all(|record| {
                self.legs_in_flight
                    .get(credit_leg_sequence(record.as_transfer()))
                    .is_none()
            }),
            LedgerOperation::AckCreditLegs
            | LedgerOperation::CreateAccounts
            | LedgerOperation::CreateTransfers => true,
        }
    }

    /// The credit legs not yet acknowledged ([`Ledger::credit_legs_unacked`]).
    fn unconfirmed_outbound(&self, each: &mut dyn FnMut(LedgerOutbound)) {
        for leg in self.credit_legs_unacked() {
            each(leg);
        }
    }

    fn poll_outbound(&mut self) -> Option<LedgerOutbound> {
        self.outbox.pop_front()
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        self.snapshot_with_digest(self.digest(), out);
    }

    /// The snapshot embeds the digest: one pass over the state for both.
    fn snapshot_and_digest(&self, out: &mut Vec<u8>) -> Digest256 {
        let digest = self.digest();
        self.snapshot_with_digest(digest, out);
        digest
    }

    fn snapshot_bytes_max(&self) -> Option<usize> {
        self.snapshot_bytes(
            self.config.accounts_max,
            self.config.transfers_max,
            self.config.credit_legs_in_flight_max,
        )
    }

    /// Restores a snapshot into this ledger's tables (the account table may be larger than
    /// the source's, and any table may be hashed with another seed; `transfers_max` and
    /// `credit_legs_in_flight_max` must be the source's). Checks every record, rebuilds the
    /// transfer window in its order (so the same transfers are evicted next), recomputes the
    /// counters and the digest against the snapshot's. The outbox starts empty: resend
    /// [`Ledger::credit_legs_unacked`].
    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        self.reset();
        let restored = self.restore_into_empty(bytes);
        if restored.is_err() {
            self.reset();
        }
        restored
    }

    /// Covers the configuration that decides results, the counters, the accounts (in id
    /// order), the transfer window in order (it decides future evictions), the legs in flight
    /// and the replay windows. Never the table layout.
    /// [`LedgerConfig::settings_digest`].
    fn settings_digest(&self) -> u64 {
        self.config.settings_digest()
    }

    /// [`crate::record::RESULT_REQUEST_REFUSED`].
    fn refused_result(index: u32) -> RecordResult {
        RecordResult {
            index,
            code: crate::record::RESULT_REQUEST_REFUSED,
        }
    }

    fn digest(&self) -> Digest256 {
        let mut hasher = Digest256Hasher::new();
        hasher
            .update(b"percore.ledger.v3")
            .update(&self.config.shard_index.to_le_bytes())
            .update(&self.config.shard_count.to_le_bytes())
            .update(&(self.config.transfers_max as u64).to_le_bytes())
            .update(&(self.config.credit_legs_in_flight_max as u64).to_le_bytes())
            .update(&self.suspense.to_le_bytes())
            .update(&self.credit_legs_applied.to_le_bytes())
            .update(&self.commit_op_last.to_le_bytes())
            .update(&self.commit_timestamp_last.to_le_bytes());
        // The accounts in id order: independent of the table's seed and layout, and a
        // plain hash of one canonical encoding (ids are unique), so two account sets with
        // one digest are a BLAKE3 collision. (A sum of per-account hashes, as here before,
        // is a multiset hash that generalized-birthday attacks break at 256 bits.)
        let mut scratch = self.digest_scratch.borrow_mut();
        let DigestScratch { order, staging } = &mut *scratch;
        order.clear();
        order.extend(
            self.accounts
                .slots
                .iter()
                .enumerate()
                .filter(|(_, account)| account.id != 0)
                .map(|(slot, account)| (account.id, slot)),
        );
        debug_assert_eq!(order.len(), self.accounts.len);
        order.sort_unstable();
        hasher.update(&(self.accounts.len as u64).to_le_bytes());
        for run in order.chunks(DIGEST_STAGING_ACCOUNTS) {
            staging.clear();
            staging.extend(run.iter().map(|&(_, slot)| self.accounts.slots[slot]));
            hasher.update(bytemuck::cast_slice(staging));
        }
        let (older, newer) = self.transfers.as_slices();
        hasher
            .update(&(self.transfers.len as u64).to_le_bytes())
            .update(bytemuck::cast_slice(older))
            .update(bytemuck::cast_slice(newer));
        let legs = &self.legs_in_flight;
        hasher
            .update(&legs.sequence_next.to_le_bytes())
            .update(&legs.count.to_le_bytes())
            .update(&legs.amount.to_le_bytes());
        for leg in legs.oldest_first() {
            hasher.update(bytemuck::bytes_of(leg));
        }
        hasher
            .update(bytemuck::cast_slice(&self.legs_received.sequence_max[..]))
            .update(bytemuck::cast_slice(&self.legs_received.fingerprints[..]));
        hasher.finalize()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    fn account(id: u128) -> Account {
        Account {
            id,
            ledger: 1,
            code: 1,
            ..Account::zeroed()
        }
    }

    fn transfer(id: u128, debit: u128) -> Transfer {
        Transfer {
            id,
            debit_account_id: debit,
            ..Transfer::zeroed()
        }
    }

    /// Pushes `id` into the window; panics if it is there already. Returns the evicted id.
    fn push(window: &mut IndexedWindow<Transfer>, id: u128) -> Option<u128> {
        let LogProbe::Vacant { index_slot, hash } = window.probe(id) else {
            panic!("{id} present before push");
        };
        window.push(index_slot, hash, transfer(id, 1))
    }

    fn window_ids(window: &IndexedWindow<Transfer>) -> Vec<u128> {
        window.oldest_first().map(|record| record.id).collect()
    }

    /// Checks the window's invariants: one index entry per record, each pointing at its
    /// record, reachable from its home slot without crossing an empty entry.
    fn check_window(window: &IndexedWindow<Transfer>) {
        let entries = (0..window.capacity())
            .filter(|&slot| window.entry(slot).ordinal != 0)
            .count();
        assert_eq!(entries, window.len, "one index entry per record");
        for slot in 0..window.capacity() {
            let entry = window.entry(slot);
            if entry.ordinal == 0 {
                continue;
            }
            let position = entry.ordinal as usize - 1;
            assert!(position < window.len_max());
            let record = &window.records[position];
            let hash = hash_id(record.id, window.seed);
            assert_eq!(entry.tag, hash as u32, "slot {slot}");
            let mut probe = window.home_of(hash);
            while probe != slot {
                let cut_off = window.entry(probe).ordinal == 0;
                assert!(!cut_off, "slot {slot} cut off its home");
                probe = (probe + 1) & window.mask;
            }
        }
        for (position, record) in window.records[..window.len].iter().enumerate() {
            assert!(matches!(window.probe(record.id), LogProbe::Found(p) if p == position));
        }
    }

    /// `count` ids whose home slot in `window` is `slot`.
    fn ids_homed_at(window: &IndexedWindow<Transfer>, slot: usize, count: usize) -> Vec<u128> {
        (1..1_000_000)
            .filter(|&id| window.home_slot(id) == slot)
            .take(count)
            .collect()
    }

    #[test]
    fn table_capacity_is_a_power_of_two_at_most_two_thirds_full() {
        for len_max in [1, 2, 3, 10, 1000, 4096] {
            let capacity = table_capacity(len_max);
            assert!(capacity.is_power_of_two());
            assert!(
                len_max * 3 <= capacity * 2,
                "len_max={len_max} capacity={capacity}"
            );
        }
    }

    #[test]
    fn slot_table_finds_what_it_stored_and_stops_at_len_max() {
        let mut table: SlotTable<Account> = SlotTable::new(100, 7);
        for id in 1..=100 {
            let SlotProbe::Vacant(slot) = table.probe(id) else {
                panic!("{id} present before insert");
            };
            table.insert_at(slot, account(id));
        }
        assert!(table.is_full());
        for id in 1..=100 {
            let SlotProbe::Found(slot) = table.probe(id) else {
                panic!("{id} missing");
            };
            assert_eq!(table.slots[slot].id, id);
        }
        assert!(matches!(table.probe(101), SlotProbe::Vacant(_)));
        assert_eq!(table.entries().count(), 100);
    }

    #[test]
    fn slot_table_probe_wraps_around_the_end() {
        let mut table: SlotTable<Account> = SlotTable::new(5, 7); // capacity 8
        let last = table.mask;
        let homed_last: Vec<u128> = (1..10_000)
            .filter(|&id| table.home_slot(id) == last)
            .take(2)
            .collect();
        for &id in &homed_last {
            let SlotProbe::Vacant(slot) = table.probe(id) else {
                panic!()
            };
            table.insert_at(slot, account(id));
        }
        assert_eq!(table.slots[last].id, homed_last[0]);
        assert_eq!(table.slots[0].id, homed_last[1]);
        assert!(matches!(table.probe(homed_last[1]), SlotProbe::Found(0)));
    }

    #[test]
    fn indexed_window_appends_in_order_and_evicts_the_oldest() {
        let mut window: IndexedWindow<Transfer> = IndexedWindow::new(3, 3);
        assert_eq!(push(&mut window, 5), None);
        assert_eq!(push(&mut window, 6), None);
        assert_eq!(push(&mut window, 7), None);
        assert!(window.is_full());
        assert_eq!(window_ids(&window), [5, 6, 7]);
        assert_eq!(push(&mut window, 8), Some(5), "first in, first out");
        assert_eq!(push(&mut window, 5), Some(6), "an evicted id is new again");
        assert_eq!(window_ids(&window), [7, 8, 5]);
        let (older, newer) = window.as_slices();
        assert_eq!((older.len(), newer.len()), (1, 2), "the ring wrapped");
        assert!(matches!(window.probe(6), LogProbe::Vacant { .. }));
        assert!(matches!(window.probe(7), LogProbe::Found(2)));
        check_window(&window);
        assert_eq!(
            window.append_new(transfer(9, 1)),
            Err(RestoreError::Corrupt)
        );
        window.clear();
        assert!(window_ids(&window).is_empty());
        assert_eq!(window.append_new(transfer(7, 1)), Ok(()));
        assert_eq!(
            window.append_new(transfer(7, 1)),
            Err(RestoreError::Corrupt)
        );
        check_window(&window);
    }

    #[test]
    fn an_index_of_one_line_holds_every_collision() {
        // Four records (five while pushing) in one line of eight slots: every id collides.
        let mut window: IndexedWindow<Transfer> = IndexedWindow::new(4, 5);
        assert_eq!(window.capacity(), INDEX_BUCKET_ENTRIES);
        for id in 1..=200 {
            push(&mut window, id);
            check_window(&window);
        }
        assert_eq!(window_ids(&window), [197, 198, 199, 200]);
    }

    #[test]
    fn indexed_window_of_one_keeps_the_last_record() {
        let mut window: IndexedWindow<Transfer> = IndexedWindow::new(1, 3);
        for id in 1..=50 {
            assert_eq!(push(&mut window, id), (id > 1).then(|| id - 1));
            assert_eq!(window_ids(&window), [id]);
            check_window(&window);
        }
    }

    #[test]
    fn backward_shift_keeps_colliding_clusters_reachable() {
        // 32 slots in four lines; ids home at the last line, the first and the second, so
        // the clusters overflow their lines, wrap around the end of the index, and every
        // deletion shifts entries across lines and across the end.
        let mut window: IndexedWindow<Transfer> = IndexedWindow::new(10, 11);
        assert_eq!(window.capacity(), 32);
        let last = window.capacity() - INDEX_BUCKET_ENTRIES;
        let mut ids = ids_homed_at(&window, last, 40);
        ids.extend(ids_homed_at(&window, 0, 40));
        ids.extend(ids_homed_at(&window, INDEX_BUCKET_ENTRIES, 40));
        // Interleave the three home slots.
        let order: Vec<u128> = (0..40)
            .flat_map(|i| [ids[i], ids[40 + i], ids[80 + i]])
            .collect();
        let mut model: VecDeque<u128> = VecDeque::new();
        for &id in &order {
            let evicted = push(&mut window, id);
            model.push_back(id);
            let expected = (model.len() > 10).then(|| model.pop_front().unwrap());
            assert_eq!(evicted, expected);
            assert_eq!(window_ids(&window), Vec::from(model.clone()));
            check_window(&window);
            for &other in &order {
                let found = matches!(window.probe(other), LogProbe::Found(_));
                assert_eq!(found, model.contains(&other), "id {other}");
            }
        }
    }

    #[derive(Clone, Debug)]
    enum WindowOp {
        /// Append this id unless the window has it (then it must be found).
        Push(u128),
        /// Look this id up.
        Probe(u128),
    }

    fn window_op() -> impl Strategy<Value = WindowOp> {
        prop_oneof![
            3 => (1_u128..=48).prop_map(WindowOp::Push),
            1 => (1_u128..=48).prop_map(WindowOp::Probe),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a model (a `VecDeque` of the last `len_max` ids and a map of where each
        /// is), through many wrap-arounds of tiny, collision-heavy tables.
        #[test]
        fn indexed_window_matches_a_model(
            len_max in 1_usize..=12,
            seed in any::<u64>(),
            ops in proptest::collection::vec(window_op(), 1..400),
        ) {
            let mut window: IndexedWindow<Transfer> = IndexedWindow::new(len_max, seed);
            let mut model: VecDeque<u128> = VecDeque::new();
            for op in ops {
                match op {
                    WindowOp::Push(id) => match window.probe(id) {
                        LogProbe::Found(position) => {
                            prop_assert!(model.contains(&id));
                            prop_assert_eq!(window.records[position].id, id);
                        }
                        LogProbe::Vacant { index_slot, hash } => {
                            prop_assert!(!model.contains(&id));
                            let evicted = window.push(index_slot, hash, transfer(id, 1));
                            model.push_back(id);
                            let expected = (model.len() > len_max).then(|| model.pop_front().unwrap());
                            prop_assert_eq!(evicted, expected);
                        }
                    },
                    WindowOp::Probe(id) => {
                        let found = matches!(window.probe(id), LogProbe::Found(_));
                        prop_assert_eq!(found, model.contains(&id));
                    }
                }
                let map: std::collections::HashMap<u128, usize> =
                    model.iter().enumerate().map(|(age, &id)| (id, age)).collect();
                let ids = window_ids(&window);
                prop_assert_eq!(ids.len(), map.len());
                for (age, id) in ids.iter().enumerate() {
                    prop_assert_eq!(map.get(id), Some(&age));
                }
                check_window(&window);
            }
        }
    }

    fn leg(id: u128, amount: u128) -> Transfer {
        Transfer {
            id,
            debit_account_id: 1,
            credit_account_id: 2,
            amount,
            ledger: 1,
            code: 1,
            flags: transfer_flags::CROSS_SHARD_CREDIT,
            ..Transfer::zeroed()
        }
    }

    #[test]
    fn legs_in_flight_settle_once_and_hold_back_at_the_oldest() {
        let mut legs = LegsInFlight::new(3);
        let sent: Vec<Transfer> = (1..=3).map(|id| legs.push(leg(id, id * 10))).collect();
        assert_eq!(
            sent.iter().map(credit_leg_sequence).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(!legs.has_room());
        assert_eq!((legs.count, legs.amount), (3, 60));
        // Out of order: the second first. The oldest still holds the span.
        assert_eq!(legs.acknowledge(&sent[1]), CreditAckResult::Ok);
        assert_eq!(legs.acknowledge(&sent[1]), CreditAckResult::Duplicate);
        assert!(!legs.has_room(), "leg 1 is still in flight");
        assert_eq!((legs.count, legs.amount), (2, 40));
        let altered = Transfer {
            amount: 11,
            ..sent[0]
        };
        assert_eq!(legs.acknowledge(&altered), CreditAckResult::Mismatch);
        let unknown = with_credit_leg_sequence(sent[0], 4);
        assert_eq!(
            legs.acknowledge(&unknown),
            CreditAckResult::TransferNotFound
        );
        assert_eq!(legs.acknowledge(&sent[0]), CreditAckResult::Ok);
        assert_eq!(legs.sequence_oldest, 3, "skips the acknowledged second");
        assert!(legs.has_room());
        let fourth = legs.push(leg(4, 1));
        assert_eq!(credit_leg_sequence(&fourth), 4);
        assert_eq!(
            legs.oldest_first().map(|leg| leg.id).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(legs.acknowledge(&sent[0]), CreditAckResult::Duplicate);
        assert_eq!(legs.acknowledge(&sent[2]), CreditAckResult::Ok);
        assert_eq!(legs.acknowledge(&fourth), CreditAckResult::Ok);
        assert_eq!((legs.count, legs.amount), (0, 0));
        assert_eq!(legs.sequence_oldest, legs.sequence_next);
    }

    #[test]
    fn replay_windows_remember_exactly_the_last_width_numbers() {
        let mut windows = LegReplayWindows::new(3, 4);
        let (origin, other) = (1, 2);
        assert_eq!(windows.check(origin, 5, 77), LegReplay::New);
        windows.record(origin, 5, 77);
        assert_eq!(windows.check(origin, 5, 77), LegReplay::Duplicate);
        assert_eq!(windows.check(origin, 5, 78), LegReplay::Conflict);
        assert_eq!(
            windows.check(origin, 3, 9),
            LegReplay::New,
            "in range, not seen"
        );
        assert_eq!(windows.check(origin, 1, 9), LegReplay::Stale, "5 - 1 >= 4");
        assert_eq!(windows.check(other, 5, 77), LegReplay::New, "per origin");
        windows.record(origin, 3, 9);
        windows.record(origin, 7, 11); // slides past 3 and 4 (3 becomes stale)
        assert_eq!(windows.check(origin, 3, 9), LegReplay::Stale);
        assert_eq!(windows.check(origin, 4, 1), LegReplay::New);
        assert_eq!(windows.check(origin, 5, 77), LegReplay::Duplicate);
        assert_eq!(windows.check(origin, 6, 1), LegReplay::New);
        windows.record(origin, 100, 5); // a jump wider than the window clears it
        assert_eq!(windows.check(origin, 97, 1), LegReplay::New);
        assert_eq!(windows.check(origin, 96, 1), LegReplay::Stale);
        assert_eq!(windows.check(origin, 100, 5), LegReplay::Duplicate);
        let row = windows.slot(origin, 0);
        let remembered = windows.fingerprints[row..row + 4]
            .iter()
            .filter(|&&fingerprint| fingerprint != 0)
            .count();
        assert_eq!(remembered, 1);
    }

    #[test]
    fn leg_fingerprints_cover_the_fields_an_ack_must_match() {
        let base = with_credit_leg_sequence(leg(9, 5), 3);
        let fingerprint = credit_leg_fingerprint(&base);
        assert_ne!(fingerprint, 0);
        let restamped = Transfer {
            timestamp: 1234,
            flags: transfer_flags::CREDIT_PARKED,
            ..base
        };
        assert_eq!(credit_leg_fingerprint(&restamped), fingerprint);
        for changed in [
            Transfer { amount: 6, ..base },
            Transfer { id: 10, ..base },
            Transfer {
                user_data: 1,
                ..base
            },
            Transfer { code: 2, ..base },
            with_credit_leg_sequence(base, 4),
        ] {
            assert_ne!(credit_leg_fingerprint(&changed), fingerprint);
        }
    }

    /// The digest hashes the accounts in id order: the same accounts placed under another
    /// seed, in another order, give the same digest; another set, one field of one account,
    /// or two accounts' balances swapped, another.
    #[test]
    fn the_digest_covers_the_accounts_in_id_order_whatever_the_layout() {
        let mut config = LedgerConfig::new(0, 1);
        config.accounts_max = 64;
        let build = |seed: u64, accounts: &[Account]| -> Ledger {
            let mut ledger = Ledger::with_hash_seed(config, seed);
            for account in accounts {
                let SlotProbe::Vacant(slot) = ledger.accounts.probe(account.id) else {
                    panic!("account {} twice", account.id)
                };
                ledger.accounts.insert_at(slot, *account);
            }
            ledger
        };
        let accounts: Vec<Account> = (1..=50)
            .map(|id| Account {
                timestamp: id as u64,
                credits_posted: 1_000 + id,
                ..account(id)
            })
            .collect();
        let one = build(1, &accounts);
        let reversed: Vec<Account> = accounts.iter().rev().copied().collect();
        let other = build(2, &reversed);
        let layout = |ledger: &Ledger| -> Vec<u128> {
            ledger.accounts.entries().map(|entry| entry.id).collect()
        };
        assert_ne!(layout(&one), layout(&other));
        assert_eq!(one.digest(), other.digest());
        assert_eq!(one.digest(), one.digest(), "the scratch is refilled");

        let shifted: Vec<Account> = (2..=51).map(account).collect();
        let mut one_field = accounts.clone();
        one_field[17].user_data ^= 1;
        let mut swapped = accounts.clone();
        let (first, second) = (swapped[3].credits_posted, swapped[40].credits_posted);
        swapped[3].credits_posted = second;
        swapped[40].credits_posted = first;
        let fewer = &accounts[..49];
        for (name, changed) in [
            ("another set", build(1, &shifted)),
            ("one field of one account", build(1, &one_field)),
            ("two balances swapped", build(1, &swapped)),
            ("one account fewer", build(1, fewer)),
        ] {
            assert_ne!(changed.digest(), one.digest(), "{name}");
        }
    }

    /// Replicas whose hash seeds differ (during a cluster key rotation each node derives
    /// its seed from its own cluster key) answer every request alike and reach the same
    /// digest; a snapshot taken under one seed restores under the other to that digest.
    /// Only the tables' layout, and so the snapshot's bytes, differ.
    #[test]
    fn ledgers_with_different_hash_seeds_agree_on_results_and_digests() {
        let mut config = LedgerConfig::new(0, 1);
        config.accounts_max = 256;
        config.transfers_max = 64;
        let mut one = Ledger::with_hash_seed(config, 0x0123);
        let mut other = Ledger::with_hash_seed(config, 0xFEDC_BA98);
        let mut op = 0;
        let mut apply_both = |operation: LedgerOperation, records: Vec<RecordSlot>| {
            op += 1;
            let mut records = records;
            one.prepare(operation, op * 10, &mut records);
            let mut results = [vec![RecordResult::zeroed(); records.len()], Vec::new()];
            results[1] = results[0].clone();
            one.apply(op, operation, &records, &mut results[0]);
            other.apply(op, operation, &records, &mut results[1]);
            let codes = |results: &[RecordResult]| -> Vec<u32> {
                results.iter().map(|result| result.code).collect()
            };
            assert_eq!(codes(&results[0]), codes(&results[1]), "op {op}");
            assert_eq!(one.digest(), other.digest(), "op {op}");
            codes(&results[0])
        };
        // Accounts 1..=200, some twice (`Exists`).
        for first in (1..=200u128).step_by(50) {
            let records = (first..first + 50)
                .chain([first, 7])
                .map(|id| RecordSlot::from_account(&account(id)))
                .collect();
            apply_both(LedgerOperation::CreateAccounts, records);
        }
        // Transfers past the window (evictions), duplicates, and ones that fail.
        let mut outcomes = std::collections::BTreeSet::new();
        for batch in 0..20u128 {
            let records = (0..10u128)
                .map(|index| {
                    let id = 1 + batch * 7 + index;
                    let mut transfer = transfer(id, 1 + id % 200);
                    transfer.credit_account_id = if index == 3 { 999 } else { 1 + (id * 3) % 200 };
                    transfer.amount = 1 + id;
                    transfer.ledger = 1;
                    transfer.code = 1;
                    RecordSlot::from_transfer(&transfer)
                })
                .collect();
            outcomes.extend(apply_both(LedgerOperation::CreateTransfers, records));
        }
        assert!(
            outcomes.len() >= 3,
            "successes, duplicates and failures: {outcomes:?}"
        );
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let digest = one.snapshot_and_digest(&mut a);
        assert_eq!(other.snapshot_and_digest(&mut b), digest);
        assert_ne!(a, b, "the layouts differ");
        let mut restored = Ledger::with_hash_seed(config, 0xFEDC_BA98);
        restored.restore(&a).expect("restores under another seed");
        assert_eq!(restored.digest(), digest);
    }

    #[test]
    fn config_validation_names_the_bad_bound() {
        assert_eq!(LedgerConfig::new(3, 4).validate(), Ok(()));
        assert_eq!(
            LedgerConfig::new(4, 4).validate(),
            Err(LedgerConfigError::ShardIndex {
                shard_index: 4,
                shard_count: 4
            })
        );
        let no_window = LedgerConfig {
            transfers_max: 0,
            ..LedgerConfig::new(0, 1)
        };
        assert!(matches!(
            no_window.validate(),
            Err(LedgerConfigError::OutOfRange {
                name: "transfers_max",
                ..
            })
        ));
        let huge_batch = LedgerConfig {
            batch_entries_max: BATCH_ENTRIES_MAX_LIMIT + 1,
            ..LedgerConfig::new(0, 1)
        };
        assert!(huge_batch.validate().is_err());
        // The documented default footprint: about 170 MiB per shard, plus 256 KiB per shard
        // of the cluster.
        let one = LedgerConfig::new(0, 1).memory_bytes();
        let eight = LedgerConfig::new(0, 8).memory_bytes();
        assert_eq!(eight - one, 7 * (256 << 10) + 7 * 8);
        assert!((168 << 20..172 << 20).contains(&one), "{one}");
    }

    #[test]
    fn route_sends_each_record_where_apply_accepts_it() {
        let shard_count = 4;
        let id_on = |shard: u32| {
            (1..)
                .find(|&id| shard_of(id, shard_count) == shard)
                .unwrap()
        };
        let (debit, credit) = (id_on(1), id_on(3));
        let account = RecordSlot::from_account(&account(debit));
        let leg = RecordSlot::from_transfer(&Transfer {
            credit_account_id: credit,
            ..transfer(9, debit)
        });
        let route = |operation, record| Ledger::route(operation, record, shard_count);
        assert_eq!(route(LedgerOperation::CreateAccounts, &account), 1);
        assert_eq!(route(LedgerOperation::CreateTransfers, &leg), 1);
        assert_eq!(route(LedgerOperation::ApplyCreditLegs, &leg), 3);
        assert_eq!(route(LedgerOperation::AckCreditLegs, &leg), 1);
    }

    #[test]
    fn crosses_shards_is_a_transfer_whose_credit_account_lives_elsewhere() {
        let shard_count = 4;
        let id_on = |shard: u32, after: u128| {
            (after + 1..)
                .find(|&id| shard_of(id, shard_count) == shard)
                .unwrap()
        };
        let (debit, same, other) = (id_on(1, 0), id_on(1, id_on(1, 0)), id_on(3, 0));
        let to = |credit| {
            RecordSlot::from_transfer(&Transfer {
                credit_account_id: credit,
                amount: 1,
                ledger: 1,
                code: 1,
                ..transfer(9, debit)
            })
        };
        let crosses = |operation, record: &RecordSlot, shards| {
            let ledger = Ledger::crosses_shards(operation, record, shards);
            let sessioned =
                crate::session::Sessioned::<Ledger>::crosses_shards(operation, record, shards);
            assert_eq!(ledger, sessioned, "Sessioned forwards to the ledger");
            ledger
        };
        let (across, within) = (to(other), to(same));
        assert!(crosses(
            LedgerOperation::CreateTransfers,
            &across,
            shard_count
        ));
        assert!(!crosses(
            LedgerOperation::CreateTransfers,
            &within,
            shard_count
        ));
        // One shard: nothing crosses.
        assert!(!crosses(LedgerOperation::CreateTransfers, &across, 1));
        // Account creation and the internal operations never cross.
        let created = RecordSlot::from_account(&account(other));
        assert!(!crosses(
            LedgerOperation::CreateAccounts,
            &created,
            shard_count
        ));
        assert!(!crosses(
            LedgerOperation::ApplyCreditLegs,
            &across,
            shard_count
        ));
        assert!(!crosses(
            LedgerOperation::AckCreditLegs,
            &across,
            shard_count
        ));
        // It agrees with what apply does: the crossing transfer, and only it, sends a leg.
        for (record, legs) in [(across, 1), (within, 0)] {
            let mut ledger = Ledger::new(LedgerConfig::new(1, shard_count));
            let mut accounts: Vec<RecordSlot> = [debit, same]
                .iter()
                .map(|&id| {
                    RecordSlot::from_account(&Account {
                        flags: crate::record::account_flags::ALLOW_NEGATIVE,
                        ..account(id)
                    })
                })
                .collect();
            ledger.prepare(LedgerOperation::CreateAccounts, 1, &mut accounts);
            let mut results = vec![RecordResult::zeroed(); 2];
            ledger.apply(1, LedgerOperation::CreateAccounts, &accounts, &mut results);
            let mut transfers = [record];
            ledger.prepare(LedgerOperation::CreateTransfers, 2, &mut transfers);
            let mut results = vec![RecordResult::zeroed(); 1];
            ledger.apply(
                2,
                LedgerOperation::CreateTransfers,
                &transfers,
                &mut results,
            );
            let mut sent = 0;
            while ledger.poll_outbound().is_some() {
                sent += 1;
            }
            assert_eq!(sent, legs, "{results:?}");
        }
    }

    #[test]
    fn internal_records_are_stamped_from_the_batch_and_replicated_state_alike() {
        let shard_count = 2;
        let legs_of = |count: u128| -> Vec<RecordSlot> {
            (0..count)
                .map(|id| RecordSlot::from_transfer(&transfer(100 + id, 1)))
                .collect()
        };
        let stamps = |records: &[RecordSlot]| -> Vec<u64> {
            records
                .iter()
                .map(|record| record.as_transfer().timestamp)
                .collect()
        };
        let (mut leader, mut backup) = (
            Ledger::new(LedgerConfig::new(0, shard_count)),
            Ledger::new(LedgerConfig::new(0, shard_count)),
        );
        let mut accounts = [RecordSlot::from_account(&account(1))];
        leader.prepare(LedgerOperation::CreateAccounts, 10, &mut accounts);
        for ledger in [&mut leader, &mut backup] {
            let mut results = [RecordResult::zeroed()];
            ledger.apply(1, LedgerOperation::CreateAccounts, &accounts, &mut results);
        }
        // The leader prepared a client batch that has not committed yet, then proposes
        // three certified legs: it reserves their timestamps on a copy (its clock is
        // behind), and proposes the first as the batch's `now_ns`.
        let mut pending = [RecordSlot::from_transfer(&transfer(50, 1))];
        leader.prepare(LedgerOperation::CreateTransfers, 40, &mut pending);
        let mut reserved = legs_of(3);
        leader.prepare(LedgerOperation::ApplyCreditLegs, 15, &mut reserved);
        let now_ns = reserved[0].as_transfer().timestamp;
        assert_eq!(now_ns, pending[0].as_transfer().timestamp + 1);
        // Every replica stamps alike from `now_ns` and replicated state, the leader too;
        // `Sessioned` forwards.
        for ledger in [&leader, &backup] {
            let mut legs = legs_of(3);
            ledger.stamp_internal(LedgerOperation::ApplyCreditLegs, now_ns, &mut legs);
            assert_eq!(stamps(&legs), stamps(&reserved));
        }
        let mut legs = legs_of(3);
        let sessioned =
            crate::session::Sessioned::new(Ledger::new(LedgerConfig::new(0, shard_count)), 4, 64);
        sessioned.stamp_internal(LedgerOperation::ApplyCreditLegs, now_ns, &mut legs);
        assert_eq!(stamps(&legs), stamps(&reserved));
        // The leader's next batch is ordered after the reserved legs.
        let mut next = [RecordSlot::from_transfer(&transfer(51, 1))];
        leader.prepare(LedgerOperation::CreateTransfers, 15, &mut next);
        assert!(next[0].as_transfer().timestamp > *stamps(&reserved).last().unwrap());
        // A `now_ns` below the committed timestamps (a Byzantine or lagging leader) cannot
        // make them decrease, and one at the end of time counts as `TIMESTAMP_MAX`.
        let mut legs = legs_of(2);
        backup.stamp_internal(LedgerOperation::ApplyCreditLegs, 0, &mut legs);
        assert_eq!(stamps(&legs), [11, 12]);
        backup.stamp_internal(LedgerOperation::ApplyCreditLegs, u64::MAX, &mut legs);
        assert_eq!(stamps(&legs), [TIMESTAMP_MAX, TIMESTAMP_MAX + 1]);
        // Acknowledgements and client records are not internal records to stamp.
        for operation in [
            LedgerOperation::AckCreditLegs,
            LedgerOperation::CreateTransfers,
        ] {
            let mut records = legs_of(2);
            backup.stamp_internal(operation, 99, &mut records);
            assert_eq!(stamps(&records), [0, 0]);
        }
    }

    #[test]
    fn client_operation_refuses_internal_operations() {
        assert_eq!(
            Ledger::client_operation(ClientOperation::CreateTransfers.into()),
            Some(LedgerOperation::CreateTransfers)
        );
        assert_eq!(
            Ledger::client_operation(LedgerOperation::ApplyCreditLegs.into()),
            None
        );
        assert_eq!(
            Ledger::client_operation(LedgerOperation::AckCreditLegs.into()),
            None
        );
        assert_eq!(Ledger::client_operation(ClientOperation::Ping.into()), None);
    }
}
