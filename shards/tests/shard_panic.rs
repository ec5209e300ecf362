//! An embedder's state machine that panics, in a binary that unwinds on a panic (as tests
//! do; the workspace's release profile aborts): the node stops, and `Node::shutdown` returns
//! the panicked shard's error instead of waiting for that shard to drain for ever.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use percore_engine::checksum::Digest256;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{RecordResult, RecordSlot, account_flags};
use percore_engine::state_machine::{Outbound, RestoreError, StateMachine};
use percore_shards::ingest::Submitter;
use percore_shards::loadgen::{account, accounts_of_shard, transfer};
use percore_shards::runtime::{Node, NodeConfig, NodeError};

const SHARDS: usize = 2;
/// The shard whose state machine panics.
const SHARD_POISONED: usize = 1;
/// A transfer of this amount makes the state machine panic when it applies it.
const POISON_AMOUNT: u128 = 0xDEAD;
/// Longest any step may take: a hang fails the test instead of stalling it.
const WAIT_S: u64 = 30;

/// The reference ledger, except that applying a transfer of [`POISON_AMOUNT`] panics: a
/// bug in an embedder's state machine.
struct Poisoned(Ledger);

impl StateMachine for Poisoned {
    type Operation = LedgerOperation;
    type Record = RecordSlot;
    type Result = RecordResult;

    fn client_operation(code: u16) -> Option<LedgerOperation> {
        Ledger::client_operation(code)
    }

    fn route(operation: LedgerOperation, record: &RecordSlot, shard_count: u32) -> u32 {
        Ledger::route(operation, record, shard_count)
    }

    fn crosses_shards(operation: LedgerOperation, record: &RecordSlot, shard_count: u32) -> bool {
        Ledger::crosses_shards(operation, record, shard_count)
    }

    fn prepare(&mut self, operation: LedgerOperation, now_ns: u64, records: &mut [RecordSlot]) {
        self.0.prepare(operation, now_ns, records);
    }

    fn apply(
        &mut self,
        op: u64,
        operation: LedgerOperation,
        records: &[RecordSlot],
        results: &mut [RecordResult],
    ) {
        let poisoned = operation == LedgerOperation::CreateTransfers
            && records
                .iter()
                .any(|record| record.as_transfer().amount == POISON_AMOUNT);
        assert!(!poisoned, "a poisoned transfer at op {op}");
        self.0.apply(op, operation, records, results);
    }

    fn poll_outbound(&mut self) -> Option<Outbound<LedgerOperation, RecordSlot>> {
        self.0.poll_outbound()
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        self.0.snapshot(out);
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        self.0.restore(bytes)
    }

    fn digest(&self) -> Digest256 {
        self.0.digest()
    }
}

/// Two shards sharing the machine's cores, small pools.
fn node_config() -> NodeConfig {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    NodeConfig {
        cores: (0..SHARDS).map(|shard| shard % online).collect(),
        client_port_base: 0,
        transactions: 1_024,
        batches: 16,
        allow_shared_cores: true,
        ..NodeConfig::default()
    }
}

/// Shard `shard`'s poisoned ledger.
fn poisoned(shard: usize, batch_entries_max: usize) -> Poisoned {
    Poisoned(Ledger::new(LedgerConfig {
        shard_index: shard as u32,
        shard_count: SHARDS as u32,
        accounts_max: 64,
        transfers_max: 1_024,
        credit_legs_in_flight_max: 64,
        batch_entries_max,
    }))
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(WAIT_S)
}

/// Submits one record and waits for its result; `None` if it never came.
fn submit_and_wait(
    submitter: &Submitter<Poisoned>,
    operation: LedgerOperation,
    record: RecordSlot,
    wait: Duration,
) -> Option<RecordResult> {
    let ticket = submitter
        .submit_wait(operation, record, deadline())
        .unwrap_or_else(|error| panic!("submit refused: {error}"));
    ticket.wait(Instant::now() + wait).ok()
}

#[test]
fn a_shard_that_panics_stops_the_node_and_shutdown_reports_it() {
    let config = node_config();
    let batch_entries_max = config.batch.entries_max;
    let node = Node::start(config, move |shard, _| poisoned(shard, batch_entries_max))
        .expect("node starts");
    let submitter = node.submitter();
    let accounts = accounts_of_shard(SHARD_POISONED, SHARDS, 2);
    for id in &accounts {
        let record = RecordSlot::from_account(&account(*id, account_flags::ALLOW_NEGATIVE));
        let created = submit_and_wait(
            &submitter,
            LedgerOperation::CreateAccounts,
            record,
            Duration::from_secs(WAIT_S),
        );
        assert_eq!(created.map(|result| result.code), Some(0), "account {id}");
    }
    let moved = |id: u128, amount: u128, wait: Duration| {
        let record = RecordSlot::from_transfer(&transfer(id, accounts[0], accounts[1], amount));
        submit_and_wait(&submitter, LedgerOperation::CreateTransfers, record, wait)
    };
    let applied = moved(1, 5, Duration::from_secs(WAIT_S));
    assert_eq!(
        applied.map(|result| result.code),
        Some(0),
        "a healthy shard"
    );
    // The shard's thread dies applying it: no result ever comes.
    assert_eq!(moved(2, POISON_AMOUNT, Duration::from_secs(2)), None);
    drop(submitter);
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(node.shutdown().map(|reports| reports.len()));
    });
    let stopped = receiver
        .recv_timeout(Duration::from_secs(WAIT_S))
        .expect("shutdown returned: the other shard did not wait for the dead one");
    match stopped {
        Err(NodeError::Executor { shard, .. }) => assert_eq!(shard, SHARD_POISONED),
        other => panic!("shutdown should name the panicked shard: {other:?}"),
    }
}

/// It used to start without that shard (its address left as 0.0.0.0:0): the wait for the
/// shards' ready messages ended when every sender was gone.
#[test]
fn a_state_machine_constructor_that_panics_fails_the_start() {
    let config = node_config();
    let batch_entries_max = config.batch.entries_max;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Node::start(config, move |shard, _| {
            assert_ne!(
                shard, SHARD_POISONED,
                "a state machine that cannot be built"
            );
            poisoned(shard, batch_entries_max)
        });
        let _ = sender.send(started.map(|_| ()));
    });
    let started = receiver
        .recv_timeout(Duration::from_secs(WAIT_S))
        .expect("start returned");
    match started {
        Err(NodeError::Executor { shard, .. }) => assert_eq!(shard, SHARD_POISONED),
        other => panic!("the start should fail naming the shard: {other:?}"),
    }
}
