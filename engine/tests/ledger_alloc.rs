//! The ledger allocates at construction and never again: a steady state of full windows
//! (every transfer evicts the oldest), cross-shard legs, acknowledgements and duplicates runs
//! under a counting global allocator and must leave the count unchanged.
#![cfg(not(loom))]

use bytemuck::Zeroable;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{
    Account, RecordResult, RecordSlot, Transfer, account_flags, shard_of,
};
use percore_engine::state_machine::StateMachine;

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const BATCH: usize = 32;

/// A shard driven with fixed buffers only.
struct Shard {
    ledger: Ledger,
    op: u64,
    now_ns: u64,
    results: [RecordResult; BATCH],
    outbound: [RecordSlot; BATCH],
    outbound_len: usize,
}

impl Shard {
    fn new(shard_index: u32) -> Shard {
        Shard {
            ledger: Ledger::new(LedgerConfig {
                shard_index,
                shard_count: 2,
                accounts_max: 16,
                transfers_max: 64,
                credit_legs_in_flight_max: 16,
                batch_entries_max: BATCH,
            }),
            op: 0,
            now_ns: 1,
            results: [RecordResult::zeroed(); BATCH],
            outbound: [RecordSlot::zeroed(); BATCH],
            outbound_len: 0,
        }
    }

    /// Applies `records` and keeps the messages emitted in `outbound`; returns the Ok count.
    fn execute(&mut self, operation: LedgerOperation, records: &mut [RecordSlot]) -> usize {
        self.op += 1;
        self.now_ns += 1_000;
        self.ledger.prepare(operation, self.now_ns, records);
        let results = &mut self.results[..records.len()];
        self.ledger.apply(self.op, operation, records, results);
        self.outbound_len = 0;
        while let Some(message) = self.ledger.poll_outbound() {
            self.outbound[self.outbound_len] = message.record;
            self.outbound_len += 1;
        }
        results.iter().filter(|result| result.code == 0).count()
    }
}

fn id_on(shard: u32, nth: usize) -> u128 {
    (1..)
        .filter(|&id| shard_of(id, 2) == shard)
        .nth(nth)
        .unwrap()
}

#[test]
fn steady_state_with_full_windows_allocates_nothing() {
    let mut shards = [Shard::new(0), Shard::new(1)];
    let (mint, payee_local, payee_remote) = (id_on(0, 0), id_on(0, 1), id_on(1, 0));
    let mut accounts = [mint, payee_local].map(|id| {
        RecordSlot::from_account(&Account {
            id,
            ledger: 1,
            code: 1,
            flags: if id == mint {
                account_flags::ALLOW_NEGATIVE
            } else {
                0
            },
            ..Account::zeroed()
        })
    });
    shards[0].execute(LedgerOperation::CreateAccounts, &mut accounts);
    let mut remote_account = [RecordSlot::from_account(&Account {
        id: payee_remote,
        ledger: 1,
        code: 1,
        ..Account::zeroed()
    })];
    shards[1].execute(LedgerOperation::CreateAccounts, &mut remote_account);

    let mut batch = [RecordSlot::zeroed(); BATCH];
    let mut legs = [RecordSlot::zeroed(); BATCH];
    let mut id = 1_000_u128;
    let mut round = |shards: &mut [Shard; 2]| {
        for (index, slot) in batch.iter_mut().enumerate() {
            id += 1;
            // One in four cross-shard; one in eight a retry of a recent id.
            let retry = index % 8 == 7;
            let credit = if index % 4 == 1 {
                payee_remote
            } else {
                payee_local
            };
            *slot = RecordSlot::from_transfer(&Transfer {
                id: if retry { id - 3 } else { id },
                debit_account_id: mint,
                credit_account_id: credit,
                amount: 1,
                ledger: 1,
                code: 1,
                ..Transfer::zeroed()
            });
        }
        let applied = shards[0].execute(LedgerOperation::CreateTransfers, &mut batch);
        let count = shards[0].outbound_len;
        legs[..count].copy_from_slice(&shards[0].outbound[..count]);
        // Each leg twice: the second is a duplicate, acknowledged again.
        let half = count.min(BATCH / 2);
        legs.copy_within(..half, half);
        let legs = &mut legs[..2 * half];
        shards[1].execute(LedgerOperation::ApplyCreditLegs, legs);
        let count = shards[1].outbound_len;
        let mut acks = shards[1].outbound;
        shards[0].execute(LedgerOperation::AckCreditLegs, &mut acks[..count]);
        applied
    };
    // Fill every window first: from here on each transfer evicts the oldest.
    for _ in 0..8 {
        round(&mut shards);
    }
    assert_eq!(shards[0].ledger.transfers_count(), 64);

    let before = allocations();
    let mut applied = 0;
    for _ in 0..200 {
        applied += round(&mut shards);
    }
    assert_eq!(allocations(), before, "the hot path allocated");
    assert!(applied > 200 * BATCH / 2, "mostly applied: {applied}");
    assert_eq!(shards[0].ledger.credit_legs_unacked_count(), 0);
    let total = shards[0].ledger.conservation_sum() + shards[1].ledger.conservation_sum();
    assert_eq!(total, 0);
}
