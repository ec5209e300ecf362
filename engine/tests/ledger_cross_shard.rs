//! Cross-shard transfers: credit legs, acknowledgements, parking in suspense, the bounded
//! windows (in-flight legs, replay windows, transfer window), and the conservation invariant
//! under random delivery order, duplication and loss, with small windows that wrap many
//! times.

use std::collections::{HashMap, HashSet};

use bytemuck::Zeroable;
use percore_engine::ledger::{
    Ledger, LedgerConfig, LedgerOperation, LedgerOutbound, credit_leg_sequence,
};
use percore_engine::record::{
    Account, CreateTransferResult, CreditAckResult, CreditLegResult, RecordResult, RecordSlot,
    Transfer, account_flags, shard_of, transfer_flags,
};
use percore_engine::state_machine::{Outbound, StateMachine};
use proptest::prelude::*;

const BATCH_ENTRIES_MAX: usize = 64;

/// One shard: a ledger plus the op counter and clock its runtime would hold, and optionally
/// a follower replica (hashing with another seed) that must agree after every batch.
struct Shard {
    ledger: Ledger,
    follower: Option<Ledger>,
    op: u64,
    now_ns: u64,
}

/// Sizes of a shard's windows: `(transfers_max, credit_legs_in_flight_max)`.
type Windows = (usize, usize);

const WINDOWS_ROOMY: Windows = (4_096, 4_096);

impl Shard {
    fn new(shard_index: u32, shard_count: u32) -> Shard {
        Shard::with_windows(shard_index, shard_count, WINDOWS_ROOMY)
    }

    fn with_windows(shard_index: u32, shard_count: u32, windows: Windows) -> Shard {
        Shard {
            ledger: Ledger::new(LedgerConfig {
                shard_index,
                shard_count,
                accounts_max: 64,
                transfers_max: windows.0,
                credit_legs_in_flight_max: windows.1,
                batch_entries_max: BATCH_ENTRIES_MAX,
            }),
            follower: None,
            op: 0,
            now_ns: 1_000_000,
        }
    }

    fn with_follower(mut self) -> Shard {
        let seed = 0x5eed ^ u64::from(self.ledger.config().shard_index);
        self.follower = Some(Ledger::with_hash_seed(*self.ledger.config(), seed));
        self
    }

    /// A restart: the leader is rebuilt from its own snapshot, into tables hashed with
    /// another seed. Its follower must keep agreeing with it.
    fn restart_from_snapshot(&mut self, seed: u64) {
        let mut snapshot = Vec::new();
        self.ledger.snapshot(&mut snapshot);
        let mut restored = Ledger::with_hash_seed(*self.ledger.config(), seed);
        restored.restore(&snapshot).expect("restores");
        assert_eq!(restored.digest(), self.ledger.digest());
        self.ledger = restored;
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
        let outbound: Vec<LedgerOutbound> =
            std::iter::from_fn(|| self.ledger.poll_outbound()).collect();
        if let Some(follower) = &mut self.follower {
            let mut follower_results = vec![RecordResult::zeroed(); batch.len()];
            follower.apply(self.op, operation, &batch, &mut follower_results);
            let follower_outbound: Vec<LedgerOutbound> =
                std::iter::from_fn(|| follower.poll_outbound()).collect();
            assert_eq!(follower_results, results, "op {}", self.op);
            assert_eq!(follower_outbound, outbound, "op {}", self.op);
            assert_eq!(follower.digest(), self.ledger.digest(), "op {}", self.op);
        }
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
    assert!(pair.shards[1].ledger.credit_leg_applied(&leg));
    assert_eq!(credit_leg_sequence(&leg), 1, "legs are numbered from 1");
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
    let parked = *acks[0].record.as_transfer();
    assert_ne!(parked.flags & transfer_flags::CREDIT_PARKED, 0);
    assert!(pair.shards[1].ledger.credit_leg_applied(&parked));
    let conserved =
        pair.shards[0].ledger.conservation_sum() + pair.shards[1].ledger.conservation_sum();
    assert_eq!(conserved, 0);

    let acks = legs_of(&acks, LedgerOperation::AckCreditLegs);
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    assert_eq!(codes, [0, 0]);
    assert_eq!(pair.shards[0].ledger.in_flight(), 0);
}

/// Suspense wraps, as the conservation sum does: a client that parks `u128::MAX` (from an
/// account that may go negative, to an account that does not exist) does not make every
/// later parked leg unacknowledgeable. They were refused (`SuspenseOverflow`), never
/// acknowledged and resent for ever, until the sender's in-flight bound refused every
/// transfer between shards.
#[test]
fn suspense_wraps_and_every_parked_leg_is_acknowledged() {
    let mut pair = pair();
    let mint = ids_on_shard(0, 2, 1_000, 1)[0];
    pair.shards[0].create_accounts(&[account(mint, 1, account_flags::ALLOW_NEGATIVE)]);
    let also_missing = ids_on_shard(1, 2, 1, 4)[3];
    let huge = transfer(100, mint, pair.missing_remote, u128::MAX);
    let small = transfer(101, pair.payer, also_missing, 1);
    let records = [huge, small].map(|t| RecordSlot::from_transfer(&t));
    let (codes, outbound) = pair.shards[0].execute(LedgerOperation::CreateTransfers, &records);
    assert_eq!(codes, [0, 0]);
    let legs = legs_of(&outbound, LedgerOperation::ApplyCreditLegs);
    let (codes, acks) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &legs);
    assert_eq!(
        codes,
        [u32::from(CreditLegResult::ParkedCreditAccountNotFound); 2]
    );
    assert_eq!(
        pair.shards[1].ledger.suspense(),
        0,
        "u128::MAX + 1, wrapped"
    );
    let acks = legs_of(&acks, LedgerOperation::AckCreditLegs);
    assert_eq!(acks.len(), 2, "both parked legs acknowledged");
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    assert_eq!(codes, [0, 0]);
    assert_eq!(pair.shards[0].ledger.credit_legs_unacked_count(), 0);
    let conserved = pair.shards[0]
        .ledger
        .conservation_sum()
        .wrapping_add(pair.shards[1].ledger.conservation_sum());
    assert_eq!(conserved, 0);
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
    // Acknowledgements name the same leg (each carries the timestamp its copy was given).
    assert_eq!(ack_key(&first_acks[0]), ack_key(&first_acks[1]));
    let (codes, again) = pair.shards[1].execute(LedgerOperation::ApplyCreditLegs, &[leg]);
    assert_eq!(codes, [u32::from(CreditLegResult::Duplicate)]);
    assert_eq!(ack_key(&again[0]), ack_key(&first_acks[0]));
    assert_eq!(balance(&pair.shards[1].ledger, pair.payee_remote), 5);

    // Any of them settles the leg, once.
    let acks = [first_acks[1], first_acks[0], again[0]].map(|message| message.record);
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    let duplicate = u32::from(CreditAckResult::Duplicate);
    assert_eq!(codes, [0, duplicate, duplicate]);
    assert_eq!(pair.shards[0].ledger.in_flight(), 0);
    assert_eq!(pair.shards[0].ledger.credit_legs_unacked_count(), 0);
}

/// What identifies an acknowledgement: destination, operation, transfer id, leg number and
/// amount.
fn ack_key(message: &LedgerOutbound) -> (u32, LedgerOperation, u128, u64, u128) {
    let leg = message.record.as_transfer();
    (
        message.shard,
        message.operation,
        leg.id,
        credit_leg_sequence(leg),
        leg.amount,
    )
}

fn with_sequence(leg: Transfer, sequence: u64) -> Transfer {
    let mut numbered = leg;
    numbered.reserved[..8].copy_from_slice(&sequence.to_le_bytes());
    numbered
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
    let unnumbered = with_sequence(leg, 0);
    let mut reserved_set = leg;
    reserved_set.reserved[31] = 1;
    let from_self = Transfer {
        debit_account_id: pair.payee_remote,
        credit_account_id: pair.other_ledger_remote,
        ..leg
    };
    let records = [unflagged, zero_amount, unnumbered, reserved_set, from_self]
        .map(|t| RecordSlot::from_transfer(&t));
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

    let unnumbered = with_sequence(leg, 0);
    let never_sent = with_sequence(leg, 2);
    let other_id = Transfer { id: 999, ..leg };
    let altered = Transfer { amount: 6, ..leg };
    let acks = [unnumbered, never_sent, other_id, altered].map(|t| RecordSlot::from_transfer(&t));
    let (codes, _) = pair.shards[0].execute(LedgerOperation::AckCreditLegs, &acks);
    assert_eq!(
        codes,
        [
            u32::from(CreditAckResult::TransferNotFound),
            u32::from(CreditAckResult::TransferNotFound),
            u32::from(CreditAckResult::Mismatch),
            u32::from(CreditAckResult::Mismatch)
        ]
    );
    assert_eq!(pair.shards[0].ledger.in_flight(), 5, "still in flight");
}

#[test]
fn the_in_flight_span_pushes_back_until_its_oldest_leg_is_acknowledged() {
    let mut origin = Shard::with_windows(0, 2, (64, 2));
    let mut target = Shard::with_windows(1, 2, (64, 2));
    let [mint, local] = ids_on_shard(0, 2, 1, 2)[..] else {
        unreachable!()
    };
    let payee = ids_on_shard(1, 2, 1, 1)[0];
    origin.create_accounts(&[
        account(mint, 1, account_flags::ALLOW_NEGATIVE),
        account(local, 1, 0),
    ]);
    target.create_accounts(&[account(payee, 1, 0)]);
    let pays = [1, 2, 3].map(|id| RecordSlot::from_transfer(&transfer(id, mint, payee, id)));
    let (codes, outbound) = origin.execute(LedgerOperation::CreateTransfers, &pays);
    let full = u32::from(CreateTransferResult::CreditLegsInFlightFull);
    assert_eq!(codes, [0, 0, full]);
    assert_eq!(
        origin.ledger.lookup_transfer(3),
        None,
        "a refused transfer is not stored"
    );
    assert_eq!(origin.ledger.in_flight(), 3);
    // Local transfers are not held back.
    let local_pay = RecordSlot::from_transfer(&transfer(4, mint, local, 1));
    let (codes, _) = origin.execute(LedgerOperation::CreateTransfers, &[local_pay]);
    assert_eq!(codes, [0]);

    // The second leg's acknowledgement frees nothing: the first still holds the span.
    let legs = legs_of(&outbound, LedgerOperation::ApplyCreditLegs);
    let (_, acks) = target.execute(LedgerOperation::ApplyCreditLegs, &legs);
    let (codes, _) = origin.execute(LedgerOperation::AckCreditLegs, &[acks[1].record]);
    assert_eq!(codes, [0]);
    let (codes, _) = origin.execute(LedgerOperation::CreateTransfers, &pays[2..]);
    assert_eq!(codes, [full]);
    let unacked: Vec<LedgerOutbound> = origin.ledger.credit_legs_unacked().collect();
    assert_eq!(unacked, outbound[..1], "resent exactly as first sent");

    let (codes, outbound) = origin.execute(LedgerOperation::AckCreditLegs, &[acks[0].record]);
    assert_eq!((codes, outbound), (vec![0], vec![]));
    let (codes, outbound) = origin.execute(LedgerOperation::CreateTransfers, &pays[2..]);
    assert_eq!(codes, [0]);
    assert_eq!(credit_leg_sequence(outbound[0].record.as_transfer()), 3);
    assert_eq!(origin.ledger.in_flight(), 3);
    assert_eq!(
        origin.ledger.conservation_sum() + target.ledger.conservation_sum() + 3,
        0
    );
}

#[test]
fn an_evicted_transfer_still_settles_its_leg_exactly_once() {
    // A window of two transfers: the cross-shard transfer is evicted before its ack.
    let mut origin = Shard::with_windows(0, 2, (2, 8));
    let mut target = Shard::with_windows(1, 2, (2, 8));
    let [mint, local] = ids_on_shard(0, 2, 1, 2)[..] else {
        unreachable!()
    };
    let payee = ids_on_shard(1, 2, 1, 1)[0];
    origin.create_accounts(&[
        account(mint, 1, account_flags::ALLOW_NEGATIVE),
        account(local, 1, 0),
    ]);
    target.create_accounts(&[account(payee, 1, 0)]);
    let pay = transfer(1, mint, payee, 40);
    let (_, outbound) = origin.execute(
        LedgerOperation::CreateTransfers,
        &[RecordSlot::from_transfer(&pay)],
    );
    let stored = origin.ledger.lookup_transfer(1).unwrap();
    assert_ne!(stored.flags & transfer_flags::CREDIT_IN_FLIGHT, 0);
    assert_eq!(
        stored.reserved, [0; 32],
        "the leg number is not shown to clients"
    );
    let locals: Vec<RecordSlot> = (2..6)
        .map(|id| RecordSlot::from_transfer(&transfer(id, mint, local, 1)))
        .collect();
    origin.execute(LedgerOperation::CreateTransfers, &locals);
    assert_eq!(origin.ledger.lookup_transfer(1), None, "evicted");
    assert_eq!(origin.ledger.in_flight(), 40);
    let unacked: Vec<LedgerOutbound> = origin.ledger.credit_legs_unacked().collect();
    assert_eq!(unacked, outbound, "the leg is still resent");

    let (_, acks) = target.execute(LedgerOperation::ApplyCreditLegs, &[unacked[0].record]);
    let ack = acks[0].record;
    let (codes, _) = origin.execute(LedgerOperation::AckCreditLegs, &[ack, ack]);
    assert_eq!(codes, [0, u32::from(CreditAckResult::Duplicate)]);
    let (codes, _) = origin.execute(LedgerOperation::AckCreditLegs, &[ack]);
    assert_eq!(codes, [u32::from(CreditAckResult::Duplicate)]);
    assert_eq!(origin.ledger.in_flight(), 0, "settled once");
    assert_eq!(origin.ledger.credit_legs_unacked_count(), 0);

    // A client retry of the evicted transfer is a new transfer with a new leg: debited and
    // credited again, never credited without its debit.
    let (codes, outbound) = origin.execute(
        LedgerOperation::CreateTransfers,
        &[RecordSlot::from_transfer(&pay)],
    );
    assert_eq!(codes, [0]);
    assert_eq!(credit_leg_sequence(outbound[0].record.as_transfer()), 2);
    let (codes, _) = target.execute(LedgerOperation::ApplyCreditLegs, &[outbound[0].record]);
    assert_eq!(codes, [0]);
    assert_eq!(balance(&target.ledger, payee), 80);
    assert_eq!(
        origin.ledger.conservation_sum() + target.ledger.conservation_sum(),
        0
    );
}

#[test]
fn a_late_duplicate_is_not_applied_again_however_many_legs_came_between() {
    // Three shards, windows of four legs. Shard 0 sends leg L to shard 2; a copy of L is
    // held back, as a resend sent before the first acknowledgement arrived would be.
    const WIDTH: usize = 4;
    let mut shards: Vec<Shard> = (0..3)
        .map(|index| Shard::with_windows(index, 3, (16, WIDTH)))
        .collect();
    let mints: Vec<u128> = (0..3)
        .map(|shard| ids_on_shard(shard, 3, 1, 1)[0])
        .collect();
    for (shard, &mint) in shards.iter_mut().zip(&mints) {
        shard.create_accounts(&[account(mint, 1, account_flags::ALLOW_NEGATIVE)]);
    }
    let payee = ids_on_shard(2, 3, 1, 2)[1];
    shards[2].create_accounts(&[account(payee, 1, 0)]);
    let mut id = 1_000;
    // One round trip from `origin` to shard 2: returns the leg.
    let mut round_trip = |shards: &mut Vec<Shard>, origin: usize| {
        id += 1;
        let pay = RecordSlot::from_transfer(&transfer(id, mints[origin], payee, 1));
        let (codes, legs) = shards[origin].execute(LedgerOperation::CreateTransfers, &[pay]);
        assert_eq!(codes, [0]);
        let (codes, acks) = shards[2].execute(LedgerOperation::ApplyCreditLegs, &[legs[0].record]);
        assert_eq!(codes, [0]);
        let (codes, _) = shards[origin].execute(LedgerOperation::AckCreditLegs, &[acks[0].record]);
        assert_eq!(codes, [0]);
        legs[0].record
    };
    let late = round_trip(&mut shards, 0);
    // Shard 1 floods shard 2: a window of the last N legs by id would have forgotten L.
    for _ in 0..10 * WIDTH {
        round_trip(&mut shards, 1);
    }
    let (codes, _) = shards[2].execute(LedgerOperation::ApplyCreditLegs, &[late]);
    assert_eq!(
        codes,
        [u32::from(CreditLegResult::Duplicate)],
        "remembered exactly"
    );
    // Shard 0 moves on past L's window: L is now stale, which still means applied.
    for _ in 0..WIDTH {
        round_trip(&mut shards, 0);
    }
    assert!(shards[2].ledger.credit_leg_applied(late.as_transfer()));
    let (codes, acks) = shards[2].execute(LedgerOperation::ApplyCreditLegs, &[late]);
    assert_eq!(codes, [u32::from(CreditLegResult::Duplicate)], "stale");
    let (codes, _) = shards[0].execute(LedgerOperation::AckCreditLegs, &[acks[0].record]);
    assert_eq!(codes, [u32::from(CreditAckResult::Duplicate)]);
    let rounds = 1 + 10 * WIDTH + WIDTH;
    assert_eq!(balance(&shards[2].ledger, payee), rounds as i128);
    let total: i128 = shards
        .iter()
        .map(|shard| shard.ledger.conservation_sum())
        .sum();
    assert_eq!(total, 0);
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
    /// Transfers applied (`Ok`), over all shards.
    transfers_applied: usize,
}

impl Cluster {
    fn new(seed: u64, shard_count: u32, windows: Windows, followers: bool) -> Cluster {
        let mut cluster = Cluster {
            shards: (0..shard_count)
                .map(|index| {
                    let shard = Shard::with_windows(index, shard_count, windows);
                    if followers {
                        shard.with_follower()
                    } else {
                        shard
                    }
                })
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
            transfers_applied: 0,
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
                self.transfers_applied += 1;
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
        for shard in &self.shards {
            for Outbound {
                shard: target,
                record,
                ..
            } in shard.ledger.credit_legs_unacked()
            {
                let leg = record.as_transfer();
                let applied = self.shards[target as usize].ledger.credit_leg_applied(leg);
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
    let cluster = run_cluster_with(seed, shard_count, steps, WINDOWS_ROOMY, false);
    assert!(cluster.transfers_applied > 0);
}

/// Runs `steps` random steps (submit, lossy delivery with duplicates and reordering, resend,
/// and with `followers`, restarts from snapshots), checking conservation after each; then
/// settles and checks the balances against the model.
fn run_cluster_with(
    seed: u64,
    shard_count: u32,
    steps: usize,
    windows: Windows,
    followers: bool,
) -> Cluster {
    let mut cluster = Cluster::new(seed, shard_count, windows, followers);
    for step in 0..steps {
        match cluster.rng.below(10) {
            0..=3 => cluster.submit_transfers(),
            4..=8 => cluster.deliver(true),
            _ => cluster.resend_unacked(),
        }
        if followers && step % 50 == 49 {
            let shard = cluster.rng.below(cluster.shards.len());
            let seed = cluster.rng.next_u64();
            cluster.shards[shard].restart_from_snapshot(seed);
        }
        cluster.check_conservation();
        cluster.check_no_overdraft();
    }
    cluster.settle();
    cluster.check_settled();
    cluster
}

#[test]
fn conservation_holds_under_reordering_duplication_and_loss() {
    for seed in 0..4 {
        for shard_count in 2..=4 {
            run_cluster(seed, shard_count, 300);
        }
    }
}

/// Windows far smaller than the traffic: the transfer window wraps many times, legs are
/// held back by the in-flight span, and late duplicates fall below the replay windows.
/// Followers with other hash seeds, and restarts from snapshots, must agree on every result
/// and digest.
#[test]
fn conservation_holds_with_small_windows_that_wrap_many_times() {
    for seed in 0..4 {
        for shard_count in 2..=4 {
            for windows in [(16, 8), (5, 1), (24, 3)] {
                let cluster = run_cluster_with(seed, shard_count, 400, windows, true);
                let wraps = cluster.transfers_applied / (windows.0 * shard_count as usize);
                assert!(wraps >= 5, "{windows:?}: only {wraps} wraps");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn conservation_holds_for_any_seed(seed in any::<u64>(), shard_count in 2_u32..=4) {
        run_cluster(seed, shard_count, 200);
    }

    #[test]
    fn conservation_holds_for_any_seed_and_small_windows(
        seed in any::<u64>(),
        shard_count in 2_u32..=4,
        transfers_max in 1_usize..=32,
        credit_legs_in_flight_max in 1_usize..=8,
    ) {
        run_cluster_with(seed, shard_count, 200, (transfers_max, credit_legs_in_flight_max), true);
    }
}
