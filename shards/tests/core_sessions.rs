//! Client sessions through the shard core: a request submitted whole stays in one batch with
//! its descriptor, a retry is answered with the original results and applied once, and the
//! steady state still allocates nothing.

use std::sync::Arc;

use percore_engine::batch::BatchLimits;
use percore_engine::journal::request_descriptors;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{CreateTransferResult, RecordResult, RecordSlot, account_flags};
use percore_engine::session::{RequestDescriptor, Sessioned};
use percore_engine::state_machine::StateMachine;
use percore_shards::core::{CoreConfig, Origin, ShardCore};
use percore_shards::loadgen::{account, accounts_of_shard, transfer};
use percore_shards::metrics::ShardMetrics;

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const ENTRIES_MAX: usize = 10;
const CLIENT: u128 = 0xc1;

type Core = ShardCore<Sessioned<Ledger>>;

fn core() -> Core {
    let ledger = Ledger::new(LedgerConfig {
        shard_index: 0,
        shard_count: 1,
        accounts_max: 64,
        transfers_max: 4_096,
        credit_legs_in_flight_max: 64,
        batch_entries_max: ENTRIES_MAX,
    });
    let config = CoreConfig {
        shard: 0,
        shard_count: 1,
        transactions: 256,
        batches: 16,
        tx_ring_capacity: 256,
        batch: BatchLimits {
            entries_max: ENTRIES_MAX,
            entries_min: 1,
            linger_us_max: 0,
            ..BatchLimits::default()
        },
    };
    let machine = Sessioned::new(ledger, 8, ENTRIES_MAX);
    ShardCore::new(config, machine, Arc::new(ShardMetrics::new(0))).expect("valid config")
}

fn origin(index: u32) -> Origin {
    Origin::Local {
        connection: 0,
        generation: 1,
        index,
    }
}

/// Seals and applies everything waiting; returns the results and each batch's (records,
/// descriptors).
fn drain(
    core: &mut Core,
    now_us: &mut u64,
) -> (Vec<RecordResult>, Vec<(usize, Vec<RequestDescriptor>)>) {
    let mut results = Vec::new();
    let mut batches = Vec::new();
    while !core.is_idle() {
        *now_us += 10;
        core.observe_depth();
        if core.poll_seal(*now_us).is_some() {
            let batch = core.sealed_batch(0).expect("sealed");
            let mut requests = vec![RequestDescriptor::default(); ENTRIES_MAX];
            let count = request_descriptors(batch.requests, &mut requests).expect("whole");
            requests.truncate(count);
            batches.push((batch.records.len() / 128, requests));
            core.apply_next(|_, result| results.push(*result))
                .expect("a sealed batch");
        }
    }
    (results, batches)
}

fn transfers(ids: std::ops::Range<u128>, debit: u128, credit: u128) -> Vec<RecordSlot> {
    ids.map(|id| RecordSlot::from_transfer(&transfer(id, debit, credit, 1)))
        .collect()
}

#[test]
fn requests_stay_whole_retries_answer_the_original_and_nothing_allocates() {
    let mut core = core();
    let mut now_us = 0;
    let ids = accounts_of_shard(0, 1, 2);
    for (index, id) in ids.iter().enumerate() {
        let record = RecordSlot::from_account(&account(*id, account_flags::ALLOW_NEGATIVE));
        core.submit(
            LedgerOperation::CreateAccounts,
            &record,
            origin(index as u32),
        )
        .expect("room");
    }
    drain(&mut core, &mut now_us);

    // Three requests of 4 records into batches of at most 10: the third must not be split.
    let requests: Vec<Vec<RecordSlot>> = (0..3u128)
        .map(|r| transfers(100 + 10 * r..104 + 10 * r, ids[0], ids[1]))
        .collect();
    for (number, records) in requests.iter().enumerate() {
        core.submit_request(
            LedgerOperation::CreateTransfers,
            records,
            origin,
            CLIENT,
            number as u64 + 1,
        )
        .expect("room");
    }
    let (results, batches) = drain(&mut core, &mut now_us);
    assert_eq!(results.len(), 12);
    assert!(
        results
            .iter()
            .all(|r| r.code == CreateTransferResult::Ok as u32)
    );
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0].0, 8, "two whole requests, not ten records");
    assert_eq!(
        batches[0].1,
        [
            RequestDescriptor {
                client_id: CLIENT,
                request_number: 1,
                record_start: 0,
                record_count: 4
            },
            RequestDescriptor {
                client_id: CLIENT,
                request_number: 2,
                record_start: 4,
                record_count: 4
            },
        ]
    );
    assert_eq!(batches[1].1[0].record_start, 0);

    // The retry of request 3 (after a leader change, say): the original results (`Ok`, not
    // `Exists`), and the ledger does not see it again.
    let balance = |core: &Core| core.state_machine().inner().digest();
    let before = balance(&core);
    core.submit_request(
        LedgerOperation::CreateTransfers,
        &requests[2],
        origin,
        CLIENT,
        3,
    )
    .expect("room");
    let (results, _) = drain(&mut core, &mut now_us);
    assert!(
        results
            .iter()
            .all(|r| r.code == CreateTransferResult::Ok as u32)
    );
    let stats = core.state_machine().sessions().stats();
    assert_eq!((stats.applied, stats.replayed, stats.fallbacks), (3, 1, 0));
    // The ledger applied nothing: only its op counter moved (not in the digest's accounts).
    assert_eq!(before, balance(&core));

    // Steady state with sessions allocates nothing: new requests and retries.
    let steady: Vec<Vec<RecordSlot>> = (0..64u128)
        .map(|r| transfers(1_000 + 10 * r..1_005 + 10 * r, ids[1], ids[0]))
        .collect();
    let mut results = Vec::with_capacity(16);
    let before = allocations();
    for (k, records) in steady.iter().enumerate() {
        let number = 4 + k as u64;
        for _attempt in 0..2 {
            core.submit_request(
                LedgerOperation::CreateTransfers,
                records,
                origin,
                CLIENT,
                number,
            )
            .expect("room");
            while !core.is_idle() {
                now_us += 10;
                core.observe_depth();
                if core.poll_seal(now_us).is_some() {
                    results.clear();
                    core.apply_next(|_, result| {
                        if results.len() < results.capacity() {
                            results.push(*result);
                        }
                    })
                    .expect("a sealed batch");
                    assert!(
                        results
                            .iter()
                            .all(|r| r.code == CreateTransferResult::Ok as u32)
                    );
                }
            }
        }
    }
    assert_eq!(
        allocations(),
        before,
        "sessions allocate nothing per request"
    );
    let stats = core.state_machine().sessions().stats();
    assert_eq!((stats.applied, stats.replayed), (3 + 64, 1 + 64));
}

/// BFT mode's checks of committed bytes on shard 0 of 2. A client batch
/// (`ShardCore::check_committed`): a transfer within the shard and one whose credit account
/// lives on shard 1 both pass, and applying the crossing one emits its credit leg for
/// shard 1; a client batch holding an internal operation (credit legs) is refused as
/// `InternalUnproven` and changes nothing. A proven batch's records
/// (`ShardCore::check_internal`, `apply_internal`, for shard 1): a client operation is
/// `NotInternal`, a leg for another shard `ForeignRecord`, and a leg for this shard is
/// stamped from the batch's clock and applied (credited once).
#[test]
fn committed_batches_carry_internal_records_only_when_proven() {
    use percore_shards::core::BatchInvalid;
    let core_of = |shard: u32| {
        let ledger = Ledger::new(LedgerConfig {
            shard_index: shard,
            shard_count: 2,
            accounts_max: 64,
            transfers_max: 4_096,
            credit_legs_in_flight_max: 64,
            batch_entries_max: ENTRIES_MAX,
        });
        let config = CoreConfig {
            shard,
            shard_count: 2,
            transactions: 256,
            batches: 16,
            tx_ring_capacity: 256,
            batch: BatchLimits {
                entries_max: ENTRIES_MAX,
                entries_min: 1,
                linger_us_max: 0,
                ..BatchLimits::default()
            },
        };
        let machine = Sessioned::new(ledger, 8, ENTRIES_MAX);
        ShardCore::new(config, machine, Arc::new(ShardMetrics::new(shard))).expect("valid config")
    };
    let mut core = core_of(0);
    let mut away_core = core_of(1);
    let home = accounts_of_shard(0, 2, 2);
    let away = accounts_of_shard(1, 2, 1)[0];
    let transfers: u16 = LedgerOperation::CreateTransfers.into();
    let legs: u16 = LedgerOperation::ApplyCreditLegs.into();
    let bytes = |records: &[RecordSlot]| bytemuck::cast_slice::<RecordSlot, u8>(records).to_vec();
    let descriptor = |request_number: u64, count: u32| {
        bytemuck::bytes_of(&RequestDescriptor {
            client_id: CLIENT,
            request_number,
            record_start: 0,
            record_count: count,
        })
        .to_vec()
    };
    // Committed records carry the timestamps their leader's `prepare` assigned.
    let stamped_account = |id: u128, flags: u16, timestamp: u64| {
        let mut account = account(id, flags);
        account.timestamp = timestamp;
        RecordSlot::from_account(&account)
    };
    let stamped_transfer = |id: u128, debit: u128, credit: u128, timestamp: u64| {
        let mut transfer = transfer(id, debit, credit, 5);
        transfer.timestamp = timestamp;
        RecordSlot::from_transfer(&transfer)
    };
    // The debit account may go negative: nothing funds it.
    let accounts: Vec<RecordSlot> = home
        .iter()
        .zip(1..)
        .map(|(id, timestamp)| stamped_account(*id, account_flags::ALLOW_NEGATIVE, timestamp))
        .collect();
    let created = core.apply_committed(
        1,
        LedgerOperation::CreateAccounts.into(),
        &bytes(&accounts),
        &descriptor(1, 2),
        |_, _| {},
    );
    assert_eq!(created, Ok(2));
    let within = stamped_transfer(1, home[0], home[1], 3);
    let across = stamped_transfer(2, home[0], away, 4);
    assert_eq!(
        core.check_committed(transfers, &bytes(&[within, across]), &descriptor(2, 2)),
        Ok(2)
    );
    let digest = core.state_machine().digest();
    let refused = core.apply_committed(2, legs, &bytes(&[across]), &descriptor(2, 1), |_, _| {
        panic!("nothing is answered")
    });
    assert_eq!(refused, Err(BatchInvalid::InternalUnproven(legs)));
    assert_eq!(core.state_machine().digest(), digest, "nothing applied");
    let applied = core.apply_committed(
        2,
        transfers,
        &bytes(&[across]),
        &descriptor(2, 1),
        |_, r| {
            assert_eq!(r[0].code, CreateTransferResult::Ok as u32);
        },
    );
    assert_eq!(applied, Ok(1));
    let leg = core.poll_outbound().expect("the credit leg");
    assert_eq!(
        (leg.shard, leg.operation),
        (1, LedgerOperation::ApplyCreditLegs)
    );
    assert!(core.poll_outbound().is_none(), "one leg");
    // Shard 1 takes the leg only as internal records of a proven batch.
    let credit = stamped_account(away, 0, 1);
    let created = away_core.apply_committed(
        1,
        LedgerOperation::CreateAccounts.into(),
        &bytes(&[credit]),
        &descriptor(1, 1),
        |_, _| {},
    );
    assert_eq!(created, Ok(1));
    assert_eq!(
        away_core.check_internal(transfers, 7, &bytes(&[across])),
        Err(BatchInvalid::NotInternal(transfers))
    );
    assert_eq!(
        core.check_internal(legs, 7, &bytes(&[leg.record])),
        Err(BatchInvalid::ForeignRecord(0))
    );
    let now_ns = 1 << 50;
    assert_eq!(
        away_core.check_internal(legs, now_ns, &bytes(&[leg.record])),
        Ok(1)
    );
    let stamped: RecordSlot = bytemuck::pod_read_unaligned(away_core.checked_records(1));
    assert_eq!(
        stamped.as_transfer().timestamp,
        now_ns,
        "stamped from the batch"
    );
    assert_eq!(
        away_core.apply_internal(2, legs, now_ns, &bytes(&[leg.record])),
        Ok(1)
    );
    let ack = away_core.poll_outbound().expect("the acknowledgement");
    assert_eq!(
        (ack.shard, ack.operation),
        (0, LedgerOperation::AckCreditLegs)
    );
    let credited = away_core.state_machine().inner().lookup_account(away);
    assert_eq!(credited.map(|a| a.credits_posted), Some(5), "credited once");
}

/// A core whose clock offset is set (BFT mode: the wall-clock time its shard clock started)
/// stamps batches from offset + shard clock, so a core restarted with a later offset and its
/// clock back at 0 stamps above everything it stamped before.
#[test]
fn a_clock_offset_stamps_batches_after_those_of_a_previous_run() {
    const OFFSET_NS: u64 = 1_000_000_000_000;
    let record_timestamp = |core: &Core| {
        let batch = core.sealed_batch(0).expect("sealed");
        let record: RecordSlot = bytemuck::pod_read_unaligned(&batch.records[..128]);
        record.as_transfer().timestamp
    };
    let mut core = core();
    let ids = accounts_of_shard(0, 1, 2);
    let records = transfers(100..101, ids[0], ids[1]);
    // A first run: shard clock at 5 s, no offset.
    core.submit(LedgerOperation::CreateTransfers, &records[0], origin(0))
        .expect("room");
    core.observe_depth();
    assert!(core.poll_seal(5_000_000).is_some());
    assert_eq!(record_timestamp(&core), 5_000_000_000);
    // A restarted one: its clock starts at 0 again, the offset is the wall clock at start.
    let mut restarted = self::core();
    restarted.set_clock_offset_ns(OFFSET_NS);
    assert_eq!(restarted.timestamp_ns(7), OFFSET_NS + 7_000);
    restarted
        .submit(LedgerOperation::CreateTransfers, &records[0], origin(0))
        .expect("room");
    restarted.observe_depth();
    assert!(restarted.poll_seal(10).is_some());
    assert_eq!(record_timestamp(&restarted), OFFSET_NS + 10_000);
    assert!(record_timestamp(&restarted) > 5_000_000_000);
}
