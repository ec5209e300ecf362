//! Cross-shard transfers: credit legs, acknowledgements, parking in suspense, and the
//! conservation invariant under random delivery order, duplication and loss.

use std::collections::{HashMap, HashSet};

use bytemuck::Zeroable;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation, LedgerOutbound};
use percore_engine::record::{
    Account, CreateTransferResult, CreditAckResult, CreditLegResult, RecordResult, RecordSlot,
    Transfer, account_flags, shard_of, transfer_flags,
};
use percore_engine::state_machine::{Outbound, StateMachine};
use proptest::prelude::*;

const BATCH_ENTRIES_MAX: usize = 64;

/// One shard: a ledger plus the op counter and clock its runtime would hold.
struct Shard {
    ledger: Ledger,
    op: u64,
    now_ns: u64,
}

impl Shard {
    fn new(shard_index: u32, shard_count: u32) -> Shard {
        Shard {
            ledger: Ledger::new(LedgerConfig {
                shard_index,
                shard_count,
                accounts_max: 64,
                transfers_max: 4_096,
                credit_legs_max: 4_096,
                batch_entries_max: BATCH_ENTRIES_MAX,
            }),
            op: 0,
            now_ns: 1_000_000,
        }
    }

    /// Prepares and applies one batch; returns the result codes and the messages emitted.
    fn execute(
        &mut self,
        operation: LedgerOperation,
        records: &[RecordSlot],
    ) -> (Vec<u32>, Vec<LedgerOutbound>) {
        assert!(records.len() <= BATCH_ENTRIES_MAX);
        let mut batch = records.to_vec();
        self.now_ns += 1_000;
        self.op += 1;
        self.ledger.prepare(operation, self.now_ns, &mut batch);
        let mut results = vec![RecordResult::zeroed(); batch.len()];
        self.ledger.apply(self.op, operation, &batch, &mut results);
        let outbound = std::iter::from_fn(|| self.ledger.poll_outbound()).collect();
        (results.iter().map(|result| result.code).collect(), outbound)
    }

    fn create_accounts(&mut self, accounts: &[Account]) {
        let slots: Vec<RecordSlot> = accounts.iter().map(RecordSlot::from_account).collect();
        let (codes, outbound) = self.execute(LedgerOperation::CreateAccounts, &slots);
        assert!(codes.iter().all(|&code| code == 0), "{codes:?}");
        assert!(outbound.is_empty());
    }
}

fn account(id: u128, ledger: u32, flags: u16) -> Account {
    Account {
        id,
        ledger,
        code: 1,
        flags,
        ..Account::zeroed()
    }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::zeroed()
    }
}

/// The first `count` ids that `shard_of` places on `shard`, from `start` on.
fn ids_on_shard(shard: u32, shard_count: u32, start: u128, count: usize) -> Vec<u128> {
    (start..)
        .filter(|&id| shard_of(id, shard_count) == shard)
        .take(count)
        .collect()
}

fn legs_of(outbound: &[LedgerOutbound], operation: LedgerOperation) -> Vec<RecordSlot> {
    outbound
        .iter()
        .filter(|message| message.operation == operation)
        .map(|message| message.record)
        .collect()
}

/// Two shards, a funded account on shard 0 and accounts on both.
struct Pair {
    shards: [Shard; 2],
    payer: u128,
    payee_remote: u128,
    other_ledger_remote: u128,
    missing_remote: u128,
}

fn pair() -> Pair {
    let mut shards = [Shard::new(0, 2), Shard::new(1, 2)];
    let local = ids_on_shard(0, 2, 1, 2);
    let remote = ids_on_shard(1, 2, 1, 3);
    let (mint, payer) = (local[0], local[1]);
    shards[0].create_accounts(&[
        account(mint, 1, account_flags::ALLOW_NEGATIVE),
        account(payer, 1, 0),
    ]);
    shards[1].create_accounts(&[account(remote[0], 1, 0), account(remote[1], 2, 0)]);
    let funding = RecordSlot::from_transfer(&transfer(1, mint, payer, 1_000));
    let (codes, outbound) = shards[0].execute(LedgerOperation::CreateTransfers, &[funding]);
    assert_eq!((codes, outbound), (vec![0], vec![]));
    Pair {
        shards,
        payer,
        payee_remote: remote[0],
        other_ledger_remote: remote[1],
        missing_remote: remote[2],
    }
}

fn balance(ledger: &Ledger, id: u128) -> i128 {
    let account = ledger.lookup_account(id).unwrap();
    account.credits_posted as i128 - account.debits_posted as i128
}

#[test]
fn a_cross_shard_transfer_debits_sends_credits_and_acknowledges() {
    let mut pair = pair();
    let pay = transfer(100, pair.payer, pair.payee_remote, 300);
    let (codes, outbound) = pair.shards[0].execute(
        LedgerOperation::CreateTransfers,
        &[RecordSlot::from_transfer(&pay)],
    );
    assert_eq!(codes, [u32::from(CreateTransferResult::Ok)]);
    assert_eq!(outbound.len(), 1);
    let leg_message = outbound[0];
    assert_eq!(leg_message.shard, 1);
    assert_eq!(leg_message.operation, LedgerOperation::ApplyCreditLegs);
    let leg = *leg_message.record.as_transfer();
    assert_eq!(leg.flags, transfer_flags::CROSS_SHARD_CREDIT);
    assert_eq!(
        (leg.id, leg.amount, leg.credit_account_id),
        (100, 300, pair.payee_remote)
    );

    // Debited at once; the money is in flight until the credit shard applies the leg.
    assert_eq!(balance(&pair.shards[0].ledger, pair.payer), 700);
    assert_eq!(pair.shards[0].ledger.in_flight(), 300);
    let stored = pair.shards[0].ledger.lookup_transfer(100).unwrap();
    assert_ne!(stored.flags & transfer_flags::CREDIT_IN_FLIGHT, 0);
    let conserved =
        pair.shards[0].ledger.conservation_sum() + pair.shards[1].ledger.conservation_sum();
    assert_eq!(conserved + 300, 0, "in-flight money is the difference");

    let (codes, acks) =
        pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &[leg_message.record]);
    assert_eq!(codes, [u32::from(CreditLegResult::Ok)]);
    assert_eq!(balance(&pair.shards[1].ledger, pair.payee_remote), 300);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (acks[0].shard, acks[0].operation),
        (0, LedgerOperation::AckCreditLegs)
    );
    assert!(pair.shards[1].ledger.lookup_credit_leg(100, 0).is_some());
    let conserved =
        pair.shards[0].ledger.conservation_sum() + pair.shards[1].ledger.conservation_sum();
    assert_eq!(conserved, 0);

    let (codes, outbound) =
        pair.shards[0].execute(LedgerOperation::AckCreditLegs, &[acks[0].record]);
    assert_eq!(
        (codes, outbound),
        (vec![u32::from(CreditAckResult::Ok)], vec![])
    );
    assert_eq!(pair.shards[0].ledger.in_flight(), 0);
    assert_eq!(pair.shards[0].ledger.credit_legs_unacked_count(), 0);
    let stored = pair.shards[0].ledger.lookup_transfer(100).unwrap();
    assert_eq!(stored.flags & transfer_flags::CREDIT_IN_FLIGHT, 0);
}

#[test]
fn legs_that_cannot_be_credited_are_parked_in_suspense_and_acknowledged() {
    let mut pair = pair();
    let to_missing = transfer(100, pair.payer, pair.missing_remote, 10);
    let to_other_ledger = transfer(101, pair.payer, pair.other_ledger_remote, 20);
    let records = [to_missing, to_other_ledger].map(|t| RecordSlot::from_transfer(&t));
    let (codes, outbound) = pair.shards[0].execute(LedgerOperation::CreateTransfers, &records);
    assert_eq!(codes, [0, 0], "the origin cannot check a remote account");
    let legs = legs_of(&outbound, LedgerOperation::ApplyCreditLegs);

    let (codes, acks) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &legs);
    assert_eq!(
        codes,
        [
            u32::from(CreditLegResult::ParkedCreditAccountNotFound),
            u32::from(CreditLegResult::ParkedLedgerMismatch)
        ]
    );
    assert_eq!(pair.shards[1].ledger.suspense(), 30);
    assert_eq!(balance(&pair.shards[1].ledger, pair.other_ledger_remote), 0);
    let parked = pair.shards[1].ledger.lookup_credit_leg(100, 0).unwrap();
    assert_ne!(parked.flags & transfer_flags::CREDIT_PARKED, 0);
    let conserved =
        pair.shards[0].ledger.conservation_sum() + pair.shards[1].ledger.conservation_sum();
    assert_eq!(conserved, 0);

    let acks = legs_of(&acks, LedgerOperation::AckCreditLegs);
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    assert_eq!(codes, [0, 0]);
    assert_eq!(pair.shards[0].ledger.in_flight(), 0);
}

#[test]
fn redelivered_legs_and_acks_change_nothing_but_are_acknowledged_again() {
    let mut pair = pair();
    let pay = RecordSlot::from_transfer(&transfer(100, pair.payer, pair.payee_remote, 5));
    let (_, outbound) = pair.shards[0].execute(LedgerOperation::CreateTransfers, &[pay]);
    let leg = outbound[0].record;

    let (codes, first_acks) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &[leg, leg]);
    assert_eq!(codes, [0, u32::from(CreditLegResult::Duplicate)]);
    assert_eq!(first_acks.len(), 2, "a duplicate is acknowledged again");
    assert_eq!(first_acks[0], first_acks[1]);
    let (codes, again) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &[leg]);
    assert_eq!(codes, [u32::from(CreditLegResult::Duplicate)]);
    assert_eq!(again, first_acks[..1]);
    assert_eq!(balance(&pair.shards[1].ledger, pair.payee_remote), 5);

    let ack = first_acks[0].record;
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &[ack, ack]);
    assert_eq!(codes, [0, u32::from(CreditAckResult::Duplicate)]);
    assert_eq!(pair.shards[0].ledger.in_flight(), 0);
}

#[test]
fn malformed_internal_records_are_refused_without_moving_money() {
    let mut pair = pair();
    let pay = transfer(100, pair.payer, pair.payee_remote, 5);
    let (_, outbound) = pair.shards[0].execute(
        LedgerOperation::CreateTransfers,
        &[RecordSlot::from_transfer(&pay)],
    );
    let leg = *outbound[0].record.as_transfer();

    let unflagged = Transfer { flags: 0, ..leg };
    let zero_amount = Transfer { amount: 0, ..leg };
    let from_self = Transfer {
        debit_account_id: pair.payee_remote,
        credit_account_id: pair.other_ledger_remote,
        ..leg
    };
    let records = [unflagged, zero_amount, from_self].map(|t| RecordSlot::from_transfer(&t));
    let (codes, acks) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &records);
    assert!(
        codes
            .iter()
            .all(|&code| code == u32::from(CreditLegResult::LegInvalid))
    );
    assert!(acks.is_empty(), "invalid legs are not acknowledged");

    let (codes, _) =
        pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &[outbound[0].record]);
    assert_eq!(codes, [0]);
    let conflicting = Transfer { amount: 6, ..leg };
    let (codes, acks) = pair.shards[1].execute(
        LedgerOperation::ApplyCreditLegs,
        &[RecordSlot::from_transfer(&conflicting)],
    );
    assert_eq!(
        (codes, acks),
        (vec![u32::from(CreditLegResult::LegConflict)], vec![])
    );
    assert_eq!(balance(&pair.shards[1].ledger, pair.payee_remote), 5);

    let unknown = Transfer { id: 999, ..leg };
    let altered = Transfer { amount: 6, ..leg };
    let acks = [unknown, altered].map(|t| RecordSlot::from_transfer(&t));
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    assert_eq!(
        codes,
        [
            u32::from(CreditAckResult::TransferNotFound),
            u32::from(CreditAckResult::Mismatch)
        ]
    );
    assert_eq!(pair.shards[0].ledger.in_flight(), 5, "still in flight");
}

#[test]
fn a_full_legs_table_leaves_the_leg_in_flight_for_a_later_resend() {
    let mut origin = Shard::new(0, 2);
    let mut target = Shard {
        ledger: Ledger::new(LedgerConfig {
            credit_legs_max: 1,
            ..*Shard::new(1, 2).ledger.config()
        }),
        op: 0,
        now_ns: 1,
    };
    let mint = ids_on_shard(0, 2, 1, 1)[0];
    let payee = ids_on_shard(1, 2, 1, 1)[0];
    origin.create_accounts(&[account(mint, 1, account_flags::ALLOW_NEGATIVE)]);
    target.create_accounts(&[account(payee, 1, 0)]);
    let pays = [transfer(1, mint, payee, 1), transfer(2, mint, payee, 2)];
    let records = pays.map(|t| RecordSlot::from_transfer(&t));
    let (_, outbound) = origin.execute(LedgerOperation::CreateTransfers, &records);
    let legs = legs_of(&outbound, LedgerOperation::ApplyCreditLegs);
    let (codes, acks) = target.execute(LedgerOperation::ApplyCreditLegs, &legs);
    assert_eq!(codes, [0, u32::from(CreditLegResult::LegsTableFull)]);
    assert_eq!(acks.len(), 1);
    origin.execute(LedgerOperation::AckCreditLegs, &[acks[0].record]);
    let unacked: Vec<LedgerOutbound> = origin.ledger.credit_legs_unacked().collect();
    assert_eq!(
        unacked,
        [outbound[1]],
        "the refused leg is resent exactly as first sent"
    );
    assert_eq!(origin.ledger.in_flight(), 2);
    assert_eq!(
        origin.ledger.conservation_sum() + target.ledger.conservation_sum() + 2,
        0
    );
}

/// splitmix64: a tiny seeded generator, so one `u64` replays one run.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.next_u64() % denominator < numerator
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Shards, the messages travelling between them, and a model of what balances must be.
struct Cluster {
    shards: Vec<Shard>,
    network: Vec<LedgerOutbound>,
    rng: Rng,
    /// Accounts a shard may debit: its mint and its ordinary ledger-1 accounts.
    debitable: Vec<Vec<u128>>,
    /// Every credit target: real accounts, accounts on ledger 2, ids never created.
    credit_targets: Vec<u128>,
    mints: HashSet<u128>,
    /// Model: balance every real ledger-1 account must reach once all legs land.
    model_balance: HashMap<u128, i128>,
    /// Model: suspense every shard must reach.
    model_suspense: Vec<u128>,
    submitted: Vec<Transfer>,
    transfer_id_next: u128,
}

impl Cluster {
    fn new(seed: u64, shard_count: u32) -> Cluster {
        let mut cluster = Cluster {
            shards: (0..shard_count)
                .map(|index| Shard::new(index, shard_count))
                .collect(),
            network: Vec::new(),
            rng: Rng(seed),
            debitable: Vec::new(),
            credit_targets: Vec::new(),
            mints: HashSet::new(),
            model_balance: HashMap::new(),
            model_suspense: vec![0; shard_count as usize],
            submitted: Vec::new(),
            transfer_id_next: 1,
        };
        for index in 0..shard_count {
            let ids = ids_on_shard(index, shard_count, 1, 8);
            let (mint, ordinary, other_ledger, ghost) = (ids[0], &ids[1..6], ids[6], ids[7]);
            let mut accounts = vec![
                account(mint, 1, account_flags::ALLOW_NEGATIVE),
                account(other_ledger, 2, 0),
            ];
            accounts.extend(ordinary.iter().map(|&id| account(id, 1, 0)));
            cluster.shards[index as usize].create_accounts(&accounts);
            cluster.mints.insert(mint);
            for &id in ids[..6].iter() {
                cluster.model_balance.insert(id, 0);
            }
            cluster.debitable.push(ids[..6].to_vec());
            cluster.credit_targets.extend_from_slice(&ids[..6]);
            cluster.credit_targets.extend([other_ledger, ghost]);
        }
        cluster
    }

    fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn submit_transfers(&mut self) {
        let shard = self.rng.below(self.shards.len());
        let count = 1 + self.rng.below(BATCH_ENTRIES_MAX);
        let mut batch = Vec::with_capacity(count);
        for _ in 0..count {
            if !self.submitted.is_empty() && self.rng.chance(1, 10) {
                // A client retry of an earlier transfer (possibly to another shard: refused).
                let retry = self.rng.pick(&self.submitted);
                batch.push(retry);
                continue;
            }
            let debit = self.rng.pick(&self.debitable[shard]);
            let amount = 1 + self.rng.below(if self.mints.contains(&debit) {
                1_000
            } else {
                200
            });
            let credit = self.rng.pick(&self.credit_targets);
            batch.push(transfer(
                self.transfer_id_next,
                debit,
                credit,
                amount as u128,
            ));
            self.transfer_id_next += 1;
        }
        let records: Vec<RecordSlot> = batch.iter().map(RecordSlot::from_transfer).collect();
        let (codes, outbound) =
            self.shards[shard].execute(LedgerOperation::CreateTransfers, &records);
        for (transfer, code) in batch.iter().zip(codes) {
            let result = CreateTransferResult::try_from(code).unwrap();
            if result == CreateTransferResult::Ok {
                self.model_transfer(transfer);
                self.submitted.push(*transfer);
            }
        }
        self.network.extend(outbound);
    }

    fn model_transfer(&mut self, transfer: &Transfer) {
        *self
            .model_balance
            .get_mut(&transfer.debit_account_id)
            .unwrap() -= transfer.amount as i128;
        match self.model_balance.get_mut(&transfer.credit_account_id) {
            Some(balance) => *balance += transfer.amount as i128,
            None => {
                let shard = shard_of(transfer.credit_account_id, self.shard_count());
                self.model_suspense[shard as usize] += transfer.amount;
            }
        }
    }

    /// Delivers some messages to one shard; some are duplicated (a copy stays in the
    /// network) and some are lost.
    fn deliver(&mut self, lossy: bool) {
        if self.network.is_empty() {
            return;
        }
        let target = self.network[self.rng.below(self.network.len())];
        let (shard, operation) = (target.shard, target.operation);
        let mut batch = Vec::new();
        let mut index = 0;
        while index < self.network.len() && batch.len() < BATCH_ENTRIES_MAX {
            let message = self.network[index];
            let eligible = message.shard == shard && message.operation == operation;
            if eligible && (!lossy || self.rng.chance(2, 3)) {
                if lossy && self.rng.chance(1, 4) {
                    batch.push(message.record); // duplicate: leave a copy behind
                    index += 1;
                    continue;
                }
                self.network.swap_remove(index);
                if !(lossy && self.rng.chance(1, 8)) {
                    batch.push(message.record);
                }
                continue;
            }
            index += 1;
        }
        // Shuffle: delivery order is not send order.
        for i in (1..batch.len()).rev() {
            batch.swap(i, self.rng.below(i + 1));
        }
        let (_, outbound) = self.shards[shard as usize].execute(operation, &batch);
        self.network.extend(outbound);
    }

    /// What a runtime does after a timeout or view change: resend every unacknowledged leg.
    fn resend_unacked(&mut self) {
        for shard in &self.shards {
            self.network.extend(shard.ledger.credit_legs_unacked());
        }
    }

    /// Conservation: the shards' sums plus the legs not yet applied at their credit shard.
    fn check_conservation(&self) {
        let mut total: i128 = 0;
        for shard in &self.shards {
            total = total.wrapping_add(shard.ledger.conservation_sum());
        }
        for (origin, shard) in self.shards.iter().enumerate() {
            for Outbound {
                shard: target,
                record,
                ..
            } in shard.ledger.credit_legs_unacked()
            {
                let leg = record.as_transfer();
                let applied = self.shards[target as usize]
                    .ledger
                    .lookup_credit_leg(leg.id, origin as u32)
                    .is_some();
                if !applied {
                    total = total.wrapping_add(leg.amount as i128);
                }
            }
        }
        assert_eq!(total, 0, "money was created or destroyed");
    }

    fn check_no_overdraft(&self) {
        for &id in self.model_balance.keys() {
            if self.mints.contains(&id) {
                continue;
            }
            let shard = &self.shards[shard_of(id, self.shard_count()) as usize];
            let account = shard.ledger.lookup_account(id).unwrap();
            assert!(
                account.credits_posted >= account.debits_posted,
                "overdraft on {id}"
            );
        }
    }

    fn settle(&mut self) {
        for _round in 0..64 {
            self.resend_unacked();
            while !self.network.is_empty() {
                self.deliver(false);
            }
            if self
                .shards
                .iter()
                .all(|shard| shard.ledger.credit_legs_unacked_count() == 0)
            {
                return;
            }
        }
        panic!("the cluster did not settle");
    }

    fn check_settled(&self) {
        self.check_conservation();
        for (index, shard) in self.shards.iter().enumerate() {
            assert_eq!(shard.ledger.in_flight(), 0);
            assert_eq!(shard.ledger.suspense(), self.model_suspense[index]);
        }
        let total: i128 = self
            .shards
            .iter()
            .map(|shard| shard.ledger.conservation_sum())
            .sum();
        assert_eq!(total, 0);
        for (&id, &expected) in &self.model_balance {
            let shard = &self.shards[shard_of(id, self.shard_count()) as usize];
            assert_eq!(balance(&shard.ledger, id), expected, "account {id}");
        }
    }
}

fn run_cluster(seed: u64, shard_count: u32, steps: usize) {
    let mut cluster = Cluster::new(seed, shard_count);
    for _ in 0..steps {
        match cluster.rng.below(10) {
            0..=3 => cluster.submit_transfers(),
            4..=8 => cluster.deliver(true),
            _ => cluster.resend_unacked(),
        }
        cluster.check_conservation();
        cluster.check_no_overdraft();
    }
    cluster.settle();
    cluster.check_settled();
}

#[test]
fn conservation_holds_under_reordering_duplication_and_loss() {
    for seed in 0..4 {
        for shard_count in 2..=4 {
            run_cluster(seed, shard_count, 300);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn conservation_holds_for_any_seed(seed in any::<u64>(), shard_count in 2_u32..=4) {
        run_cluster(seed, shard_count, 200);
    }
}
