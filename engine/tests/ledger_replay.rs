//! Replication properties of the ledger: followers applying the leader's prepared batches
//! reach the same digest; snapshots restore to the same digest and reject damage; a wrapped
//! transfer window restores in its order, so restored and original ledgers keep giving the
//! same results.

use bytemuck::Zeroable;
use percore_engine::ledger::{
    Ledger, LedgerConfig, LedgerOperation, LedgerOutbound, TIMESTAMP_MAX,
};
use percore_engine::record::{
    Account, RecordResult, RecordSlot, Transfer, account_flags, shard_of, transfer_flags,
};
use percore_engine::state_machine::{RestoreError, StateMachine};

const SHARDS: u32 = 2;

fn config(shard_index: u32) -> LedgerConfig {
    LedgerConfig {
        shard_index,
        shard_count: SHARDS,
        accounts_max: 32,
        transfers_max: 1_024,
        credit_legs_in_flight_max: 1_024,
        batch_entries_max: 32,
    }
}

/// A larger account table: with another hash seed, a different memory layout for the same
/// state. (Deployed replicas share every bound that decides results, `accounts_max` too,
/// as the settings digest enforces; while no table fills, a roomier one decides nothing.)
fn config_roomy(shard_index: u32) -> LedgerConfig {
    LedgerConfig {
        accounts_max: 1_000,
        ..config(shard_index)
    }
}

/// One replication group: a leader that prepares, followers that only apply.
struct Group {
    leader: Ledger,
    followers: Vec<Ledger>,
    op: u64,
    now_ns: u64,
    /// Every prepared batch, for replaying later.
    log: Vec<(u64, LedgerOperation, Vec<RecordSlot>)>,
}

impl Group {
    fn new(shard_index: u32) -> Group {
        Group {
            leader: Ledger::new(config(shard_index)),
            followers: vec![
                Ledger::new(config(shard_index)),
                Ledger::with_hash_seed(config_roomy(shard_index), 0xdead_beef),
            ],
            op: 0,
            now_ns: 5_000,
            log: Vec::new(),
        }
    }

    fn execute(
        &mut self,
        operation: LedgerOperation,
        records: &[RecordSlot],
    ) -> Vec<LedgerOutbound> {
        let mut batch = records.to_vec();
        self.op += 1;
        self.now_ns += 777;
        self.leader.prepare(operation, self.now_ns, &mut batch);
        let leader_results = apply(&mut self.leader, self.op, operation, &batch);
        let leader_outbound: Vec<_> = std::iter::from_fn(|| self.leader.poll_outbound()).collect();
        for follower in &mut self.followers {
            let results = apply(follower, self.op, operation, &batch);
            let outbound: Vec<_> = std::iter::from_fn(|| follower.poll_outbound()).collect();
            assert_eq!(results, leader_results);
            assert_eq!(outbound, leader_outbound);
            assert_eq!(follower.digest(), self.leader.digest(), "op {}", self.op);
        }
        self.log.push((self.op, operation, batch));
        leader_outbound
    }
}

fn apply(
    ledger: &mut Ledger,
    op: u64,
    operation: LedgerOperation,
    batch: &[RecordSlot],
) -> Vec<RecordResult> {
    let mut results = vec![RecordResult::zeroed(); batch.len()];
    ledger.apply(op, operation, batch, &mut results);
    results
}

fn account(id: u128, flags: u16) -> RecordSlot {
    RecordSlot::from_account(&Account {
        id,
        ledger: 1,
        code: 1,
        flags,
        ..Account::zeroed()
    })
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> RecordSlot {
    RecordSlot::from_transfer(&Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::zeroed()
    })
}

/// Builds two groups with accounts, local and cross-shard transfers, applied and parked legs,
/// acknowledged legs, and legs still in flight (the last round is neither delivered nor
/// acknowledged). Deterministic.
fn workload() -> [Group; 2] {
    let mut groups = [Group::new(0), Group::new(1)];
    let ids: Vec<Vec<u128>> = (0..SHARDS)
        .map(|shard| {
            (1..)
                .filter(|&id| shard_of(id, SHARDS) == shard)
                .take(6)
                .collect()
        })
        .collect();
    for (shard, group) in groups.iter_mut().enumerate() {
        let mut accounts = vec![account(ids[shard][0], account_flags::ALLOW_NEGATIVE)];
        accounts.extend(ids[shard][1..5].iter().map(|&id| account(id, 0)));
        group.execute(LedgerOperation::CreateAccounts, &accounts);
    }
    let mut transfer_id = 1;
    for round in 0..6_u128 {
        let mut in_transit: Vec<LedgerOutbound> = Vec::new();
        for (shard, group) in groups.iter_mut().enumerate() {
            let other = 1 - shard;
            let mut batch = Vec::new();
            for index in 0..20_u128 {
                let debit = ids[shard][(index % 5) as usize];
                // Credit: local, remote, or the remote id never created (parked).
                let credit = match index % 3 {
                    0 => ids[shard][((index + 1) % 5) as usize],
                    1 => ids[other][(index % 5) as usize],
                    _ => ids[other][5],
                };
                batch.push(transfer(
                    transfer_id,
                    debit,
                    credit,
                    1 + (round * 7 + index) % 50,
                ));
                transfer_id += 1;
            }
            in_transit.extend(group.execute(LedgerOperation::CreateTransfers, &batch));
        }
        if round == 5 {
            break; // leave the last round in flight
        }
        let mut acks = Vec::new();
        for (shard, group) in groups.iter_mut().enumerate() {
            let legs: Vec<RecordSlot> = in_transit
                .iter()
                .filter(|message| message.shard == shard as u32)
                .map(|message| message.record)
                .collect();
            acks.extend(group.execute(LedgerOperation::ApplyCreditLegs, &legs));
        }
        if round % 2 == 0 {
            for (shard, group) in groups.iter_mut().enumerate() {
                let records: Vec<RecordSlot> = acks
                    .iter()
                    .filter(|message| message.shard == shard as u32)
                    .map(|message| message.record)
                    .collect();
                group.execute(LedgerOperation::AckCreditLegs, &records);
            }
        }
    }
    groups
}

#[test]
fn followers_applying_prepared_batches_match_the_leader() {
    // `Group::execute` compares results, messages and digests after every batch.
    let groups = workload();
    for group in &groups {
        assert!(
            group.leader.in_flight() > 0,
            "the workload leaves legs in flight"
        );
        assert!(group.leader.credit_legs_count() > 0);
        assert!(group.leader.suspense() > 0, "the workload parks legs");
    }
}

#[test]
fn the_same_log_gives_the_same_digest_and_a_different_log_does_not() {
    let first = workload();
    let second = workload();
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.leader.digest(), b.leader.digest());
    }
    let mut altered = Group::new(0);
    let mut other = Group::new(0);
    for (index, (_, operation, batch)) in first[0].log.iter().enumerate() {
        let mut batch = batch.clone();
        if index == 3 {
            // One transfer with one more unit of user data.
            let mut changed = *batch[0].as_transfer();
            changed.user_data += 1;
            batch[0] = RecordSlot::from_transfer(&changed);
        }
        altered.execute(*operation, &batch);
        other.execute(*operation, &first[0].log[index].2);
    }
    assert_eq!(other.leader.digest(), first[0].leader.digest());
    assert_ne!(altered.leader.digest(), first[0].leader.digest());
}

#[test]
fn snapshot_restore_round_trips_and_replay_continues_identically() {
    let groups = workload();
    for group in &groups {
        let source = &group.leader;
        let mut snapshot = Vec::new();
        source.snapshot(&mut snapshot);
        let bytes_max = source.snapshot_bytes_max().expect("the ledger is bounded");
        assert!(
            snapshot.len() <= bytes_max,
            "{} > {bytes_max}",
            snapshot.len()
        );
        let mut together = Vec::new();
        assert_eq!(source.snapshot_and_digest(&mut together), source.digest());
        assert_eq!(together, snapshot);

        let shard_index = source.config().shard_index;
        let targets = [
            Ledger::new(config(shard_index)),
            Ledger::with_hash_seed(config_roomy(shard_index), 0xdead_beef),
        ];
        for mut restored in targets {
            restored.restore(&snapshot).expect("restores");
            assert_eq!(restored.digest(), source.digest());
            assert_eq!(restored.in_flight(), source.in_flight());
            assert_eq!(restored.suspense(), source.suspense());
            assert_eq!(restored.commit_op_last(), source.commit_op_last());
            let mut unacked: Vec<_> = restored.credit_legs_unacked().collect();
            let mut expected: Vec<_> = source.credit_legs_unacked().collect();
            unacked.sort_by_key(|message| message.record.as_transfer().id);
            expected.sort_by_key(|message| message.record.as_transfer().id);
            assert!(!expected.is_empty());
            assert_eq!(
                unacked, expected,
                "the restored shard resends the same legs"
            );
            let mut accounts: Vec<Account> = restored.accounts().copied().collect();
            let mut expected: Vec<Account> = source.accounts().copied().collect();
            accounts.sort_by_key(|account| account.id);
            expected.sort_by_key(|account| account.id);
            assert_eq!(accounts.len(), source.accounts_count());
            assert_eq!(accounts, expected);
            for id in 1..200 {
                assert_eq!(restored.lookup_account(id), source.lookup_account(id));
                assert_eq!(restored.lookup_transfer(id), source.lookup_transfer(id));
            }

            // Both continue from the same op with the same batch: still identical.
            let mut source_copy = Ledger::new(config(shard_index));
            source_copy.restore(&snapshot).unwrap();
            let (op, operation, batch) = group.log.last().unwrap().clone();
            let next_op = op + 1;
            let mut batch = batch;
            for slot in &mut batch {
                let mut transfer = *slot.as_transfer();
                transfer.id += 1_000_000;
                *slot = RecordSlot::from_transfer(&transfer);
            }
            let mut prepared = batch.clone();
            source_copy.prepare(operation, u64::MAX / 2, &mut prepared);
            let a = apply(&mut source_copy, next_op, operation, &prepared);
            let b = apply(&mut restored, next_op, operation, &prepared);
            assert_eq!(a, b);
            assert_eq!(restored.digest(), source_copy.digest());
        }
    }
}

/// With every table full (accounts, transfer window, legs in flight), the snapshot is
/// exactly the bound a checkpoint or state sync sizes its buffer by.
#[test]
fn a_full_ledgers_snapshot_is_exactly_snapshot_bytes_max() {
    let config = config(0);
    let mut ledger = Ledger::new(config);
    let local = ids_on(0, config.accounts_max);
    let remote = ids_on(1, 1)[0];
    let mut op = 0;
    let mut execute = |ledger: &mut Ledger, operation, mut batch: Vec<RecordSlot>| {
        op += 1;
        ledger.prepare(operation, op, &mut batch);
        let results = apply(ledger, op, operation, &batch);
        while ledger.poll_outbound().is_some() {}
        assert!(results.iter().all(|result| result.code == 0), "{results:?}");
    };
    let accounts: Vec<RecordSlot> = local
        .iter()
        .map(|&id| account(id, account_flags::ALLOW_NEGATIVE))
        .collect();
    for batch in accounts.chunks(config.batch_entries_max) {
        execute(&mut ledger, LedgerOperation::CreateAccounts, batch.to_vec());
    }
    // Cross-shard transfers never acknowledged: each fills a window slot and a leg slot.
    let transfers: Vec<RecordSlot> = (1..=config.credit_legs_in_flight_max as u128)
        .map(|id| transfer(id, local[0], remote, 1))
        .collect();
    for batch in transfers.chunks(config.batch_entries_max) {
        execute(
            &mut ledger,
            LedgerOperation::CreateTransfers,
            batch.to_vec(),
        );
    }
    assert_eq!(ledger.accounts_count(), config.accounts_max);
    assert_eq!(ledger.transfers_count(), config.transfers_max);
    assert_eq!(
        ledger.credit_legs_unacked_count(),
        config.credit_legs_in_flight_max as u64
    );
    let mut snapshot = Vec::new();
    ledger.snapshot(&mut snapshot);
    assert_eq!(Some(snapshot.len()), ledger.snapshot_bytes_max());
}

#[test]
fn restore_replaces_existing_state_and_snapshots_of_empty_ledgers_round_trip() {
    let groups = workload();
    let empty = Ledger::new(config(0));
    let mut snapshot = Vec::new();
    empty.snapshot(&mut snapshot);
    let mut full = Vec::new();
    groups[0].leader.snapshot(&mut full);
    let mut ledger = Ledger::new(config(0));
    ledger.restore(&full).unwrap();
    assert!(ledger.accounts_count() > 0);
    ledger.restore(&snapshot).unwrap();
    assert_eq!(ledger.digest(), empty.digest());
    assert_eq!(ledger.accounts_count(), 0);
}

#[test]
fn damaged_snapshots_are_rejected_and_leave_the_ledger_empty() {
    let groups = workload();
    let source = &groups[1].leader;
    let mut snapshot = Vec::new();
    source.snapshot(&mut snapshot);
    let empty_digest = Ledger::new(config(1)).digest();

    let header_bytes = 160;
    let record_bytes = 128;
    let mut cases: Vec<(&str, Vec<u8>, RestoreError)> = Vec::new();
    cases.push((
        "empty",
        Vec::new(),
        RestoreError::LengthMismatch {
            bytes: 0,
            expected: header_bytes,
        },
    ));
    let truncated = snapshot[..snapshot.len() - 1].to_vec();
    cases.push((
        "truncated",
        truncated,
        RestoreError::LengthMismatch {
            bytes: snapshot.len() - 1,
            expected: snapshot.len(),
        },
    ));
    let mut bad_magic = snapshot.clone();
    bad_magic[0] ^= 1;
    let magic = u32::from_le_bytes(bad_magic[0..4].try_into().unwrap());
    cases.push(("magic", bad_magic, RestoreError::BadMagic { magic }));
    let mut bad_version = snapshot.clone();
    bad_version[4] = 9;
    cases.push((
        "version",
        bad_version,
        RestoreError::UnsupportedVersion { version: 9 },
    ));
    let mut other_shard = snapshot.clone();
    other_shard[8] = 0;
    cases.push(("shard", other_shard, RestoreError::ConfigMismatch));
    let mut user_data = snapshot.clone();
    user_data[header_bytes + 48] ^= 0x10; // first account's user_data
    cases.push(("record bit", user_data, RestoreError::DigestMismatch));
    let mut in_flight = snapshot.clone();
    in_flight[16] = in_flight[16].wrapping_add(1); // header in_flight
    cases.push(("counter", in_flight, RestoreError::Corrupt));
    let mut duplicate = snapshot.clone();
    let (first, second) = (header_bytes, header_bytes + record_bytes);
    let copy = duplicate[first..second].to_vec();
    duplicate[second..second + record_bytes].copy_from_slice(&copy);
    cases.push(("duplicate id", duplicate, RestoreError::Corrupt));
    // Two transfers of the window swapped: its order is part of the state.
    let transfers_first = header_bytes + source.accounts_count() * record_bytes;
    let mut reordered = snapshot.clone();
    let (one, two) = (transfers_first, transfers_first + record_bytes);
    let first_transfer = reordered[one..two].to_vec();
    reordered.copy_within(two..two + record_bytes, one);
    reordered[two..two + record_bytes].copy_from_slice(&first_transfer);
    cases.push(("window order", reordered, RestoreError::Corrupt));
    let mut foreign = snapshot.clone();
    let foreign_id = ids_on(0, 1)[0];
    foreign[first..first + 16].copy_from_slice(&foreign_id.to_le_bytes());
    cases.push(("account on another shard", foreign, RestoreError::Corrupt));

    for (name, bytes, expected) in cases {
        let mut ledger = Ledger::new(config(1));
        ledger.restore(&snapshot).unwrap();
        assert_eq!(ledger.restore(&bytes), Err(expected), "{name}");
        assert_eq!(ledger.digest(), empty_digest, "{name}: left empty");
        assert_eq!(ledger.accounts_count(), 0, "{name}");
    }

    let mut small = Ledger::new(LedgerConfig {
        accounts_max: 2,
        ..config(1)
    });
    assert_eq!(
        small.restore(&snapshot),
        Err(RestoreError::CapacityExceeded)
    );
    for other_windows in [
        LedgerConfig {
            transfers_max: 2_048,
            ..config(1)
        },
        LedgerConfig {
            credit_legs_in_flight_max: 512,
            ..config(1)
        },
    ] {
        assert_eq!(
            Ledger::new(other_windows).restore(&snapshot),
            Err(RestoreError::ConfigMismatch),
            "windows decide results: a restored replica must have the same"
        );
    }
}

/// Prepares `records` on the first ledger, applies them to all as `op`, and checks they agree
/// on results, messages and digest. Returns the results and messages.
fn apply_in_lockstep(
    ledgers: &mut [&mut Ledger],
    op: u64,
    operation: LedgerOperation,
    records: &[RecordSlot],
) -> (Vec<u32>, Vec<LedgerOutbound>) {
    let mut batch = records.to_vec();
    ledgers[0].prepare(operation, op * 1_000, &mut batch);
    apply_unprepared(ledgers, op, operation, &batch)
}

#[test]
fn a_wrapped_window_restores_in_order_and_the_future_stays_identical() {
    const WINDOW: u128 = 8;
    let small = LedgerConfig {
        transfers_max: WINDOW as usize,
        credit_legs_in_flight_max: 4,
        ..config(0)
    };
    let mut source = Ledger::new(small);
    let mut follower = Ledger::with_hash_seed(small, 0x1234_5678);
    let local = ids_on(0, 3);
    let remote = ids_on(1, 1)[0];
    let (mint, payee) = (local[0], local[1]);
    let mut op = 0;
    let mut step = |ledgers: &mut [&mut Ledger], operation, records: &[RecordSlot]| {
        op += 1;
        apply_in_lockstep(ledgers, op, operation, records)
    };
    step(
        &mut [&mut source, &mut follower],
        LedgerOperation::CreateAccounts,
        &[
            account(mint, account_flags::ALLOW_NEGATIVE),
            account(payee, 0),
        ],
    );
    // 100 transfers, four of them cross-shard (as many as may be in flight): the window
    // wraps a dozen times, and the ring's start is nowhere near position 0.
    let credit_of = |id: u128| {
        if id % 10 == 3 && id < 40 {
            remote
        } else {
            payee
        }
    };
    let mut in_flight = Vec::new();
    for batch_first in (1..=100_u128).step_by(10) {
        let batch: Vec<RecordSlot> = (batch_first..batch_first + 10)
            .map(|id| transfer(id, mint, credit_of(id), id))
            .collect();
        let (_, outbound) = step(
            &mut [&mut source, &mut follower],
            LedgerOperation::CreateTransfers,
            &batch,
        );
        in_flight.extend(outbound);
    }
    assert_eq!(source.transfers_count(), WINDOW as usize);
    assert_eq!(source.credit_legs_unacked_count(), 4);

    let mut snapshot = Vec::new();
    source.snapshot(&mut snapshot);
    let mut restored = Ledger::with_hash_seed(small, 0xdead_beef);
    restored.restore(&snapshot).expect("restores");
    assert_eq!(restored.digest(), source.digest());
    let unacked: Vec<LedgerOutbound> = restored.credit_legs_unacked().collect();
    assert_eq!(unacked, in_flight[..4], "the same legs, oldest first");
    for id in 1..=100 {
        assert_eq!(
            restored.lookup_transfer(id),
            source.lookup_transfer(id),
            "{id}"
        );
    }

    // The future: retries inside and just outside the window, new transfers that evict in
    // ring order, acknowledgements, cross-shard transfers released by them.
    let ledgers = &mut [&mut source, &mut follower, &mut restored];
    let retries: Vec<RecordSlot> = (100 - WINDOW..=100)
        .rev()
        .map(|id| transfer(id, mint, credit_of(id), id))
        .collect();
    let (codes, _) = step(ledgers, LedgerOperation::CreateTransfers, &retries[..8]);
    assert_eq!(codes, [1; 8], "the last eight are duplicates");
    let (codes, _) = step(ledgers, LedgerOperation::CreateTransfers, &retries[8..]);
    assert_eq!(codes, [0], "the ninth from last is new again");
    for round in 0..6_u128 {
        let batch: Vec<RecordSlot> = (0..5)
            .map(|k| {
                let id = 1_000 + round * 10 + k;
                transfer(id, mint, if k == 2 { remote } else { payee }, 1)
            })
            .chain([transfer(1_000 + round * 10 - 6, mint, payee, 1)]) // near the edge
            .collect();
        step(ledgers, LedgerOperation::CreateTransfers, &batch);
        let acks: Vec<RecordSlot> = in_flight
            .drain(..in_flight.len().min(2))
            .map(|m| m.record)
            .collect();
        step(ledgers, LedgerOperation::AckCreditLegs, &acks);
    }
}

/// Applies `records` as they are (no `prepare`: the timestamps a Byzantine leader proposed)
/// to every ledger as `op`, and checks they agree on results, messages and digest.
fn apply_unprepared(
    ledgers: &mut [&mut Ledger],
    op: u64,
    operation: LedgerOperation,
    records: &[RecordSlot],
) -> (Vec<u32>, Vec<LedgerOutbound>) {
    let mut first: Option<(Vec<RecordResult>, Vec<LedgerOutbound>)> = None;
    for ledger in ledgers.iter_mut() {
        let results = apply(ledger, op, operation, records);
        let outbound: Vec<LedgerOutbound> = std::iter::from_fn(|| ledger.poll_outbound()).collect();
        match &first {
            None => first = Some((results, outbound)),
            Some(expected) => {
                assert_eq!((&results, &outbound), (&expected.0, &expected.1), "op {op}")
            }
        }
    }
    let digest = ledgers[0].digest();
    assert!(
        ledgers.iter().all(|ledger| ledger.digest() == digest),
        "op {op}"
    );
    let (results, outbound) = first.unwrap();
    (results.iter().map(|result| result.code).collect(), outbound)
}

fn with_timestamp(record: RecordSlot, timestamp: u64) -> RecordSlot {
    let mut transfer = *record.as_transfer();
    transfer.timestamp = timestamp;
    RecordSlot::from_transfer(&transfer)
}

fn account_with_timestamp(record: RecordSlot, timestamp: u64) -> RecordSlot {
    let mut account = *record.as_account();
    account.timestamp = timestamp;
    RecordSlot::from_account(&account)
}

/// A Byzantine leader (BFT mode: backups cannot check the timestamps it assigns) proposes a
/// batch whose timestamps are equal to, below, or far below the last committed one. Every
/// replica records `max(carried, last + 1)` alike, so the window's timestamps still
/// increase and every checkpoint's snapshot restores.
#[test]
fn timestamps_a_leader_sets_out_of_order_are_recorded_in_order_and_snapshots_restore() {
    let (mut ledger, mut replica) = lockstep_pair();
    let local = ids_on(0, 2);
    let remote = ids_on(1, 1)[0];
    let (mint, payee) = (local[0], local[1]);
    let accounts = [
        account_with_timestamp(account(mint, account_flags::ALLOW_NEGATIVE), 100),
        account_with_timestamp(account(payee, 0), 101),
    ];
    let (codes, _) = apply_unprepared(
        &mut [&mut ledger, &mut replica],
        1,
        LedgerOperation::CreateAccounts,
        &accounts,
    );
    assert_eq!(codes, [0, 0]);
    // Equal to the last committed, below it, zero, zero again, ahead, equal within the
    // batch; the cross-shard one sends its leg with the recorded timestamp.
    let carried = [101, 50, 0, 0, 200, 200];
    let batch: Vec<RecordSlot> = carried
        .iter()
        .zip(1_u128..)
        .map(|(&timestamp, id)| {
            let credit = if id == 3 { remote } else { payee };
            with_timestamp(transfer(id, mint, credit, 1), timestamp)
        })
        .collect();
    let (codes, outbound) = apply_unprepared(
        &mut [&mut ledger, &mut replica],
        2,
        LedgerOperation::CreateTransfers,
        &batch,
    );
    assert_eq!(codes, [0; 6]);
    let recorded: Vec<u64> = (1..=6)
        .map(|id| ledger.lookup_transfer(id).unwrap().timestamp)
        .collect();
    assert_eq!(recorded, [102, 103, 104, 105, 200, 201]);
    assert_eq!(outbound.len(), 1);
    assert_eq!(outbound[0].record.as_transfer().timestamp, 104, "the leg's");
    // A correctly prepared batch after it is recorded as stamped.
    let mut next = vec![transfer(7, mint, payee, 1)];
    ledger.prepare(LedgerOperation::CreateTransfers, 150, &mut next);
    assert_eq!(next[0].as_transfer().timestamp, 202);
    apply_unprepared(
        &mut [&mut ledger, &mut replica],
        3,
        LedgerOperation::CreateTransfers,
        &next,
    );
    assert_eq!(ledger.lookup_transfer(7).unwrap().timestamp, 202);

    for source in [&ledger, &replica] {
        let mut snapshot = Vec::new();
        source.snapshot(&mut snapshot);
        let mut restored = Ledger::with_hash_seed(config(0), 0x1234_5678);
        assert_eq!(restored.restore(&snapshot), Ok(()));
        assert_eq!(restored.digest(), source.digest());
    }
}

/// A leader's clock (or a Byzantine leader) at `u64::MAX`: client batches, raw batches and
/// certified legs stamped from it neither overflow nor go back, and the next ones still
/// increase.
#[test]
fn a_clock_at_the_end_of_time_neither_overflows_nor_goes_back() {
    let (mut ledger, mut replica) = lockstep_pair();
    let local = ids_on(0, 2);
    let (mint, payee) = (local[0], local[1]);
    let mut accounts = vec![
        account(mint, account_flags::ALLOW_NEGATIVE),
        account(payee, 0),
    ];
    ledger.prepare(LedgerOperation::CreateAccounts, u64::MAX, &mut accounts);
    let stamped = |records: &[RecordSlot]| -> Vec<u64> {
        records
            .iter()
            .map(|record| record.as_transfer().timestamp)
            .collect()
    };
    let account_stamps: Vec<u64> = accounts
        .iter()
        .map(|record| record.as_account().timestamp)
        .collect();
    assert_eq!(account_stamps, [TIMESTAMP_MAX, TIMESTAMP_MAX + 1]);
    apply_unprepared(
        &mut [&mut ledger, &mut replica],
        1,
        LedgerOperation::CreateAccounts,
        &accounts,
    );
    // A raw batch at the end of time, then a prepared one from a clock still there.
    let raw = [
        with_timestamp(transfer(1, mint, payee, 1), u64::MAX),
        with_timestamp(transfer(2, mint, payee, 1), u64::MAX),
    ];
    apply_unprepared(
        &mut [&mut ledger, &mut replica],
        2,
        LedgerOperation::CreateTransfers,
        &raw,
    );
    let mut prepared = vec![transfer(3, mint, payee, 1), transfer(4, mint, payee, 1)];
    ledger.prepare(LedgerOperation::CreateTransfers, u64::MAX, &mut prepared);
    assert_eq!(stamped(&prepared), [TIMESTAMP_MAX + 4, TIMESTAMP_MAX + 5]);
    apply_unprepared(
        &mut [&mut ledger, &mut replica],
        3,
        LedgerOperation::CreateTransfers,
        &prepared,
    );
    let recorded: Vec<u64> = (1..=4)
        .map(|id| ledger.lookup_transfer(id).unwrap().timestamp)
        .collect();
    assert_eq!(
        recorded,
        [2, 3, 4, 5].map(|after| TIMESTAMP_MAX + after),
        "consecutive past the ceiling"
    );

    // Certified legs on the credit shard, stamped at execution from the batch's `now_ns`.
    let origin = ids_on(1, 1)[0];
    let (mut credit_shard, mut credit_replica) = lockstep_pair();
    let leg = |sequence: u64| {
        let mut leg = *transfer(100 + u128::from(sequence), origin, payee, 1).as_transfer();
        leg.flags = transfer_flags::CROSS_SHARD_CREDIT;
        leg.reserved[..8].copy_from_slice(&sequence.to_le_bytes());
        RecordSlot::from_transfer(&leg)
    };
    let mut last = 0;
    for (op, sequence) in (1..).zip([1, 2]) {
        let mut legs = [leg(sequence)];
        credit_shard.stamp_internal(LedgerOperation::ApplyCreditLegs, u64::MAX, &mut legs);
        let (codes, acks) = apply_unprepared(
            &mut [&mut credit_shard, &mut credit_replica],
            op,
            LedgerOperation::ApplyCreditLegs,
            &legs,
        );
        assert_eq!(codes, [2], "parked: the account is not there");
        let recorded = acks[0].record.as_transfer().timestamp;
        assert_eq!(recorded, legs[0].as_transfer().timestamp);
        assert!(recorded > last, "{recorded} after {last}");
        last = recorded;
    }
    assert_eq!(last, TIMESTAMP_MAX + 1);

    let mut snapshot = Vec::new();
    ledger.snapshot(&mut snapshot);
    assert_eq!(Ledger::new(config(0)).restore(&snapshot), Ok(()));
}

/// The first `count` account ids that live on `shard` (of [`SHARDS`]).
fn ids_on(shard: u32, count: usize) -> Vec<u128> {
    (1..)
        .filter(|&id| shard_of(id, SHARDS) == shard)
        .take(count)
        .collect()
}

/// Two replicas of shard 0 that must agree although their tables differ in size
/// ([`config_roomy`]) and hash seed: nothing they report may depend on table layout.
fn lockstep_pair() -> (Ledger, Ledger) {
    (
        Ledger::new(config(0)),
        Ledger::with_hash_seed(config_roomy(0), 0xdead_beef),
    )
}
