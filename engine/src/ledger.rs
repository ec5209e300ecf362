//! The reference double-entry ledger: one shard's accounts and transfers, as a
//! [`StateMachine`].
//!
//! A `Ledger` is one shard (`shard_index` of `shard_count`). It owns the accounts with
//! `shard_of(id) == shard_index`, the transfers debited from them, and the credit legs it
//! received from other shards. Every table is allocated (and its memory touched) once in
//! [`Ledger::new`]; `apply` never allocates. It must never perform I/O, read a clock, or let
//! anything but the committed batches decide its state.
//!
//! # Storage
//! Accounts live in an open-addressing table of the records themselves (linear probing,
//! power-of-two capacity, at most two-thirds full): a transfer finds and updates an account
//! with one memory access. Transfers and credit legs are written once and rarely read, so
//! they are appended to a dense array and found through an index of 16-byte entries: checking
//! a new id probes 16 bytes instead of 128. The table hash is seeded from the configuration so
//! clients cannot choose ids that collide; layouts may differ between replicas, so digests and
//! snapshots never depend on them.
//!
//! # Cross-shard transfers
//! A transfer is submitted to its debit account's shard (the origin). If the credit account
//! is local, both legs post at once. Otherwise the origin posts the debit, stores the transfer
//! with `CREDIT_IN_FLIGHT`, adds the amount to [`Ledger::in_flight`] and emits the credit leg
//! (the transfer with flags `CROSS_SHARD_CREDIT`) as an `ApplyCreditLegs` record for the
//! credit shard. The credit shard applies each leg at most once (deduplicated by transfer id
//! and origin shard) and acknowledges it with an `AckCreditLegs` record; the origin then clears
//! `CREDIT_IN_FLIGHT`. Unacknowledged legs are listed by [`Ledger::credit_legs_unacked`] so
//! the runtime can resend them; redelivered legs are acknowledged again and change nothing.
//!
//! The origin cannot check a remote credit account. Rule: the credit shard never refuses
//! money. A leg whose credit account is missing, on another ledger or would overflow is parked
//! in the shard's suspense balance ([`Ledger::suspense`]), marked `CREDIT_PARKED`, and
//! acknowledged like any other; an operator settles suspense later.
//!
//! # Conservation
//! [`Ledger::conservation_sum`] is the sum over local accounts of `credits_posted -
//! debits_posted`, plus suspense. Summed over all shards, plus the amounts of legs emitted but
//! not yet applied at their credit shard, it is always 0 (modulo 2^128).
//!
//! # Transfer ids
//! Ids are unique per debit shard: the ledger cannot see other shards' ids, so two transfers
//! with one id but debit accounts on different shards are both accepted. Clients must draw ids
//! from a space they own (e.g. time-ordered random 128-bit ids), as with TigerBeetle.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::VecDeque;
use std::fmt;

use bytemuck::{Pod, Zeroable};

use crate::checksum::{Digest256, Digest256Hasher, digest256};
use crate::frame::Operation as ClientOperation;
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

/// Sizes and identity of one ledger shard. Every bound is fixed here; nothing grows later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// This shard's index, `< shard_count`.
    pub shard_index: u32,
    /// Number of shards accounts are spread over (see [`shard_of`]).
    pub shard_count: u32,
    /// Most accounts this shard holds.
    pub accounts_max: usize,
    /// Most transfers debited on this shard (each kept forever for idempotency); below
    /// `u32::MAX`.
    pub transfers_max: usize,
    /// Most credit legs received from other shards (each kept forever for deduplication);
    /// below `u32::MAX`.
    pub credit_legs_max: usize,
    /// Most records in one batch; also the outbox capacity (one message per record at most).
    pub batch_entries_max: usize,
}

/// Table hash seed of [`Ledger::new`]. Public knowledge: a runtime that serves untrusted
/// clients should use [`Ledger::with_hash_seed`] instead.
pub const HASH_SEED_DEFAULT: u64 = u64::from_le_bytes(*b"PCTABLE1");

/// Snapshot magic (`"PCLS"`, percore ledger snapshot) and format version.
const SNAPSHOT_MAGIC: u32 = u32::from_le_bytes(*b"PCLS");
const SNAPSHOT_VERSION: u32 = 1;

/// Records per group in `apply`: the table slots of a whole group are loaded together
/// before the group is applied, so their memory misses overlap (see `touch_transfers`).
const TOUCH_GROUP_RECORDS: usize = 16;

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

/// `len` zeroed records, written one by one into uninitialised memory (never the allocator's
/// lazily mapped zero pages): the memory is committed at start-up, so an out-of-memory
/// surfaces here, not under load, and the hot path takes no page faults.
fn zeroed_committed<T: Pod>(len: usize) -> Box<[T]> {
    let mut records = Vec::with_capacity(len);
    records.resize(len, T::zeroed());
    records.into_boxed_slice()
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
            slots: zeroed_committed(capacity),
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

/// An entry of an `IndexedLog`'s index: 16 bytes, four to a cache line.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct IndexEntry {
    /// Full hash of the record's id: most mismatches are settled without reading the record.
    hash: u64,
    /// Position of the record plus one; 0 marks an empty entry.
    ordinal: u32,
    reserved: u32,
}

enum LogProbe {
    Found(usize),
    Vacant { index_slot: usize, hash: u64 },
}

/// Records appended to a dense array, found through an open-addressing index. For records
/// written once and rarely read (transfers, credit legs): appends are sequential, and a
/// probe for a new id reads 16-byte index entries only.
struct IndexedLog<T> {
    records: Box<[T]>,
    len: usize,
    index: Box<[IndexEntry]>,
    mask: usize,
    seed: u64,
}

impl<T: Keyed> IndexedLog<T> {
    fn new(len_max: usize, seed: u64) -> IndexedLog<T> {
        assert!(len_max < u32::MAX as usize, "positions are u32");
        let capacity = table_capacity(len_max);
        IndexedLog {
            records: zeroed_committed(len_max),
            len: 0,
            index: zeroed_committed(capacity),
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

    fn home_slot(&self, id: u128) -> usize {
        hash_id(id, self.seed) as usize & self.mask
    }

    /// Loads an index entry; see `Ledger::touch_transfers`.
    fn touch(&self, index_slot: usize) -> u128 {
        u128::from(self.index[index_slot].hash)
    }

    /// The position of the record with `id` for which `matches` holds, or the index entry
    /// where such a record would be filed.
    #[inline]
    fn probe(&self, id: u128, matches: impl Fn(&T) -> bool) -> LogProbe {
        debug_assert_ne!(id, 0);
        let hash = hash_id(id, self.seed);
        let mut index_slot = hash as usize & self.mask;
        // Bounded: the index is at most two-thirds full, so an empty entry ends every probe.
        for _ in 0..self.index.len() {
            let entry = self.index[index_slot];
            if entry.ordinal == 0 {
                return LogProbe::Vacant { index_slot, hash };
            }
            if entry.hash == hash {
                let position = entry.ordinal as usize - 1;
                let record = &self.records[position];
                if record.id() == id && matches(record) {
                    return LogProbe::Found(position);
                }
            }
            index_slot = (index_slot + 1) & self.mask;
        }
        unreachable!("an index always keeps an empty entry");
    }

    fn append(&mut self, index_slot: usize, hash: u64, record: T) {
        assert!(!self.is_full());
        debug_assert_eq!(hash, hash_id(record.id(), self.seed));
        debug_assert_eq!(self.index[index_slot].ordinal, 0, "index entry is taken");
        self.records[self.len] = record;
        self.len += 1;
        self.index[index_slot] = IndexEntry {
            hash,
            ordinal: self.len as u32,
            reserved: 0,
        };
    }

    /// Appends a record that must not be present yet (snapshot restore).
    fn append_new(&mut self, record: T, matches: impl Fn(&T) -> bool) -> Result<(), RestoreError> {
        if record.id() == 0 || self.is_full() {
            return Err(RestoreError::Corrupt);
        }
        match self.probe(record.id(), matches) {
            LogProbe::Found(_) => Err(RestoreError::Corrupt),
            LogProbe::Vacant { index_slot, hash } => {
                self.append(index_slot, hash, record);
                Ok(())
            }
        }
    }

    fn records(&self) -> &[T] {
        &self.records[..self.len]
    }

    fn clear(&mut self) {
        self.records[..self.len].fill(T::zeroed());
        self.index.fill(IndexEntry::zeroed());
        self.len = 0;
    }
}

/// Order-independent digest of a set of records: the lane-wise wrapping sum of each record's
/// BLAKE3 digest (an additive multiset hash). Independent of table layout and seed.
fn multiset_digest<'a, T: Pod>(records: impl Iterator<Item = &'a T>) -> [u64; 4] {
    let mut lanes = [0_u64; 4];
    for record in records {
        let record_lanes: [u64; 4] = bytemuck::cast(digest256(bytemuck::bytes_of(record)));
        for (lane, record_lane) in lanes.iter_mut().zip(record_lanes) {
            *lane = lane.wrapping_add(record_lane);
        }
    }
    lanes
}

/// The on-disk header of a ledger snapshot, followed by the accounts, the transfers and the
/// credit legs (128 bytes each; transfers and legs in the order they were applied).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
struct SnapshotHeader {
    magic: u32,
    version: u32,
    shard_index: u32,
    shard_count: u32,
    in_flight: u128,
    suspense: u128,
    accounts_count: u64,
    transfers_count: u64,
    credit_legs_count: u64,
    credit_legs_unacked: u64,
    commit_op_last: u64,
    commit_timestamp_last: u64,
    digest: [u8; 32],
}

const SNAPSHOT_HEADER_BYTES: usize = size_of::<SnapshotHeader>();
const _: () = assert!(SNAPSHOT_HEADER_BYTES == 128);

/// One shard of the reference double-entry ledger. See the module documentation.
pub struct Ledger {
    config: LedgerConfig,
    accounts: SlotTable<Account>,
    transfers: IndexedLog<Transfer>,
    credit_legs: IndexedLog<Transfer>,
    outbox: VecDeque<LedgerOutbound>,
    /// Sum of the amounts of legs emitted and not yet acknowledged (mod 2^128).
    in_flight: u128,
    credit_legs_unacked: u64,
    /// Sum of the amounts of parked credit legs.
    suspense: u128,
    commit_op_last: u64,
    commit_timestamp_last: u64,
    /// Leader-only: the last timestamp handed out by `prepare` (not replicated state).
    prepare_timestamp_last: u64,
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("config", &self.config)
            .field("accounts", &self.accounts.len)
            .field("transfers", &self.transfers.len)
            .field("credit_legs", &self.credit_legs.len)
            .field("outbox", &self.outbox.len())
            .field("in_flight", &self.in_flight)
            .field("credit_legs_unacked", &self.credit_legs_unacked)
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
    /// If a bound in `config` is zero or too large, or `shard_index >= shard_count`.
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
        assert!(config.shard_count > 0, "shard_count must be positive");
        assert!(
            config.shard_index < config.shard_count,
            "shard_index out of range"
        );
        assert!(
            config.batch_entries_max > 0,
            "batch_entries_max must be positive"
        );
        assert!(
            config.batch_entries_max <= u32::MAX as usize,
            "results index with u32"
        );
        // Distinct seeds per table: a collision in one says nothing about another.
        let seed = |table: u64| hash_seed ^ table.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ledger {
            config,
            accounts: SlotTable::new(config.accounts_max, seed(1)),
            transfers: IndexedLog::new(config.transfers_max, seed(2)),
            credit_legs: IndexedLog::new(config.credit_legs_max, seed(3)),
            outbox: VecDeque::with_capacity(config.batch_entries_max),
            in_flight: 0,
            credit_legs_unacked: 0,
            suspense: 0,
            commit_op_last: 0,
            commit_timestamp_last: 0,
            prepare_timestamp_last: 0,
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

    /// The transfer with `id` debited on this shard, as stored (flags show whether its
    /// credit leg is still in flight).
    pub fn lookup_transfer(&self, id: u128) -> Option<Transfer> {
        if id == 0 {
            return None;
        }
        match self.transfers.probe(id, |_| true) {
            LogProbe::Found(position) => Some(self.transfers.records[position]),
            LogProbe::Vacant { .. } => None,
        }
    }

    /// The credit leg of transfer `id` from shard `origin_shard`, if this shard applied (or
    /// parked) it.
    pub fn lookup_credit_leg(&self, id: u128, origin_shard: u32) -> Option<Transfer> {
        if id == 0 {
            return None;
        }
        match self
            .credit_legs
            .probe(id, self.debited_on_shard(origin_shard))
        {
            LogProbe::Found(position) => Some(self.credit_legs.records[position]),
            LogProbe::Vacant { .. } => None,
        }
    }

    /// Number of accounts held.
    pub fn accounts_count(&self) -> usize {
        self.accounts.len
    }

    /// Number of transfers debited on this shard.
    pub fn transfers_count(&self) -> usize {
        self.transfers.len
    }

    /// Number of credit legs received and applied or parked.
    pub fn credit_legs_count(&self) -> usize {
        self.credit_legs.len
    }

    /// Sum of the amounts of credit legs emitted and not yet acknowledged (mod 2^128).
    pub fn in_flight(&self) -> u128 {
        self.in_flight
    }

    /// Number of credit legs emitted and not yet acknowledged.
    pub fn credit_legs_unacked_count(&self) -> u64 {
        self.credit_legs_unacked
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

    /// Every credit leg emitted and not yet acknowledged, oldest first, as the messages to
    /// resend (after a view change, a restart, or a resend timeout). Scans every transfer:
    /// call it rarely, and only while `credit_legs_unacked_count() > 0`.
    pub fn credit_legs_unacked(&self) -> impl Iterator<Item = LedgerOutbound> + '_ {
        self.transfers
            .records()
            .iter()
            .filter(|transfer| transfer.flags & transfer_flags::CREDIT_IN_FLIGHT != 0)
            .map(|transfer| self.credit_leg_outbound(transfer))
    }

    /// Whether this shard owns `account_id`.
    #[inline]
    fn owns(&self, account_id: u128) -> bool {
        self.config.shard_count == 1
            || shard_of(account_id, self.config.shard_count) == self.config.shard_index
    }

    /// A predicate: the transfer was debited on `origin_shard`.
    fn debited_on_shard(&self, origin_shard: u32) -> impl Fn(&Transfer) -> bool + use<> {
        let shard_count = self.config.shard_count;
        move |transfer| shard_of(transfer.debit_account_id, shard_count) == origin_shard
    }

    fn credit_leg_outbound(&self, transfer: &Transfer) -> LedgerOutbound {
        let leg = Transfer {
            flags: transfer_flags::CROSS_SHARD_CREDIT,
            ..*transfer
        };
        Outbound {
            shard: shard_of(leg.credit_account_id, self.config.shard_count),
            operation: LedgerOperation::ApplyCreditLegs,
            record: RecordSlot::from_transfer(&leg),
        }
    }

    fn push_outbound(&mut self, outbound: LedgerOutbound) {
        // `apply` checked room for one message per record, so this never reallocates.
        debug_assert!(self.outbox.len() < self.config.batch_entries_max);
        self.outbox.push_back(outbound);
    }

    fn observe_timestamp(&mut self, timestamp: u64) {
        debug_assert!(
            timestamp > self.commit_timestamp_last,
            "records must be prepared: timestamps increase"
        );
        self.commit_timestamp_last = timestamp;
    }

    /// Loads the table slots `create_transfer` will probe first, for a group of transfers.
    ///
    /// A probe of a large table is a cache and TLB miss (hundreds of ns on a busy machine).
    /// Applying records one by one pays those misses one after another. Here the home slots
    /// are computed first (arithmetic only), then loaded in one tight loop of independent
    /// loads that the CPU keeps in flight together; the probes that follow hit the cache.
    /// A prefetch instruction would not even occupy the core, but needs `unsafe`, which this
    /// module forbids. Returns a value only so the loads are not optimised away.
    fn touch_transfers(&self, transfers: &[Transfer]) -> u128 {
        debug_assert!(transfers.len() <= TOUCH_GROUP_RECORDS);
        let mut homes = [(0_usize, 0_usize, 0_usize); TOUCH_GROUP_RECORDS];
        for (home, transfer) in homes.iter_mut().zip(transfers) {
            *home = (
                self.transfers.home_slot(transfer.id),
                self.accounts.home_slot(transfer.debit_account_id),
                self.accounts.home_slot(transfer.credit_account_id),
            );
        }
        let mut touched = 0;
        for &(transfer_slot, debit_slot, credit_slot) in &homes[..transfers.len()] {
            touched ^= self.transfers.touch(transfer_slot)
                ^ self.accounts.touch(debit_slot)
                ^ self.accounts.touch(credit_slot);
        }
        touched
    }

    fn create_account(&mut self, account: &Account) -> CreateAccountResult {
        use CreateAccountResult as R;
        self.observe_timestamp(account.timestamp);
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
        self.observe_timestamp(transfer.timestamp);
        if let Err(result) = validate_transfer(transfer) {
            return result;
        }
        if !self.owns(transfer.debit_account_id) {
            return R::DebitAccountNotOnShard;
        }
        // Idempotency before balances: a retry of an applied transfer reports `Exists` even
        // if the balance has since changed.
        let (index_slot, hash) = match self.transfers.probe(transfer.id, |_| true) {
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
        if self.transfers.is_full() {
            return R::TransfersTableFull;
        }

        // Commit point: every check passed, nothing below can fail.
        self.accounts.slots[debit_slot].debits_posted = debits_posted;
        let mut stored = *transfer;
        if let (Some(slot), Some(credits_posted)) = (credit_slot, credits_posted) {
            self.accounts.slots[slot].credits_posted = credits_posted;
        } else {
            stored.flags |= transfer_flags::CREDIT_IN_FLIGHT;
            self.in_flight = self.in_flight.wrapping_add(transfer.amount);
            self.credit_legs_unacked += 1;
            let outbound = self.credit_leg_outbound(&stored);
            self.push_outbound(outbound);
        }
        self.transfers.append(index_slot, hash, stored);
        R::Ok
    }

    fn apply_credit_leg(&mut self, leg: &Transfer) -> CreditLegResult {
        use CreditLegResult as R;
        self.observe_timestamp(leg.timestamp);
        if leg.flags != transfer_flags::CROSS_SHARD_CREDIT
            || leg.id == 0
            || leg.debit_account_id == 0
            || leg.credit_account_id == 0
            || leg.amount == 0
            || leg.reserved != [0; 32]
        {
            return R::LegInvalid;
        }
        let origin = shard_of(leg.debit_account_id, self.config.shard_count);
        if origin == self.config.shard_index {
            return R::LegInvalid;
        }
        let (index_slot, hash) = match self
            .credit_legs
            .probe(leg.id, self.debited_on_shard(origin))
        {
            LogProbe::Found(position) => {
                let applied = self.credit_legs.records[position];
                if !transfer_fields_equal(&applied, leg) {
                    return R::LegConflict;
                }
                // The first acknowledgement may have been lost: acknowledge again.
                self.push_ack(origin, &applied);
                return R::Duplicate;
            }
            LogProbe::Vacant { index_slot, hash } => (index_slot, hash),
        };
        if self.credit_legs.is_full() {
            return R::LegsTableFull;
        }

        let mut stored = *leg;
        let result = match self.credit_leg_target(leg) {
            Ok((account_slot, credits_posted)) => {
                self.accounts.slots[account_slot].credits_posted = credits_posted;
                R::Ok
            }
            Err(parked) => {
                let Some(suspense) = self.suspense.checked_add(leg.amount) else {
                    return R::SuspenseOverflow;
                };
                self.suspense = suspense;
                stored.flags |= transfer_flags::CREDIT_PARKED;
                parked
            }
        };
        self.credit_legs.append(index_slot, hash, stored);
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
        use CreditAckResult as R;
        if ack.id == 0 || !self.owns(ack.debit_account_id) {
            return R::TransferNotFound;
        }
        let LogProbe::Found(position) = self.transfers.probe(ack.id, |_| true) else {
            return R::TransferNotFound;
        };
        let transfer = &mut self.transfers.records[position];
        if !transfer_fields_equal(transfer, ack) {
            return R::Mismatch;
        }
        if transfer.flags & transfer_flags::CREDIT_IN_FLIGHT == 0 {
            return R::Duplicate;
        }
        transfer.flags &= !transfer_flags::CREDIT_IN_FLIGHT;
        let amount = transfer.amount;
        assert!(self.credit_legs_unacked > 0);
        self.credit_legs_unacked -= 1;
        self.in_flight = self.in_flight.wrapping_sub(amount);
        R::Ok
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
        self.credit_legs.clear();
        self.outbox.clear();
        self.in_flight = 0;
        self.credit_legs_unacked = 0;
        self.suspense = 0;
        self.commit_op_last = 0;
        self.commit_timestamp_last = 0;
        self.prepare_timestamp_last = 0;
    }

    fn restore_into_empty(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
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
        {
            return Err(RestoreError::ConfigMismatch);
        }
        let count = |count: u64, max: usize| match usize::try_from(count) {
            Ok(count) if count <= max => Ok(count),
            _ => Err(RestoreError::CapacityExceeded),
        };
        let accounts_count = count(header.accounts_count, self.accounts.len_max)?;
        let transfers_count = count(header.transfers_count, self.transfers.len_max())?;
        let credit_legs_count = count(header.credit_legs_count, self.credit_legs.len_max())?;
        let expected = (accounts_count + transfers_count + credit_legs_count)
            .checked_mul(RECORD_BYTES)
            .and_then(|body| body.checked_add(SNAPSHOT_HEADER_BYTES))
            .ok_or(RestoreError::Corrupt)?;
        if bytes.len() != expected {
            return Err(RestoreError::LengthMismatch {
                bytes: bytes.len(),
                expected,
            });
        }

        let mut records = bytes[SNAPSHOT_HEADER_BYTES..].chunks_exact(RECORD_BYTES);
        for chunk in records.by_ref().take(accounts_count) {
            self.restore_account(bytemuck::pod_read_unaligned(chunk))?;
        }
        for chunk in records.by_ref().take(transfers_count) {
            self.restore_transfer(bytemuck::pod_read_unaligned(chunk))?;
        }
        for chunk in records.by_ref().take(credit_legs_count) {
            self.restore_credit_leg(bytemuck::pod_read_unaligned(chunk))?;
        }
        debug_assert!(records.next().is_none());

        // Counters are derived from the records; they must agree with the header.
        if self.in_flight != header.in_flight
            || self.credit_legs_unacked != header.credit_legs_unacked
            || self.suspense != header.suspense
        {
            return Err(RestoreError::Corrupt);
        }
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
        if transfer.debit_account_id == 0 || !self.owns(transfer.debit_account_id) {
            return Err(RestoreError::Corrupt);
        }
        self.transfers.append_new(transfer, |_| true)?;
        if transfer.flags & transfer_flags::CREDIT_IN_FLIGHT != 0 {
            self.in_flight = self.in_flight.wrapping_add(transfer.amount);
            self.credit_legs_unacked += 1;
        }
        Ok(())
    }

    fn restore_credit_leg(&mut self, leg: Transfer) -> Result<(), RestoreError> {
        let origin = shard_of(leg.debit_account_id, self.config.shard_count);
        if leg.flags & transfer_flags::CROSS_SHARD_CREDIT == 0 || origin == self.config.shard_index
        {
            return Err(RestoreError::Corrupt);
        }
        self.credit_legs
            .append_new(leg, self.debited_on_shard(origin))?;
        if leg.flags & transfer_flags::CREDIT_PARKED != 0 {
            self.suspense = self
                .suspense
                .checked_add(leg.amount)
                .ok_or(RestoreError::Corrupt)?;
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

    /// Assigns strictly increasing timestamps: the first record gets
    /// `max(now_ns, last timestamp + 1)`, each next one its predecessor's plus one.
    /// Acknowledgements carry no timestamp of their own.
    fn prepare(&mut self, operation: LedgerOperation, now_ns: u64, records: &mut [RecordSlot]) {
        if records.is_empty() || operation == LedgerOperation::AckCreditLegs {
            return;
        }
        let timestamp_last = self.prepare_timestamp_last.max(self.commit_timestamp_last);
        let timestamp_first = now_ns.max(timestamp_last + 1);
        let mut timestamp = timestamp_first;
        match operation {
            LedgerOperation::CreateAccounts => {
                for account in slots_as_accounts_mut(records) {
                    account.timestamp = timestamp;
                    timestamp += 1;
                }
            }
            LedgerOperation::CreateTransfers | LedgerOperation::ApplyCreditLegs => {
                for transfer in slots_as_transfers_mut(records) {
                    transfer.timestamp = timestamp;
                    timestamp += 1;
                }
            }
            LedgerOperation::AckCreditLegs => unreachable!(),
        }
        self.prepare_timestamp_last = timestamp - 1;
        debug_assert_eq!(timestamp - timestamp_first, records.len() as u64);
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

    fn poll_outbound(&mut self) -> Option<LedgerOutbound> {
        self.outbox.pop_front()
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        let header = SnapshotHeader {
            magic: SNAPSHOT_MAGIC,
            version: SNAPSHOT_VERSION,
            shard_index: self.config.shard_index,
            shard_count: self.config.shard_count,
            in_flight: self.in_flight,
            suspense: self.suspense,
            accounts_count: self.accounts.len as u64,
            transfers_count: self.transfers.len as u64,
            credit_legs_count: self.credit_legs.len as u64,
            credit_legs_unacked: self.credit_legs_unacked,
            commit_op_last: self.commit_op_last,
            commit_timestamp_last: self.commit_timestamp_last,
            digest: self.digest(),
        };
        let records = self.accounts.len + self.transfers.len + self.credit_legs.len;
        out.reserve(SNAPSHOT_HEADER_BYTES + records * RECORD_BYTES);
        out.extend_from_slice(bytemuck::bytes_of(&header));
        for account in self.accounts.entries() {
            out.extend_from_slice(bytemuck::bytes_of(account));
        }
        out.extend_from_slice(bytemuck::cast_slice(self.transfers.records()));
        out.extend_from_slice(bytemuck::cast_slice(self.credit_legs.records()));
    }

    /// Restores a snapshot into this ledger's tables (which may be larger than the source's,
    /// and hashed with another seed); checks every record, recomputes the counters and the
    /// digest against the snapshot's. The outbox starts empty: resend
    /// [`Ledger::credit_legs_unacked`].
    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        self.reset();
        let restored = self.restore_into_empty(bytes);
        if restored.is_err() {
            self.reset();
        }
        restored
    }

    fn digest(&self) -> Digest256 {
        let mut hasher = Digest256Hasher::new();
        hasher
            .update(b"percore.ledger.v1")
            .update(&self.config.shard_index.to_le_bytes())
            .update(&self.config.shard_count.to_le_bytes())
            .update(&self.in_flight.to_le_bytes())
            .update(&self.credit_legs_unacked.to_le_bytes())
            .update(&self.suspense.to_le_bytes())
            .update(&self.commit_op_last.to_le_bytes())
            .update(&self.commit_timestamp_last.to_le_bytes());
        for (len, lanes) in [
            (self.accounts.len, multiset_digest(self.accounts.entries())),
            (
                self.transfers.len,
                multiset_digest(self.transfers.records().iter()),
            ),
            (
                self.credit_legs.len,
                multiset_digest(self.credit_legs.records().iter()),
            ),
        ] {
            hasher
                .update(&(len as u64).to_le_bytes())
                .update(bytemuck::bytes_of(&lanes));
        }
        hasher.finalize()
    }
}

#[cfg(test)]
mod tests {
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
    fn indexed_log_appends_in_order_and_finds_by_id_and_predicate() {
        let mut log: IndexedLog<Transfer> = IndexedLog::new(8, 3);
        // One id from two debit accounts: told apart by the predicate.
        for (id, debit) in [(5, 1), (6, 1), (5, 2)] {
            let LogProbe::Vacant { index_slot, hash } =
                log.probe(id, |t| t.debit_account_id == debit)
            else {
                panic!("({id}, {debit}) present before append");
            };
            log.append(index_slot, hash, transfer(id, debit));
        }
        let order: Vec<(u128, u128)> = log
            .records()
            .iter()
            .map(|t| (t.id, t.debit_account_id))
            .collect();
        assert_eq!(order, [(5, 1), (6, 1), (5, 2)]);
        assert!(matches!(
            log.probe(5, |t| t.debit_account_id == 2),
            LogProbe::Found(2)
        ));
        assert!(matches!(
            log.probe(5, |t| t.debit_account_id == 1),
            LogProbe::Found(0)
        ));
        assert!(matches!(
            log.probe(5, |t| t.debit_account_id == 3),
            LogProbe::Vacant { .. }
        ));
        assert_eq!(
            log.append_new(transfer(6, 1), |_| true).unwrap_err(),
            RestoreError::Corrupt
        );
        log.clear();
        assert!(log.records().is_empty());
        assert!(matches!(log.probe(6, |_| true), LogProbe::Vacant { .. }));
    }

    #[test]
    fn indexed_log_stops_at_len_max() {
        let mut log: IndexedLog<Transfer> = IndexedLog::new(2, 3);
        log.append_new(transfer(1, 1), |_| true).unwrap();
        log.append_new(transfer(2, 1), |_| true).unwrap();
        assert!(log.is_full());
        assert_eq!(
            log.append_new(transfer(3, 1), |_| true),
            Err(RestoreError::Corrupt)
        );
    }

    #[test]
    fn seeds_change_layout_but_not_digest() {
        let mut one: SlotTable<Account> = SlotTable::new(64, 1);
        let mut other: SlotTable<Account> = SlotTable::new(200, 2);
        for id in 1..=50 {
            let SlotProbe::Vacant(slot) = one.probe(id) else {
                panic!()
            };
            one.insert_at(slot, account(id));
            let SlotProbe::Vacant(slot) = other.probe(51 - id) else {
                panic!()
            };
            other.insert_at(slot, account(51 - id));
        }
        let layout = |table: &SlotTable<Account>| -> Vec<u128> {
            table.entries().map(|entry| entry.id).collect()
        };
        assert_ne!(layout(&one), layout(&other));
        assert_eq!(
            multiset_digest(one.entries()),
            multiset_digest(other.entries())
        );
        let shifted: Vec<Account> = (2..=51).map(account).collect();
        assert_ne!(
            multiset_digest(one.entries()),
            multiset_digest(shifted.iter())
        );
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
