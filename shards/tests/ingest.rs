//! Many application threads submitting into a real node through `Node::submitter`.
//!
//! A two-shard in-memory ledger node, run twice: with one lane (the default on two cores)
//! and with four (each thread in its lane's ring and slot share, the shards draining the
//! lanes in turn). Accounts created through the submitter; then 256
//! producer threads that submit and wait one transfer at a time, 1,024 that keep several
//! transfers in flight each, and 256 that submit all theirs as one batch
//! (`Submitter::submit_batch_wait`). Every transfer has a unique id and must be applied exactly once
//! (`Ok`, never `Exists`), each producer's transfers to one shard must be applied in the
//! order it submitted them (their ledger timestamps increase), and the ledger must balance.
//! Two last phases count a producer thread's allocations per transaction, one record per
//! call and 64 per `submit_batch_wait`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{RecordResult, RecordSlot, account_flags, shard_of};
use percore_shards::ingest::{IngestConfig, SubmitError, Submitter, TicketError};
use percore_shards::loadgen::{account, accounts_of_shard, transfer};
use percore_shards::runtime::{Node, NodeConfig, ShardReport};

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const SHARDS: usize = 2;
const ACCOUNTS_PER_SHARD: usize = 16;
/// Transfers each producer submits.
const TRANSFERS_PER_PRODUCER: usize = 8;
/// Transfers a pipelined producer keeps in flight.
const PIPELINE_DEPTH: usize = 4;
/// Completion slots: enough for every pipelined producer's window and then some.
const INGEST_SLOTS: usize = 2_048;
const INGEST_RING_CAPACITY: usize = 512;
/// Records per `submit_batch_wait` call of the batched allocation-counting phase.
const BATCH_RECORDS: usize = 64;
/// Transfers of the allocation-counting phase (after a warm-up of the same size).
const ALLOCATION_TRANSFERS: usize = 2_000;
/// No single wait may take this long: a lost wake-up fails the test instead of hanging it.
const WAIT_S: u64 = 30;
const PRODUCER_STACK_BYTES: usize = 256 << 10;

fn start_node(lanes: usize) -> Node<Ledger> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = NodeConfig {
        cores: (0..SHARDS).map(|shard| shard % online).collect(),
        client_port_base: 0,
        transactions: 4_096,
        batches: 64,
        allow_shared_cores: true,
        ingest: IngestConfig {
            ring_capacity: INGEST_RING_CAPACITY,
            slots: INGEST_SLOTS,
            lanes,
        },
        ..NodeConfig::default()
    };
    let ledger = LedgerConfig {
        shard_index: 0,
        shard_count: SHARDS as u32,
        accounts_max: 1_024,
        transfers_max: 65_536,
        credit_legs_in_flight_max: 65_536,
        batch_entries_max: config.batch.entries_max,
    };
    Node::start(config, move |shard, _| {
        Ledger::new(LedgerConfig {
            shard_index: shard as u32,
            ..ledger
        })
    })
    .expect("node starts")
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(WAIT_S)
}

/// Submits one record (waiting for room) and waits for its result.
fn submit_and_wait(
    submitter: &Submitter<Ledger>,
    operation: LedgerOperation,
    record: RecordSlot,
) -> RecordResult {
    let ticket = submitter
        .submit_wait(operation, record, deadline())
        .unwrap_or_else(|error| panic!("submit refused: {error}"));
    ticket
        .wait(deadline())
        .unwrap_or_else(|error| panic!("no result: {error}"))
}

/// Every account allows negative balances, so any transfer between them succeeds.
fn create_accounts(submitter: &Submitter<Ledger>) -> Vec<Vec<u128>> {
    let owned: Vec<Vec<u128>> = (0..SHARDS)
        .map(|shard| accounts_of_shard(shard, SHARDS, ACCOUNTS_PER_SHARD))
        .collect();
    for id in owned.iter().flatten() {
        let record = RecordSlot::from_account(&account(*id, account_flags::ALLOW_NEGATIVE));
        let result = submit_and_wait(submitter, LedgerOperation::CreateAccounts, record);
        assert_eq!(result.code, 0, "account {id} created");
    }
    owned
}

/// The `seq`-th transfer of `producer` in `phase`: unique id; the debit account alternates
/// between the shards so every producer feeds both; credits are spread over both shards.
fn producer_transfer(
    phase: u128,
    producer: usize,
    seq: usize,
    accounts: &[Vec<u128>],
) -> RecordSlot {
    let id = (phase << 96) | ((producer as u128) << 32) | (seq as u128 + 1);
    let debit_shard = seq % SHARDS;
    let debit = accounts[debit_shard][producer % ACCOUNTS_PER_SHARD];
    let credit_shard = (producer + seq / SHARDS) % SHARDS;
    // Never the debit account: a different index on the same shard.
    let credit_index = (producer + 1 + seq % (ACCOUNTS_PER_SHARD - 1)) % ACCOUNTS_PER_SHARD;
    let credit = accounts[credit_shard][credit_index];
    RecordSlot::from_transfer(&transfer(id, debit, credit, 1))
}

/// How a producer submits its transfers.
#[derive(Clone, Copy)]
enum Submits {
    /// One at a time, at most this many in flight.
    Pipelined(usize),
    /// All of them in one `submit_batch_wait`.
    Batch,
}

/// Runs `producers` threads, each submitting its transfers as `submits` says, and checks
/// every result is `Ok`.
fn run_producers(
    submitter: &Submitter<Ledger>,
    accounts: &[Vec<u128>],
    phase: u128,
    producers: usize,
    submits: Submits,
) {
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..producers)
            .map(|producer| {
                let submitter = submitter.clone();
                std::thread::Builder::new()
                    .stack_size(PRODUCER_STACK_BYTES)
                    .spawn_scoped(scope, move || match submits {
                        Submits::Pipelined(depth) => {
                            produce(&submitter, accounts, phase, producer, depth);
                        }
                        Submits::Batch => produce_batch(&submitter, accounts, phase, producer),
                    })
                    .expect("spawn a producer")
            })
            .collect();
        for thread in threads {
            thread.join().expect("producer finished");
        }
    });
}

fn produce(
    submitter: &Submitter<Ledger>,
    accounts: &[Vec<u128>],
    phase: u128,
    producer: usize,
    depth: usize,
) {
    let mut in_flight = VecDeque::with_capacity(depth);
    let check = |result: Result<RecordResult, TicketError<'_, Ledger>>| {
        let result = result.unwrap_or_else(|error| panic!("producer {producer}: {error}"));
        assert_eq!(
            result.code, 0,
            "producer {producer}: transfer applied once, Ok"
        );
    };
    for seq in 0..TRANSFERS_PER_PRODUCER {
        if in_flight.len() == depth {
            let ticket: percore_shards::ingest::Ticket<'_, Ledger> =
                in_flight.pop_front().expect("a full window");
            check(ticket.wait(deadline()));
        }
        let record = producer_transfer(phase, producer, seq, accounts);
        let ticket = submitter
            .submit_wait(LedgerOperation::CreateTransfers, record, deadline())
            .unwrap_or_else(|error| panic!("producer {producer}: submit refused: {error}"));
        in_flight.push_back(ticket);
    }
    while let Some(ticket) = in_flight.pop_front() {
        check(ticket.wait(deadline()));
    }
}

/// Submits all of a producer's transfers with `submit_batch_wait` (a record refused for
/// want of room waits, then the batch goes on), then waits for every result.
fn produce_batch(
    submitter: &Submitter<Ledger>,
    accounts: &[Vec<u128>],
    phase: u128,
    producer: usize,
) {
    let records: Vec<RecordSlot> = (0..TRANSFERS_PER_PRODUCER)
        .map(|seq| producer_transfer(phase, producer, seq, accounts))
        .collect();
    let mut tickets = Vec::with_capacity(records.len());
    submitter
        .submit_batch_wait(
            LedgerOperation::CreateTransfers,
            &records,
            deadline(),
            |ticket| tickets.push(ticket),
        )
        .unwrap_or_else(|error| panic!("producer {producer}: batch refused: {error}"));
    assert_eq!(tickets.len(), TRANSFERS_PER_PRODUCER);
    for ticket in tickets {
        let result = ticket
            .wait(deadline())
            .unwrap_or_else(|error| panic!("producer {producer}: {error}"));
        assert_eq!(
            result.code, 0,
            "producer {producer}: transfer applied once, Ok"
        );
    }
}

/// Each producer's transfers to one debit shard carry increasing timestamps: applied in
/// submission order.
fn check_order(
    reports: &[ShardReport<Ledger>],
    accounts: &[Vec<u128>],
    phase: u128,
    producers: usize,
) {
    for producer in 0..producers {
        let mut last = [0u64; SHARDS];
        for seq in 0..TRANSFERS_PER_PRODUCER {
            let record = producer_transfer(phase, producer, seq, accounts);
            let sent = record.as_transfer();
            let shard = shard_of(sent.debit_account_id, SHARDS as u32) as usize;
            let stored = reports[shard]
                .state_machine
                .lookup_transfer(sent.id)
                .unwrap_or_else(|| panic!("phase {phase} producer {producer} seq {seq} applied"));
            assert!(
                stored.timestamp > last[shard],
                "phase {phase} producer {producer}: seq {seq} applied out of order on shard {shard}"
            );
            last[shard] = stored.timestamp;
        }
    }
}

#[test]
fn many_threads_submit_exactly_once_in_order() {
    for lanes in [1, 4] {
        exactly_once_in_order(lanes);
    }
}

fn exactly_once_in_order(lanes: usize) {
    let started = Instant::now();
    let node = start_node(lanes);
    let submitter = node.submitter();
    assert_eq!(submitter.ingress().lanes(), lanes);
    let accounts = create_accounts(&submitter);

    // Phase 1: 256 threads, one transfer at a time (submit, wait, next).
    run_producers(&submitter, &accounts, 1, 256, Submits::Pipelined(1));
    // Phase 2: 1,024 threads, each with several transfers in flight.
    run_producers(
        &submitter,
        &accounts,
        2,
        1_024,
        Submits::Pipelined(PIPELINE_DEPTH),
    );
    // Phase 6 (5 is refused after the stop): 256 threads, each submitting all its
    // transfers as one batch.
    run_producers(&submitter, &accounts, 6, 256, Submits::Batch);

    // Phase 3: one thread's allocations per transaction, after a warm-up.
    let allocation_transfers = |phase: u128| {
        for seq in 0..ALLOCATION_TRANSFERS {
            let record = producer_transfer(phase, 0, seq, &accounts);
            let result = submit_and_wait(&submitter, LedgerOperation::CreateTransfers, record);
            assert_eq!(result.code, 0);
        }
    };
    allocation_transfers(3);
    let before = allocations();
    allocation_transfers(4);
    let per_transfer = (allocations() - before) as f64 / ALLOCATION_TRANSFERS as f64;
    // The ingest path itself allocates nothing; waking a parked shard goes through glommio's
    // foreign-wake queue, which allocates one block per 31 wakes (here the shard parks
    // between transfers, so nearly every transfer wakes it).
    assert!(
        per_transfer <= 1.0 / 16.0,
        "{per_transfer} allocations per transfer on the producer thread"
    );
    // Phases 7 and 8: the same through `submit_batch_wait`, 64 records a call, the records
    // and the tickets' vector made before counting.
    let batch_transfers = |phase: u128| {
        let records: Vec<RecordSlot> = (0..ALLOCATION_TRANSFERS)
            .map(|seq| producer_transfer(phase, 0, seq, &accounts))
            .collect();
        let mut tickets = Vec::with_capacity(BATCH_RECORDS);
        let before = allocations();
        for batch in records.chunks(BATCH_RECORDS) {
            submitter
                .submit_batch_wait(LedgerOperation::CreateTransfers, batch, deadline(), |t| {
                    tickets.push(t);
                })
                .unwrap_or_else(|error| panic!("batch refused: {error}"));
            for ticket in tickets.drain(..) {
                let result = ticket.wait(deadline()).expect("a result");
                assert_eq!(result.code, 0);
            }
        }
        (allocations() - before) as f64 / ALLOCATION_TRANSFERS as f64
    };
    batch_transfers(7);
    let per_batched_transfer = batch_transfers(8);
    assert!(
        per_batched_transfer <= 1.0 / 16.0,
        "{per_batched_transfer} allocations per batched transfer on the producer thread"
    );

    assert_eq!(
        submitter.ingress().slots_free(),
        INGEST_SLOTS,
        "every completion slot returned"
    );
    let reports = node.shutdown().expect("node stops");
    let transfers: usize = reports
        .iter()
        .map(|r| r.state_machine.transfers_count())
        .sum();
    let expected = (256 + 1_024 + 256) * TRANSFERS_PER_PRODUCER + 4 * ALLOCATION_TRANSFERS;
    assert_eq!(transfers, expected, "every transfer stored exactly once");
    check_order(&reports, &accounts, 1, 256);
    check_order(&reports, &accounts, 2, 1_024);
    check_order(&reports, &accounts, 6, 256);
    let conservation: i128 = reports
        .iter()
        .map(|r| r.state_machine.conservation_sum())
        .sum();
    assert_eq!(conservation, 0, "balances conserved");
    for report in &reports {
        assert_eq!(report.state_machine.credit_legs_unacked_count(), 0);
    }
    // A stopped node refuses new work with a typed error.
    let record = producer_transfer(5, 0, 0, &accounts);
    assert!(matches!(
        submitter.submit(LedgerOperation::CreateTransfers, record),
        Err(SubmitError::Stopped(_))
    ));
    // Waiting does not wait for the deadline: stopping is an answer at once.
    let record = producer_transfer(5, 0, 1, &accounts);
    let asked = Instant::now();
    assert!(matches!(
        submitter.submit_wait(LedgerOperation::CreateTransfers, record, deadline()),
        Err(SubmitError::Stopped(_))
    ));
    assert!(
        asked.elapsed() < Duration::from_secs(WAIT_S / 2),
        "refused at once"
    );
    eprintln!(
        "ingest test, {lanes} lane(s): {transfers} transfers, {per_transfer:.4} allocations per transfer ({per_batched_transfer:.4} batched), {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
