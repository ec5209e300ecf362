//! The ledger on one shard: account and transfer results (every code), insufficient funds,
//! idempotent retries and the bounds of the idempotency window, a full account table,
//! timestamps and conservation.

use std::collections::HashSet;

use bytemuck::Zeroable;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{
    Account, CreateAccountResult, CreateTransferResult, RecordResult, RecordSlot, Transfer,
    account_flags, shard_of, transfer_flags,
};
use percore_engine::state_machine::StateMachine;

/// Drives one ledger the way a shard does: prepare, then apply the next op.
struct Shard {
    ledger: Ledger,
    op: u64,
    now_ns: u64,
}

impl Shard {
    fn new(config: LedgerConfig) -> Shard {
        Shard {
            ledger: Ledger::new(config),
            op: 0,
            now_ns: 1_000,
        }
    }

    fn single(accounts_max: usize, transfers_max: usize) -> Shard {
        Shard::new(LedgerConfig {
            shard_index: 0,
            shard_count: 1,
            accounts_max,
            transfers_max,
            credit_legs_in_flight_max: 1,
            batch_entries_max: 64,
        })
    }

    fn execute(&mut self, operation: LedgerOperation, records: &[RecordSlot]) -> Vec<u32> {
        let mut batch = records.to_vec();
        self.now_ns += 1_000;
        self.op += 1;
        self.ledger.prepare(operation, self.now_ns, &mut batch);
        let mut results = vec![RecordResult::zeroed(); batch.len()];
        self.ledger.apply(self.op, operation, &batch, &mut results);
        for (index, result) in results.iter().enumerate() {
            assert_eq!(result.index as usize, index);
        }
        results.iter().map(|result| result.code).collect()
    }

    fn create_accounts(&mut self, accounts: &[Account]) -> Vec<CreateAccountResult> {
        let slots: Vec<RecordSlot> = accounts.iter().map(RecordSlot::from_account).collect();
        let codes = self.execute(LedgerOperation::CreateAccounts, &slots);
        codes
            .into_iter()
            .map(|code| code.try_into().unwrap())
            .collect()
    }

    fn create_transfers(&mut self, transfers: &[Transfer]) -> Vec<CreateTransferResult> {
        let slots: Vec<RecordSlot> = transfers.iter().map(RecordSlot::from_transfer).collect();
        let codes = self.execute(LedgerOperation::CreateTransfers, &slots);
        codes
            .into_iter()
            .map(|code| code.try_into().unwrap())
            .collect()
    }

    fn create_account(&mut self, account: Account) -> CreateAccountResult {
        self.create_accounts(&[account])[0]
    }

    fn create_transfer(&mut self, transfer: Transfer) -> CreateTransferResult {
        self.create_transfers(&[transfer])[0]
    }

    fn balance(&self, id: u128) -> i128 {
        let account = self.ledger.lookup_account(id).expect("account exists");
        account.credits_posted as i128 - account.debits_posted as i128
    }
}

fn account(id: u128) -> Account {
    Account {
        id,
        ledger: 1,
        code: 10,
        ..Account::zeroed()
    }
}

fn mint(id: u128) -> Account {
    Account {
        flags: account_flags::ALLOW_NEGATIVE,
        ..account(id)
    }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 20,
        ..Transfer::zeroed()
    }
}

#[test]
fn accounts_are_created_once_and_retries_are_recognised() {
    let mut shard = Shard::single(16, 16);
    assert_eq!(
        shard.create_accounts(&[account(1), account(2), account(1)]),
        [
            CreateAccountResult::Ok,
            CreateAccountResult::Ok,
            CreateAccountResult::Exists
        ]
    );
    let different = Account {
        user_data: 5,
        ..account(2)
    };
    assert_eq!(
        shard.create_account(different),
        CreateAccountResult::ExistsWithDifferentFields
    );
    assert_eq!(shard.ledger.accounts_count(), 2);
    let stored = shard.ledger.lookup_account(2).unwrap();
    assert_eq!(stored.user_data, 0, "a rejected duplicate changes nothing");
    assert!(stored.timestamp > 0, "prepare assigned a timestamp");
    assert_eq!(shard.ledger.lookup_account(3), None);
    assert_eq!(shard.ledger.lookup_account(0), None);
}

#[test]
fn every_account_result_code_is_reachable() {
    let mut shard = Shard::single(2, 1);
    let mut seen = HashSet::new();
    let mut expect = |shard: &mut Shard, account: Account, expected: CreateAccountResult| {
        assert_eq!(shard.create_account(account), expected, "{account:?}");
        seen.insert(expected);
    };
    let mut reserved = account(1);
    reserved.reserved[47] = 1;
    expect(
        &mut shard,
        reserved,
        CreateAccountResult::ReservedFieldNotZero,
    );
    let bad_flags = Account {
        flags: 1 << 15,
        ..account(1)
    };
    expect(&mut shard, bad_flags, CreateAccountResult::FlagsInvalid);
    expect(&mut shard, account(0), CreateAccountResult::IdMustNotBeZero);
    expect(
        &mut shard,
        account(u128::MAX),
        CreateAccountResult::IdMustNotBeIntMax,
    );
    let debited = Account {
        debits_posted: 1,
        ..account(1)
    };
    expect(
        &mut shard,
        debited,
        CreateAccountResult::DebitsPostedMustBeZero,
    );
    let credited = Account {
        credits_posted: 1,
        ..account(1)
    };
    expect(
        &mut shard,
        credited,
        CreateAccountResult::CreditsPostedMustBeZero,
    );
    let no_ledger = Account {
        ledger: 0,
        ..account(1)
    };
    expect(
        &mut shard,
        no_ledger,
        CreateAccountResult::LedgerMustNotBeZero,
    );
    let no_code = Account {
        code: 0,
        ..account(1)
    };
    expect(&mut shard, no_code, CreateAccountResult::CodeMustNotBeZero);
    expect(&mut shard, account(1), CreateAccountResult::Ok);
    expect(&mut shard, account(1), CreateAccountResult::Exists);
    expect(
        &mut shard,
        mint(1),
        CreateAccountResult::ExistsWithDifferentFields,
    );
    expect(&mut shard, account(2), CreateAccountResult::Ok);
    expect(
        &mut shard,
        account(3),
        CreateAccountResult::AccountsTableFull,
    );
    // A full table still recognises retries.
    expect(&mut shard, account(2), CreateAccountResult::Exists);

    let mut two_shards = Shard::new(LedgerConfig {
        shard_index: 0,
        shard_count: 2,
        accounts_max: 4,
        transfers_max: 4,
        credit_legs_in_flight_max: 4,
        batch_entries_max: 8,
    });
    let foreign = (1..).find(|&id| shard_of(id, 2) == 1).unwrap();
    expect(
        &mut two_shards,
        account(foreign),
        CreateAccountResult::AccountNotOnShard,
    );

    let all: HashSet<_> = CreateAccountResult::ALL.iter().copied().collect();
    assert_eq!(seen, all, "missing: {:?}", all.difference(&seen));
}

#[test]
fn every_transfer_result_code_is_reachable() {
    let config = LedgerConfig {
        shard_index: 0,
        shard_count: 2,
        accounts_max: 16,
        transfers_max: 4,
        credit_legs_in_flight_max: 1,
        batch_entries_max: 8,
    };
    let mut shard = Shard::new(config);
    let mut local = (1..).filter(|&id| shard_of(id, 2) == 0);
    let [a, b, mint_a, mint_b, missing, other_ledger] = [(); 6].map(|()| local.next().unwrap());
    let remote = (1..).find(|&id| shard_of(id, 2) == 1).unwrap();
    let created = shard.create_accounts(&[
        account(a),
        account(b),
        mint(mint_a),
        mint(mint_b),
        Account {
            ledger: 2,
            ..account(other_ledger)
        },
    ]);
    assert!(
        created
            .iter()
            .all(|&result| result == CreateAccountResult::Ok)
    );

    let mut seen = HashSet::new();
    let mut expect = |shard: &mut Shard, transfer: Transfer, expected: CreateTransferResult| {
        assert_eq!(shard.create_transfer(transfer), expected, "{transfer:?}");
        seen.insert(expected);
    };
    use CreateTransferResult as R;
    let mut reserved = transfer(1, a, b, 1);
    reserved.reserved[0] = 1;
    expect(&mut shard, reserved, R::ReservedFieldNotZero);
    let internal_flag = Transfer {
        flags: transfer_flags::CROSS_SHARD_CREDIT,
        ..transfer(1, mint_a, b, 1)
    };
    expect(&mut shard, internal_flag, R::FlagsInvalid);
    expect(&mut shard, transfer(0, a, b, 1), R::IdMustNotBeZero);
    expect(
        &mut shard,
        transfer(u128::MAX, a, b, 1),
        R::IdMustNotBeIntMax,
    );
    expect(
        &mut shard,
        transfer(1, 0, b, 1),
        R::DebitAccountIdMustNotBeZero,
    );
    expect(
        &mut shard,
        transfer(1, a, 0, 1),
        R::CreditAccountIdMustNotBeZero,
    );
    expect(&mut shard, transfer(1, a, a, 1), R::AccountsMustBeDifferent);
    expect(&mut shard, transfer(1, a, b, 0), R::AmountMustNotBeZero);
    let no_ledger = Transfer {
        ledger: 0,
        ..transfer(1, a, b, 1)
    };
    expect(&mut shard, no_ledger, R::LedgerMustNotBeZero);
    let no_code = Transfer {
        code: 0,
        ..transfer(1, a, b, 1)
    };
    expect(&mut shard, no_code, R::CodeMustNotBeZero);
    expect(
        &mut shard,
        transfer(1, remote, a, 1),
        R::DebitAccountNotOnShard,
    );
    expect(
        &mut shard,
        transfer(1, missing, a, 1),
        R::DebitAccountNotFound,
    );
    expect(
        &mut shard,
        transfer(1, a, missing, 1),
        R::CreditAccountNotFound,
    );
    expect(
        &mut shard,
        transfer(1, mint_a, other_ledger, 1),
        R::LedgerMismatch,
    );
    expect(&mut shard, transfer(1, a, b, 1), R::ExceedsCredits);
    expect(&mut shard, transfer(1, mint_a, a, u128::MAX), R::Ok);
    expect(&mut shard, transfer(1, mint_a, a, u128::MAX), R::Exists);
    expect(
        &mut shard,
        transfer(1, mint_a, a, 7),
        R::ExistsWithDifferentFields,
    );
    expect(&mut shard, transfer(2, mint_a, b, 1), R::OverflowsDebits);
    expect(&mut shard, transfer(2, mint_b, a, 1), R::OverflowsCredits);
    expect(&mut shard, transfer(2, a, b, 1), R::Ok);
    expect(&mut shard, transfer(3, a, b, 1), R::Ok);
    expect(&mut shard, transfer(4, a, remote, 1), R::Ok);
    // One leg may be in flight, and the first is not acknowledged yet.
    expect(
        &mut shard,
        transfer(5, a, remote, 1),
        R::CreditLegsInFlightFull,
    );

    let all: HashSet<_> = CreateTransferResult::ALL.iter().copied().collect();
    assert_eq!(seen, all, "missing: {:?}", all.difference(&seen));
}

#[test]
fn insufficient_funds_are_refused_and_change_nothing() {
    let mut shard = Shard::single(8, 8);
    shard.create_accounts(&[mint(1), account(2), account(3)]);
    assert_eq!(
        shard.create_transfer(transfer(10, 1, 2, 100)),
        CreateTransferResult::Ok
    );
    assert_eq!(
        shard.create_transfer(transfer(11, 2, 3, 60)),
        CreateTransferResult::Ok
    );
    // Exactly the balance is allowed; one more unit is not.
    assert_eq!(
        shard.create_transfer(transfer(12, 2, 3, 41)),
        CreateTransferResult::ExceedsCredits
    );
    assert_eq!(
        shard.create_transfer(transfer(12, 2, 3, 40)),
        CreateTransferResult::Ok
    );
    assert_eq!(
        shard.create_transfer(transfer(13, 2, 3, 1)),
        CreateTransferResult::ExceedsCredits
    );
    assert_eq!(shard.balance(1), -100);
    assert_eq!(shard.balance(2), 0);
    assert_eq!(shard.balance(3), 100);
    assert_eq!(
        shard.ledger.lookup_transfer(13),
        None,
        "refused transfers are not stored"
    );
    assert_eq!(shard.ledger.transfers_count(), 3);
    assert_eq!(shard.ledger.conservation_sum(), 0);
}

#[test]
fn retries_are_idempotent_within_and_across_batches() {
    let mut shard = Shard::single(8, 8);
    shard.create_accounts(&[mint(1), account(2), account(3)]);
    let pay = transfer(10, 1, 2, 50);
    assert_eq!(
        shard.create_transfers(&[pay, pay]),
        [CreateTransferResult::Ok, CreateTransferResult::Exists]
    );
    assert_eq!(shard.create_transfer(pay), CreateTransferResult::Exists);
    assert_eq!(shard.balance(2), 50, "applied once");

    // A retry is recognised even once its funds are gone.
    let spend = transfer(11, 2, 3, 50);
    assert_eq!(shard.create_transfer(spend), CreateTransferResult::Ok);
    assert_eq!(shard.create_transfer(spend), CreateTransferResult::Exists);
    let altered = Transfer {
        user_data: 9,
        ..spend
    };
    assert_eq!(
        shard.create_transfer(altered),
        CreateTransferResult::ExistsWithDifferentFields
    );
    // The client's timestamp is not part of a transfer's identity.
    let restamped = Transfer {
        timestamp: 12_345,
        ..spend
    };
    assert_eq!(
        shard.create_transfer(restamped),
        CreateTransferResult::Exists
    );
    assert_eq!((shard.balance(2), shard.balance(3)), (0, 50));
}

#[test]
fn a_full_window_evicts_the_oldest_transfer_and_forgets_its_id() {
    let mut shard = Shard::single(4, 2);
    shard.create_accounts(&[mint(1), account(2)]);
    use CreateTransferResult as R;
    let results = shard.create_transfers(&[
        transfer(10, 1, 2, 1),
        transfer(11, 1, 2, 1),
        transfer(11, 1, 2, 1),
        transfer(12, 1, 2, 1), // evicts 10
        transfer(12, 1, 2, 1),
        transfer(11, 1, 2, 1), // still in the window
        transfer(10, 1, 2, 1), // older than the window: new again (evicts 11)
    ]);
    assert_eq!(
        results,
        [R::Ok, R::Ok, R::Exists, R::Ok, R::Exists, R::Exists, R::Ok]
    );
    assert_eq!(shard.balance(2), 4, "transfer 10 was applied twice");
    assert_eq!(shard.ledger.transfers_count(), 2);
    assert!(shard.ledger.lookup_transfer(11).is_none());
    assert_eq!(shard.ledger.lookup_transfer(10).unwrap().amount, 1);
    // Just inside and just outside the window, in separate batches.
    assert_eq!(shard.create_transfer(transfer(12, 1, 2, 1)), R::Exists);
    assert_eq!(
        shard.create_transfer(transfer(12, 1, 2, 9)),
        R::ExistsWithDifferentFields
    );
    assert_eq!(shard.create_transfer(transfer(13, 1, 2, 1)), R::Ok); // evicts 12
    assert_eq!(shard.create_transfer(transfer(12, 1, 2, 9)), R::Ok);
    assert_eq!(shard.ledger.conservation_sum(), 0);
}

#[test]
fn duplicates_are_exact_for_the_last_transfers_max_transfers_through_many_wraps() {
    const WINDOW: u128 = 7;
    let mut shard = Shard::single(4, WINDOW as usize);
    shard.create_accounts(&[mint(1), account(2)]);
    use CreateTransferResult as R;
    let mut applied = 0_i128;
    for id in 100..400_u128 {
        assert_eq!(shard.create_transfer(transfer(id, 1, 2, 1)), R::Ok);
        applied += 1;
        // Every id of the last WINDOW is a duplicate; the one before is new.
        let oldest_kept = (id + 1 - WINDOW).max(100);
        let retry = oldest_kept + id % (id - oldest_kept + 1);
        assert_eq!(shard.create_transfer(transfer(retry, 1, 2, 1)), R::Exists);
        if id >= 100 + WINDOW {
            let forgotten = id - WINDOW;
            assert_eq!(shard.ledger.lookup_transfer(forgotten), None);
            assert!(shard.ledger.lookup_transfer(forgotten + 1).is_some());
        }
        assert_eq!(
            shard.ledger.transfers_count() as u128,
            (id - 99).min(WINDOW)
        );
    }
    assert_eq!(shard.balance(2), applied);
}

#[test]
fn timestamps_increase_even_when_the_clock_goes_back() {
    let mut shard = Shard::single(8, 8);
    shard.create_accounts(&[mint(1), account(2)]);
    let batch: Vec<Transfer> = (10..14).map(|id| transfer(id, 1, 2, 1)).collect();
    shard.create_transfers(&batch);
    shard.now_ns = 0; // a clock step backwards
    shard.create_transfers(&[transfer(20, 1, 2, 1)]);
    let timestamps: Vec<u64> = [10, 11, 12, 13, 20]
        .iter()
        .map(|&id| shard.ledger.lookup_transfer(id).unwrap().timestamp)
        .collect();
    assert!(
        timestamps.windows(2).all(|pair| pair[0] < pair[1]),
        "{timestamps:?}"
    );
    let account = shard.ledger.lookup_account(2).unwrap();
    assert!(account.timestamp < timestamps[0]);
}

#[test]
fn a_single_shard_never_emits_messages() {
    let mut shard = Shard::single(8, 64);
    shard.create_accounts(&[mint(1), account(2), account(3)]);
    let batch: Vec<Transfer> = (1..=32)
        .map(|id| transfer(100 + id, 1 + id % 3, 1 + (id + 1) % 3, id))
        .collect();
    shard.create_transfers(&batch);
    assert_eq!(shard.ledger.poll_outbound(), None);
    assert_eq!(shard.ledger.in_flight(), 0);
    assert_eq!(shard.ledger.conservation_sum(), 0);
}

#[test]
#[should_panic(expected = "batches apply once, in op order")]
fn applying_an_op_twice_is_a_bug() {
    let mut ledger = Ledger::new(LedgerConfig {
        shard_index: 0,
        shard_count: 1,
        accounts_max: 4,
        transfers_max: 4,
        credit_legs_in_flight_max: 1,
        batch_entries_max: 4,
    });
    let mut batch = [RecordSlot::from_account(&account(1))];
    ledger.prepare(LedgerOperation::CreateAccounts, 1, &mut batch);
    let mut results = [RecordResult::zeroed()];
    ledger.apply(7, LedgerOperation::CreateAccounts, &batch, &mut results);
    ledger.apply(7, LedgerOperation::CreateAccounts, &batch, &mut results);
}
