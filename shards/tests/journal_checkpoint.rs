//! Journal checkpoints against real files, with the reference ledger as the state machine:
//! old segments and snapshots are removed as checkpoints advance, recovery from a snapshot
//! plus the journal suffix reaches the digest of a full replay, ops above the previous
//! checkpoint stay readable (below them: `OpNotReadable`), a damaged snapshot is a typed
//! error naming the file, and a torn newest superblock copy falls back to the older one.
//! The checkpoint follower takes the live ledger's checkpoints from the journal on disk, and
//! its reader stops at a damaged entry.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytemuck::Zeroable as _;
use percore_engine::journal::{
    Checkpoint, EntryMeta, parse_segment_name, parse_snapshot_name, segment_file_name,
};
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{Account, RecordResult, RecordSlot, Transfer, account_flags};
use percore_engine::state_machine::{RestoreError, StateMachine};
use percore_shards::checkpoint::{
    CheckpointFollower, FollowerConfig, FollowerError, JournalReader, SNAPSHOT_SPARE_FILE_NAME,
    SnapshotWriteBudget, Written, checkpoint_due,
};
use percore_shards::journal::{
    FsyncPolicy, Journal, JournalConfig, JournalError, JournalOptions, SUPERBLOCK_FILE_NAME,
    segments_recycled_max,
};
use percore_shards::metrics::ShardMetrics;

use support::{TempDir, run, unwritten_blocks};

const SHARD: u32 = 0;
const CLUSTER_ID: u128 = 0xC4EC_0000_0000_0000_0000_0000_0000_0001;
/// Transfers per batch; every third batch has [`RECORDS_PER_BATCH_MAX`], so that entries
/// differ in size and a reused segment's new entries do not line up with its old ones.
const RECORDS_PER_BATCH: usize = 24;
const RECORDS_PER_BATCH_MAX: usize = 100;
const BODY_BYTES_MAX: usize = RECORDS_PER_BATCH_MAX * 128;
/// Small segments: a batch is two 4 KiB sectors with its header (three for the larger
/// ones), so a segment holds about 7.
const SEGMENT_BYTES_TEST: u64 = 64 << 10;
const CHECKPOINT_INTERVAL_OPS_TEST: u64 = 8;
const ACCOUNTS: u128 = 16;
const OPS: u64 = 200;

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        shard: SHARD,
        cluster_id: CLUSTER_ID,
        segment_bytes: SEGMENT_BYTES_TEST,
        body_bytes_max: BODY_BYTES_MAX,
        fsync: FsyncPolicy::Always,
        write_buffer_bytes: 1 << 20,
    }
}

fn ledger() -> Ledger {
    Ledger::new(LedgerConfig {
        shard_index: SHARD,
        shard_count: 1,
        accounts_max: 64,
        // Small window: it wraps during the test, so snapshots hold a wrapped ring.
        transfers_max: 1_000,
        credit_legs_in_flight_max: 64,
        batch_entries_max: RECORDS_PER_BATCH_MAX,
    })
}

/// The batch of `op`: accounts first, then transfers among them.
fn batch(op: u64) -> (LedgerOperation, Vec<RecordSlot>) {
    if op == 1 {
        let accounts = (1..=ACCOUNTS)
            .map(|id| {
                let flags = if id == 1 {
                    account_flags::ALLOW_NEGATIVE
                } else {
                    0
                };
                RecordSlot::from_account(&Account {
                    id,
                    ledger: 1,
                    code: 1,
                    flags,
                    ..Account::zeroed()
                })
            })
            .collect();
        return (LedgerOperation::CreateAccounts, accounts);
    }
    let records = if op.is_multiple_of(3) {
        RECORDS_PER_BATCH_MAX
    } else {
        RECORDS_PER_BATCH
    };
    let transfers = (0..records as u64)
        .map(|index| {
            let n = op * 1000 + index;
            let debit = 1 + u128::from(n.is_multiple_of(7)) * (u128::from(n) % ACCOUNTS);
            let credit = 1 + (u128::from(n * 13 + 5) % (ACCOUNTS - 1)) + 1;
            let credit = if credit == debit {
                2 + (credit % (ACCOUNTS - 1))
            } else {
                credit
            };
            RecordSlot::from_transfer(&Transfer {
                id: u128::from(n) + 1,
                debit_account_id: debit,
                credit_account_id: credit.min(ACCOUNTS),
                amount: 1 + u128::from(n % 5),
                ledger: 1,
                code: 1,
                ..Transfer::zeroed()
            })
        })
        .collect();
    (LedgerOperation::CreateTransfers, transfers)
}

fn apply(ledger: &mut Ledger, op: u64, operation: LedgerOperation, records: &[RecordSlot]) {
    let mut results = vec![RecordResult::zeroed(); records.len()];
    ledger.apply(op, operation, records, &mut results);
    while ledger.poll_outbound().is_some() {}
}

fn replay(ledger: &mut Ledger, op: u64, operation: u16, body: &[u8]) {
    let operation = LedgerOperation::try_from(operation).expect("ledger operation");
    let records: Vec<RecordSlot> = body
        .chunks_exact(128)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    apply(ledger, op, operation, &records);
}

/// Journals op `op` (the batch of `op`, prepared by `ledger`), commits it and applies it.
async fn append_and_apply(journal: &mut Journal, ledger: &mut Ledger, op: u64) {
    let (operation, mut records) = batch(op);
    ledger.prepare(operation, op * 1_000, &mut records);
    let meta = EntryMeta {
        shard: SHARD,
        view: 0,
        op,
        operation: operation.into(),
        entry_count: records.len() as u32,
        record_bytes: 128,
        request_count: 0,
    };
    journal
        .stage(meta, bytemuck::cast_slice(&records))
        .expect("stage");
    journal.commit().await.expect("commit");
    apply(ledger, op, operation, &records);
}

/// Opens `dir`, restoring its checkpoint into a fresh ledger and replaying the rest.
async fn recover(dir: &Path) -> Result<(Journal, Ledger, u64), JournalError> {
    let ledger = std::cell::RefCell::new(ledger());
    let (journal, recovered) = Journal::open_checkpointed(
        config(dir),
        JournalOptions::default(),
        |meta, bytes| {
            let mut ledger = ledger.borrow_mut();
            ledger.restore(bytes)?;
            if ledger.digest() != meta.digest {
                return Err(RestoreError::DigestMismatch);
            }
            Ok(())
        },
        |entry| {
            replay(
                &mut ledger.borrow_mut(),
                entry.meta.op,
                entry.meta.operation,
                entry.body,
            )
        },
    )
    .await?;
    Ok((journal, ledger.into_inner(), recovered.checkpoint_op))
}

fn files(dir: &Path) -> (Vec<u64>, Vec<u64>) {
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        segments.extend(parse_segment_name(&name));
        snapshots.extend(parse_snapshot_name(&name));
    }
    segments.sort_unstable();
    snapshots.sort_unstable();
    (segments, snapshots)
}

/// Writes ops `1..=OPS` to a checkpointed journal in `dir_checkpointed` (a checkpoint every
/// `CHECKPOINT_INTERVAL_OPS_TEST`, nothing held back for peers) and, identically, to a
/// journal in `dir_full` that never checkpoints. Returns the live ledger's digest.
async fn write_both(dir_checkpointed: &Path, dir_full: &Path) -> [u8; 32] {
    let (mut journal, _) = Journal::open(config(dir_checkpointed), |_| {})
        .await
        .expect("create");
    let (mut full, _) = Journal::open(config(dir_full), |_| {})
        .await
        .expect("create");
    let mut live = ledger();
    let mut snapshot = Vec::new();
    for op in 1..=OPS {
        let (operation, mut records) = batch(op);
        live.prepare(operation, op * 1_000, &mut records);
        let body: &[u8] = bytemuck::cast_slice(&records);
        let meta = EntryMeta {
            shard: SHARD,
            view: 0,
            op,
            operation: operation.into(),
            entry_count: records.len() as u32,
            record_bytes: 128,
            request_count: 0,
        };
        for journal in [&mut journal, &mut full] {
            journal.stage(meta, body).expect("stage");
            journal.commit().await.expect("commit");
        }
        apply(&mut live, op, operation, &records);
        if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
            snapshot.clear();
            live.snapshot(&mut snapshot);
            let done = journal
                .checkpoint(op, &snapshot, live.digest(), u64::MAX)
                .await
                .expect("checkpoint");
            assert_eq!(done.checkpoint.op, op);
            let previous = op.saturating_sub(CHECKPOINT_INTERVAL_OPS_TEST);
            assert!(
                done.op_first <= previous + 1,
                "ops above the previous checkpoint stay"
            );
            assert_eq!(journal.op_first(), done.op_first);
            // Only two snapshots, ever.
            let (_, snapshots) = files(dir_checkpointed);
            let expected: Vec<u64> = [previous, op].into_iter().filter(|&o| o > 0).collect();
            assert_eq!(snapshots, expected, "at op {op}");
        }
    }
    journal.write_superblock().await.expect("superblock");
    journal.close().await.expect("close");
    full.close().await.expect("close");
    live.digest()
}

#[test]
fn checkpoints_remove_old_segments_and_recover_to_the_full_replay_digest() {
    let temp = TempDir::new("journal-checkpoint", "recover");
    let dir = temp.0.join("checkpointed");
    let dir_full = temp.0.join("full");
    run(move || async move {
        let digest_live = write_both(&dir, &dir_full).await;

        let (segments_full, _) = files(&dir_full);
        let (segments, snapshots) = files(&dir);
        assert_eq!(segments_full.first(), Some(&0));
        assert!(segments_full.len() > 10, "{segments_full:?}");
        assert!(
            segments[0] > 0 && segments.len() < segments_full.len() / 3,
            "old segments removed: {segments:?} of {segments_full:?}"
        );
        assert_eq!(snapshots, vec![OPS - CHECKPOINT_INTERVAL_OPS_TEST, OPS]);

        // A full replay of the journal that kept everything.
        let mut ledger_full = ledger();
        let (full, recovered_full) = Journal::open(config(&dir_full), |entry| {
            replay(
                &mut ledger_full,
                entry.meta.op,
                entry.meta.operation,
                entry.body,
            )
        })
        .await
        .expect("full replay");
        assert_eq!(
            (recovered_full.op_last, recovered_full.checkpoint_op),
            (OPS, 0)
        );
        assert_eq!(ledger_full.digest(), digest_live);
        full.close().await.expect("close");

        // Snapshot plus suffix.
        let (mut journal, ledger_recovered, checkpoint_op) = recover(&dir).await.expect("recover");
        assert_eq!(checkpoint_op, OPS);
        assert_eq!(ledger_recovered.digest(), digest_live);
        assert_eq!(journal.op_durable(), OPS);

        // Ops above the previous checkpoint are still served; below, they are not.
        let previous = OPS - CHECKPOINT_INTERVAL_OPS_TEST;
        assert_eq!(journal.op_first(), previous + 1);
        let mut entry = Vec::new();
        journal
            .read_entry(previous + 1, &mut entry)
            .await
            .expect("readable");
        journal.read_entry(OPS, &mut entry).await.expect("readable");
        match journal.read_entry(previous, &mut entry).await {
            Err(JournalError::OpNotReadable { op, op_first, .. }) => {
                assert_eq!((op, op_first), (previous, previous + 1));
            }
            other => panic!("expected OpNotReadable, got {other:?}"),
        }
        journal.close().await.expect("close");
    });
}

#[test]
fn journal_continues_after_recovering_from_a_checkpoint() {
    let temp = TempDir::new("journal-checkpoint", "continue");
    let dir = temp.0.join("checkpointed");
    let dir_full = temp.0.join("full");
    run(move || async move {
        write_both(&dir, &dir_full).await;
        let (mut journal, mut ledger, _) = recover(&dir).await.expect("recover");
        // The chain head after a checkpoint-based recovery is the last entry's checksum:
        // appending continues, and a second recovery sees it.
        for op in OPS + 1..=OPS + 12 {
            append_and_apply(&mut journal, &mut ledger, op).await;
            if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
                let mut snapshot = Vec::new();
                ledger.snapshot(&mut snapshot);
                journal
                    .checkpoint(op, &snapshot, ledger.digest(), u64::MAX)
                    .await
                    .expect("checkpoint");
            }
        }
        journal.close().await.expect("close");
        let (journal, recovered, checkpoint_op) = recover(&dir).await.expect("recover again");
        assert_eq!(checkpoint_op, 208);
        assert_eq!(journal.op_durable(), OPS + 12);
        assert_eq!(recovered.digest(), ledger.digest());
        journal.close().await.expect("close");
    });
}

#[test]
fn peers_that_lag_hold_back_segment_removal() {
    let temp = TempDir::new("journal-checkpoint", "retain");
    let dir = temp.0.join("journal");
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let mut live = ledger();
        let mut snapshot = Vec::new();
        let retain_from_op = 20;
        for op in 1..=OPS {
            append_and_apply(&mut journal, &mut live, op).await;
            if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
                snapshot.clear();
                live.snapshot(&mut snapshot);
                let done = journal
                    .checkpoint(op, &snapshot, live.digest(), retain_from_op)
                    .await
                    .expect("checkpoint");
                assert!(done.op_first <= retain_from_op);
            }
        }
        // A peer at op 19 can still be repaired from op 20 on.
        let mut entry = Vec::new();
        journal
            .read_entry(retain_from_op, &mut entry)
            .await
            .expect("kept for the peer");
        let (segments, snapshots) = files(&dir);
        assert!(
            segments[0] > 0,
            "segments before the peer's op are removed: {segments:?}"
        );
        assert_eq!(snapshots.len(), 2);
        journal.close().await.expect("close");
    });
}

#[test]
fn a_damaged_snapshot_is_a_typed_error_naming_the_file() {
    let temp = TempDir::new("journal-checkpoint", "damaged");
    let dir = temp.0.join("checkpointed");
    let dir_full = temp.0.join("full");
    run(move || async move {
        write_both(&dir, &dir_full).await;
        let path = dir.join(percore_engine::journal::snapshot_file_name(OPS));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[percore_engine::journal::SNAPSHOT_HEADER_BYTES + 100] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        match recover(&dir).await {
            Err(error @ JournalError::Snapshot { .. }) => {
                let JournalError::Snapshot {
                    path: named,
                    error: reason,
                } = &error
                else {
                    unreachable!()
                };
                assert_eq!(named, &path);
                assert_eq!(
                    *reason,
                    percore_engine::journal::SnapshotError::BodyChecksum
                );
                assert!(error.to_string().contains("snapshot-"), "{error}");
            }
            other => panic!("expected Snapshot, got {:?}", other.map(|(_, _, op)| op)),
        }
        // A missing snapshot is an I/O error naming it, never a silent full replay.
        std::fs::remove_file(&path).unwrap();
        match recover(&dir).await {
            Err(JournalError::Io { path: named, .. }) => assert_eq!(named, path),
            other => panic!("expected Io, got {:?}", other.map(|(_, _, op)| op)),
        }
    });
}

#[test]
fn a_torn_newest_superblock_copy_falls_back_to_the_older_one() {
    let temp = TempDir::new("journal-checkpoint", "torn-superblock");
    let dir = temp.0.join("checkpointed");
    let dir_full = temp.0.join("full");
    run(move || async move {
        let digest_live = write_both(&dir, &dir_full).await;
        // The last write (at close) has the highest sequence; find its slot and tear it.
        let (journal, _, _) = recover(&dir).await.expect("recover");
        let sequence = journal.superblock().sequence;
        journal.close().await.expect("close");
        let path = dir.join(SUPERBLOCK_FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let slot = (sequence % 2) as usize * 4096;
        bytes[slot + 2048..slot + 4096].fill(0xA5); // half the sector is garbage
        std::fs::write(&path, &bytes).unwrap();

        let (journal, ledger, checkpoint_op) = recover(&dir).await.expect("older copy");
        assert_eq!(journal.superblock().sequence, sequence - 1);
        assert!(checkpoint_op >= OPS - CHECKPOINT_INTERVAL_OPS_TEST);
        assert_eq!(journal.op_durable(), OPS);
        assert_eq!(ledger.digest(), digest_live);
        journal.close().await.expect("close");
    });
}

/// How long a checkpoint stalls the batcher at the node's default ledger size (the CLI's
/// `--accounts-max 100000 --transfers-max 1000000 --credit-legs-max 65536`) with the transfer
/// window full (the largest snapshot): the capture (snapshot + digest, on the shard's core)
/// and the write (snapshot file, superblock). Run:
/// `cargo test --release -p percore-shards --test journal_checkpoint -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release with --nocapture"]
fn checkpoint_stall_at_the_default_ledger_size() {
    let temp = TempDir::new("journal-checkpoint", "stall");
    let dir = temp.0.join("journal");
    run(move || async move {
        const BATCH: usize = 1_000;
        let mut ledger = Ledger::new(LedgerConfig {
            shard_index: 0,
            shard_count: 1,
            accounts_max: 100_000,
            transfers_max: 1_000_000,
            credit_legs_in_flight_max: 65_536,
            batch_entries_max: BATCH,
        });
        let mut op = 0;
        let mut records = Vec::with_capacity(BATCH);
        for chunk in 0..100u128 {
            records.clear();
            records.extend((0..BATCH as u128).map(|i| {
                RecordSlot::from_account(&Account {
                    id: 1 + chunk * BATCH as u128 + i,
                    ledger: 1,
                    code: 1,
                    flags: account_flags::ALLOW_NEGATIVE,
                    ..Account::zeroed()
                })
            }));
            op += 1;
            ledger.prepare(LedgerOperation::CreateAccounts, op * 1_000, &mut records);
            apply(&mut ledger, op, LedgerOperation::CreateAccounts, &records);
        }
        for chunk in 0..1_000u128 {
            records.clear();
            records.extend((0..BATCH as u128).map(|i| {
                let n = chunk * BATCH as u128 + i;
                RecordSlot::from_transfer(&Transfer {
                    id: n + 1,
                    debit_account_id: 1 + n % 100_000,
                    credit_account_id: 1 + (n * 7 + 1) % 100_000,
                    amount: 1,
                    ledger: 1,
                    code: 1,
                    ..Transfer::zeroed()
                })
            }));
            op += 1;
            ledger.prepare(LedgerOperation::CreateTransfers, op * 1_000, &mut records);
            apply(&mut ledger, op, LedgerOperation::CreateTransfers, &records);
        }

        let mut config = config(&dir);
        config.segment_bytes = 64 << 20;
        let (mut journal, _) = Journal::open(config, |_| {}).await.expect("create");
        let meta = EntryMeta {
            shard: SHARD,
            view: 0,
            op: 1,
            operation: LedgerOperation::CreateTransfers.into(),
            entry_count: 1,
            record_bytes: 128,
            request_count: 0,
        };
        let mut snapshot = Vec::new();
        let mut runs = Vec::new();
        for round in 1..=5u64 {
            meta_stage(&mut journal, EntryMeta { op: round, ..meta }).await;
            let started = std::time::Instant::now();
            snapshot.clear();
            ledger.snapshot(&mut snapshot);
            let digest = ledger.digest();
            let capture = started.elapsed();
            let started_write = std::time::Instant::now();
            journal
                .checkpoint(round, &snapshot, digest, u64::MAX)
                .await
                .expect("checkpoint");
            let write = started_write.elapsed();
            runs.push((capture, write));
            println!(
                "checkpoint {round}: {} MiB snapshot, capture {capture:?}, write {write:?}, stall {:?}",
                snapshot.len() >> 20,
                capture + write
            );
        }
        journal.close().await.expect("close");
        runs.sort_by_key(|(capture, write)| *capture + *write);
        let (capture, write) = runs[runs.len() / 2];
        println!(
            "median stall: capture {capture:?} + write {write:?} = {:?}",
            capture + write
        );
    });
}

async fn meta_stage(journal: &mut Journal, meta: EntryMeta) {
    journal.stage(meta, &[0u8; 128]).expect("stage");
    journal.commit().await.expect("commit");
}

/// Installs `written` and checks it is the live ledger's checkpoint at its op.
async fn install_checked(
    journal: &mut Journal,
    follower: &CheckpointFollower,
    written: Written,
    digests: &BTreeMap<u64, [u8; 32]>,
    installed: &mut Vec<u64>,
) {
    let op = written.meta.op;
    assert!(
        checkpoint_due(op, SHARD as usize, 1, CHECKPOINT_INTERVAL_OPS_TEST),
        "op {op}"
    );
    assert_eq!(
        Some(&written.meta.digest),
        digests.get(&op),
        "the follower's state at op {op} is the live ledger's"
    );
    let done = journal
        .checkpoint_install(&written.meta, written.position_after, u64::MAX)
        .await
        .expect("install");
    assert_eq!(done.checkpoint.op, op);
    assert_eq!((done.segments_removed, done.snapshots_removed), (0, 0));
    follower.installed(op, done.segments_below, done.snapshot_stale_op);
    installed.push(op);
}

/// The follower of the journal in `dir`, from its superblock's checkpoint; `driven`: at the
/// ops the shard asks for (BFT mode), else at the ops `checkpoint_due` names.
fn follower_spawn(
    dir: &Path,
    journal: &Journal,
    metrics: &Arc<ShardMetrics>,
    driven: bool,
    recycle_max: usize,
) -> CheckpointFollower {
    follower_spawn_with(dir, journal, metrics, driven, recycle_max, ledger)
}

/// [`follower_spawn`] with the follower's state machine built by `make`.
fn follower_spawn_with(
    dir: &Path,
    journal: &Journal,
    metrics: &Arc<ShardMetrics>,
    driven: bool,
    recycle_max: usize,
    make: impl FnOnce() -> Ledger + Send + 'static,
) -> CheckpointFollower {
    let follower_config = FollowerConfig {
        shard: SHARD as usize,
        shard_count: 1,
        dir: dir.to_path_buf(),
        cluster_id: CLUSTER_ID,
        body_bytes_max: BODY_BYTES_MAX,
        interval_ops: CHECKPOINT_INTERVAL_OPS_TEST,
        write_budget: Arc::new(SnapshotWriteBudget::new(
            percore_shards::checkpoint::SNAPSHOT_WRITE_MIB_PER_S_DEFAULT << 20,
        )),
        driven,
        cores: Vec::new(),
        recycle_max,
    };
    CheckpointFollower::spawn(
        follower_config,
        *journal.superblock(),
        0,
        metrics.clone(),
        make,
    )
    .expect("spawn")
}

/// `started` (what a shard waits for before it reports ready) turns true only once the
/// follower has built its state machine, and says why when the follower never gets there.
#[test]
fn a_follower_has_started_once_its_state_machine_is_built() {
    let temp = TempDir::new("journal-checkpoint", "started");
    let dir = temp.0.clone();
    run(move || async move {
        let (journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let metrics = Arc::new(ShardMetrics::new(SHARD));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let follower = follower_spawn_with(&dir, &journal, &metrics, false, 0, move || {
            released.recv().expect("released");
            ledger()
        });
        glommio::timer::sleep(Duration::from_millis(50)).await;
        assert_eq!(follower.started(), Ok(false), "still building its ledger");
        release.send(()).expect("follower waits");
        let deadline = Instant::now() + Duration::from_secs(30);
        while follower.started() != Ok(true) {
            assert!(Instant::now() < deadline, "{:?}", follower.started());
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        drop(follower);
        // A factory that panics ends the thread: `started` says so instead of waiting.
        let follower = follower_spawn_with(&dir, &journal, &metrics, false, 0, || {
            panic!("no ledger (this panic is the test's)")
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let error = loop {
            match follower.started() {
                Err(error) => break error,
                Ok(started) => assert!(!started, "started without a ledger"),
            }
            assert!(Instant::now() < deadline, "never said it stopped");
            glommio::timer::sleep(Duration::from_millis(1)).await;
        };
        assert!(error.contains("ended before it started"), "{error}");
        journal.close().await.expect("close");
    });
}

/// The checkpoint follower (a second ledger on its own thread, following the journal on
/// disk) takes the checkpoints the live ledger would: every snapshot's digest is the live
/// ledger's at that op, whether the shard waits for it or runs ahead (then it skips
/// checkpoint ops); installing them removes old segments and snapshots; recovery from the
/// last one reaches the live digest.
#[test]
fn the_checkpoint_follower_takes_the_live_ledgers_checkpoints() {
    let temp = TempDir::new("journal-checkpoint", "follower");
    let dir = temp.0.clone();
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let metrics = Arc::new(ShardMetrics::new(SHARD));
        let mut follower = follower_spawn(&dir, &journal, &metrics, false, 0);
        let mut live = ledger();
        let mut digests = BTreeMap::new();
        let mut installed = Vec::new();
        for op in 1..=OPS {
            append_and_apply(&mut journal, &mut live, op).await;
            if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
                digests.insert(op, live.digest());
            }
            follower.note_applied(op);
            // Every 40 ops the shard waits until a checkpoint at this op is installed;
            // in between it runs ahead and installs whatever is ready.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(written) = follower.poll().expect("follower runs") {
                    install_checked(&mut journal, &follower, written, &digests, &mut installed)
                        .await;
                }
                if !op.is_multiple_of(40) || installed.last() == Some(&op) {
                    break;
                }
                assert!(Instant::now() < deadline, "no checkpoint at op {op}");
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(installed.last(), Some(&OPS));
        assert!(installed.len() >= 5, "{installed:?}");
        assert!(installed.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(metrics.checkpoint_follower_op.load(Ordering::Relaxed), OPS);
        // The follower removes the released files after each install it sees.
        let previous = installed[installed.len() - 2];
        let deadline = Instant::now() + Duration::from_secs(30);
        while files(&dir).1 != vec![previous, OPS] {
            assert!(
                Instant::now() < deadline,
                "released files stay: {:?}",
                files(&dir)
            );
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        let (segments, snapshots) = files(&dir);
        assert!(segments[0] > 0, "old segments removed: {segments:?}");
        assert_eq!(snapshots, vec![previous, OPS]);
        // From the third install on, each released snapshot was kept as the spare, and the
        // next write overwrote it: so every snapshot from the fourth on was written over an
        // older one's blocks, the last of them the one recovery reads below.
        let kept = metrics
            .checkpoint_snapshots_kept_total
            .load(Ordering::Relaxed);
        assert_eq!(kept, installed.len() as u64 - 2, "{installed:?}");
        assert!(
            dir.join(SNAPSHOT_SPARE_FILE_NAME).exists(),
            "the last one kept"
        );
        drop(follower);
        journal.write_superblock().await.expect("superblock");
        journal.close().await.expect("close");
        // A crash part-way through releasing a segment leaves it shrunk (and whatever its
        // first bytes were): below the checkpoint, recovery never reads it.
        std::fs::write(dir.join(segment_file_name(0)), [0xAB; 4096]).expect("plant");
        let (mut journal, mut live, checkpoint_op) = recover(&dir).await.expect("recover");
        assert_eq!(checkpoint_op, OPS);
        assert_eq!(live.digest(), *digests.get(&OPS).expect("digest"));
        // The next checkpoint's release removes it with the segments it released.
        let mut follower = follower_spawn(&dir, &journal, &metrics, false, 0);
        let mut installed = Vec::new();
        let op_last = OPS + 2 * CHECKPOINT_INTERVAL_OPS_TEST;
        for op in OPS + 1..=op_last {
            append_and_apply(&mut journal, &mut live, op).await;
            if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
                digests.insert(op, live.digest());
            }
            follower.note_applied(op);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while installed.last() != Some(&op_last) {
            assert!(Instant::now() < deadline, "installed {installed:?}");
            if let Some(written) = follower.poll().expect("follower runs") {
                install_checked(&mut journal, &follower, written, &digests, &mut installed).await;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        while files(&dir).0.first() == Some(&0) {
            assert!(
                Instant::now() < deadline,
                "the leftover stays: {:?}",
                files(&dir)
            );
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        assert!(metrics.checkpoint_release_us.load(Ordering::Relaxed) > 0);
    });
}

/// Appends `op` to a recovered journal, closes it, and checks that recovery replays it.
async fn append_and_recover(dir: &Path, mut journal: Journal, mut ledger: Ledger, op: u64) {
    append_and_apply(&mut journal, &mut ledger, op).await;
    journal.close().await.expect("close");
    let (_, recovered, _) = recover(dir).await.expect("recover");
    assert_eq!(recovered.digest(), ledger.digest());
}

/// Hands the segments the follower offers for reuse to the journal while it has room, as
/// the shard does on each turn.
fn recycled_hand_over(follower: &mut CheckpointFollower, journal: &mut Journal) {
    while journal.recycled_room() {
        let Some(segment) = follower.recycled_pop() else {
            break;
        };
        assert!(journal.recycled_add(segment));
    }
    follower.recycled_taken(journal.recycled_taken());
}

/// Released segments are reused instead of removed: roll-overs rename them into place,
/// appends overwrite their written blocks (no unwritten extent left for an `fdatasync` to
/// convert), and the bytes after the new entries, the segment's older entries, read as
/// the segment's end at recovery, which replays every op exactly, after a clean close and
/// with the newest segment reused but not yet written (a stop right after a roll-over).
#[test]
fn released_segments_are_reused_and_recovery_reads_their_stale_ends() {
    let temp = TempDir::new("journal-checkpoint", "recycle");
    let dir = temp.0.clone();
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let metrics = Arc::new(ShardMetrics::new(SHARD));
        let mut follower = follower_spawn(
            &dir,
            &journal,
            &metrics,
            false,
            segments_recycled_max(SEGMENT_BYTES_TEST),
        );
        let mut live = ledger();
        let mut digests = BTreeMap::new();
        let mut installed = Vec::new();
        let (mut newest, mut checked) = (0, [0, 0]);
        for op in 1..=OPS {
            let recycled_before = journal.switches_recycled();
            append_and_apply(&mut journal, &mut live, op).await;
            // Just after a roll-over the new segment holds one entry (at most 4 of its 16
            // blocks). A created one is unwritten after it (the control); a reused one was
            // written in its first life, all but the room its last entry did not fill then
            // (under 4 blocks).
            let segment = *files(&dir).0.last().expect("a segment");
            if segment != newest {
                newest = segment;
                let reused = journal.switches_recycled() > recycled_before;
                let unwritten = unwritten_blocks(&dir.join(segment_file_name(segment)));
                let expected = if reused { 0..4 } else { 12..16 };
                assert!(
                    expected.contains(&unwritten),
                    "segment {segment} (reused: {reused}): {unwritten} unwritten blocks"
                );
                checked[usize::from(reused)] += 1;
            }
            if op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) {
                digests.insert(op, live.digest());
            }
            follower.note_applied(op);
            // The shard waits for each checkpoint, so that releases keep pace with use.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                recycled_hand_over(&mut follower, &mut journal);
                if let Some(written) = follower.poll().expect("follower runs") {
                    install_checked(&mut journal, &follower, written, &digests, &mut installed)
                        .await;
                }
                if !op.is_multiple_of(CHECKPOINT_INTERVAL_OPS_TEST) || installed.last() == Some(&op)
                {
                    break;
                }
                assert!(Instant::now() < deadline, "no checkpoint at op {op}");
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        let recycled = journal.switches_recycled();
        assert!(
            recycled >= 10,
            "roll-overs onto released segments: {recycled}"
        );
        assert_eq!(checked[1], recycled);
        assert!(checked[0] > 0, "no created segment to compare with");
        // Offered and not yet taken: never more than the bound.
        let offered = metrics
            .checkpoint_segments_recycled_total
            .load(Ordering::Relaxed);
        assert!(offered >= recycled);
        let waiting = offered - journal.recycled_taken();
        assert!(waiting <= segments_recycled_max(SEGMENT_BYTES_TEST) as u64);
        drop(follower);
        journal.write_superblock().await.expect("superblock");
        journal.close().await.expect("close");
        let (mut journal, recovered, _) = recover(&dir).await.expect("recover");
        assert_eq!(recovered.digest(), live.digest());
        // Every op still journaled reads back in order: the walk from one entry to the next
        // crosses each reused segment's stale end into the next segment (as serving a peer
        // or resending after a restart does).
        let mut entry = Vec::new();
        for op in journal.op_first()..=journal.op_durable() {
            journal
                .read_entry(op, &mut entry)
                .await
                .unwrap_or_else(|error| panic!("op {op}: {error}"));
        }
        // A reused segment renamed into place with nothing written to it yet: the end of
        // the journal is the segment before; recovery removes it, or (where the segment
        // before ended cleanly) cuts it to nothing.
        let (segments, _) = files(&dir);
        let oldest = segments[0];
        let next = segments.last().expect("a segment") + 1;
        std::fs::rename(
            dir.join(segment_file_name(oldest)),
            dir.join(segment_file_name(next)),
        )
        .expect("rename");
        journal.close().await.expect("close");
        let (journal, again, _) = recover(&dir).await.expect("recover");
        assert_eq!(again.digest(), live.digest());
        if let Ok(bytes) = std::fs::read(dir.join(segment_file_name(next))) {
            assert!(
                bytes.iter().all(|&byte| byte == 0),
                "segment {next} keeps no entry"
            );
        }
        // The journal goes on from there.
        append_and_recover(&dir, journal, recovered, OPS + 1).await;
    });
}

/// Recovery reads a segment's end before stale bytes (an older entry, as a reused segment
/// holds after its new entries) as the boundary when the next segment carries on, and
/// replays every op; a stale entry that is not followed by the continuation is still the
/// end of the journal.
#[test]
fn an_older_entry_after_a_segments_end_is_its_boundary() {
    const WRITTEN_OPS: u64 = 40;
    let temp = TempDir::new("journal-checkpoint", "stale-end");
    let dir = temp.0.clone();
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let mut live = ledger();
        for op in 1..=WRITTEN_OPS {
            append_and_apply(&mut journal, &mut live, op).await;
        }
        journal.close().await.expect("close");
        // Op 1's entry, one sector: what a reused segment would still hold.
        let first = std::fs::read(dir.join(segment_file_name(0))).expect("segment 0");
        let stale = &first[..4096];
        assert_eq!(
            percore_engine::journal::decode_entry(stale, BODY_BYTES_MAX)
                .expect("op 1")
                .padded_bytes,
            4096
        );
        // Paste it after the entries of every segment, the last one too (whose end is the
        // journal's: a torn tail there, cut at open).
        let (segments, _) = files(&dir);
        let mut pasted = 0;
        for &segment in &segments {
            let path = dir.join(segment_file_name(segment));
            let mut bytes = std::fs::read(&path).expect("segment");
            let mut end = 0;
            while let Ok(entry) =
                percore_engine::journal::decode_entry(&bytes[end..], BODY_BYTES_MAX)
            {
                end += entry.padded_bytes;
            }
            if end < bytes.len() {
                bytes[end..end + 4096].copy_from_slice(stale);
                std::fs::write(&path, &bytes).expect("paste");
                pasted += 1;
            }
        }
        assert!(
            pasted >= 2,
            "segments with room at the end: {pasted} of {segments:?}"
        );
        let (mut journal, recovered, _) = recover(&dir).await.expect("recover");
        assert_eq!(recovered.digest(), live.digest());
        // Every op reads back, in order (the cursor stepping from a segment's last entry
        // over the stale one into the next segment) and each alone (walking headers from
        // the nearest indexed op, backwards): the stale op 1 where the next op would start
        // is not taken for corruption. Without the read path's look at the next segment
        // this fails with "journal corrupt at op 9 (segment 0, ...): found op 1".
        let mut entry = Vec::new();
        let ops = journal.op_first()..=journal.op_durable();
        assert_eq!(*ops.end(), WRITTEN_OPS);
        for op in ops.clone().chain(ops.clone().rev()) {
            journal
                .read_entry(op, &mut entry)
                .await
                .unwrap_or_else(|error| panic!("op {op}: {error}"));
            let read = percore_engine::journal::decode_entry(&entry, BODY_BYTES_MAX)
                .expect("a verified entry");
            assert_eq!(read.meta.op, op);
        }
        append_and_recover(&dir, journal, recovered, WRITTEN_OPS + 1).await;
    });
}

/// A driven follower (BFT mode) checkpoints exactly the ops the shard asks for, whatever
/// `checkpoint_due` says, each with the live ledger's digest at that op.
#[test]
fn a_driven_follower_checkpoints_only_the_ops_asked_for() {
    let temp = TempDir::new("journal-checkpoint", "driven");
    let dir = temp.0.clone();
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let metrics = Arc::new(ShardMetrics::new(SHARD));
        let mut follower = follower_spawn(&dir, &journal, &metrics, true, 0);
        let asked = [7, 23, 50];
        let mut live = ledger();
        let mut installed = Vec::new();
        for op in 1..=60 {
            append_and_apply(&mut journal, &mut live, op).await;
            if asked.contains(&op) {
                follower.request(op);
            }
            let digest = live.digest();
            follower.note_applied(op);
            let deadline = Instant::now() + Duration::from_secs(30);
            // Each asked op is written before the shard moves on; no other op ever is.
            loop {
                if let Some(written) = follower.poll().expect("follower runs") {
                    let at = written.meta.op;
                    assert_eq!(at, op, "only the ops asked for");
                    assert_eq!(written.meta.digest, digest, "the live ledger's state");
                    let done = journal
                        .checkpoint_install(&written.meta, written.position_after, u64::MAX)
                        .await
                        .expect("install");
                    follower.installed(at, done.segments_below, done.snapshot_stale_op);
                    installed.push(at);
                }
                if !asked.contains(&op) || installed.last() == Some(&op) {
                    break;
                }
                assert!(Instant::now() < deadline, "no checkpoint at op {op}");
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
        // Ops 51..=60 were never asked for: nothing more comes.
        glommio::timer::sleep(Duration::from_millis(50)).await;
        assert!(follower.poll().expect("follower runs").is_none());
        assert_eq!(installed, asked);
        drop(follower);
        journal.close().await.expect("close");
    });
}

/// The follower's reader returns every entry in order across segment boundaries, with the
/// bytes written; a damaged entry is an error naming its op (after the retries), never
/// skipped.
#[test]
fn the_journal_reader_crosses_segments_and_stops_at_a_damaged_entry() {
    let temp = TempDir::new("journal-checkpoint", "reader");
    let dir = temp.0.clone();
    let bodies = {
        let dir = dir.clone();
        let (sender, receiver) = std::sync::mpsc::channel();
        run(move || async move {
            let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
            let mut bodies = Vec::new();
            for op in 1..=OPS {
                let (operation, records) = batch(op);
                let meta = EntryMeta {
                    shard: SHARD,
                    view: 0,
                    op,
                    operation: operation.into(),
                    entry_count: records.len() as u32,
                    record_bytes: 128,
                    request_count: 0,
                };
                let body: &[u8] = bytemuck::cast_slice(&records);
                journal.stage(meta, body).expect("stage");
                journal.commit().await.expect("commit");
                bodies.push(body.to_vec());
            }
            journal.close().await.expect("close");
            sender.send(bodies).expect("send");
        });
        receiver.recv().expect("bodies")
    };
    let mut reader = JournalReader::new(&dir, BODY_BYTES_MAX, Checkpoint::ROOT);
    let mut positions = Vec::new();
    for op in 1..=OPS {
        let (meta, body) = reader.next_entry().expect("entry");
        assert_eq!(meta.op, op);
        assert_eq!(body, &bodies[op as usize - 1][..], "op {op}");
        positions.push(reader.position());
    }
    let segments: std::collections::BTreeSet<u64> = positions.iter().map(|p| p.0).collect();
    assert!(segments.len() > 3, "crossed segments: {segments:?}");

    // Damage the body of the first entry of the third segment.
    let third = *segments.iter().nth(2).expect("three segments");
    let op_damaged = 1 + positions.iter().position(|p| p.0 == third).expect("entry") as u64;
    let path = dir.join(percore_engine::journal::segment_file_name(third));
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[percore_engine::journal::ENTRY_HEADER_BYTES + 10] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let mut reader = JournalReader::new(&dir, BODY_BYTES_MAX, Checkpoint::ROOT);
    for op in 1..op_damaged {
        assert_eq!(reader.next_entry().expect("entry").0.op, op);
    }
    match reader.next_entry() {
        Err(FollowerError::EntryMissing { op, .. }) => assert_eq!(op, op_damaged),
        other => panic!("expected EntryMissing at op {op_damaged}, got {other:?}"),
    }
}

/// A journal that a state sync started at a peer's checkpoint: `install_synced_checkpoint`
/// switches a journal that is behind to the checkpoint, which it then holds no entry after.
/// Recovery restores the checkpoint's state and stands at its op; `percore inspect` names
/// that op and the checkpoint's checksum as the head of the hash chain (a journal with no
/// entry after its start has no segment line to read a head from); the next entry chains
/// on, and the head moves to it.
#[test]
fn a_journal_started_at_a_synced_checkpoint_recovers_and_inspects_to_its_head() {
    const SYNCED_OP: u64 = 16;
    let temp = TempDir::new("journal-checkpoint", "synced");
    let peer_dir = temp.0.join("peer");
    let data_dir = temp.0.join("node");
    let dir = data_dir.join("shard-0");
    std::fs::create_dir_all(&dir).expect("shard dir");
    run(move || async move {
        // The peer's journal and checkpoint at SYNCED_OP.
        let (mut peer, _) = Journal::open(config(&peer_dir), |_| {})
            .await
            .expect("create");
        let mut live = ledger();
        for op in 1..=SYNCED_OP {
            append_and_apply(&mut peer, &mut live, op).await;
        }
        let mut snapshot = Vec::new();
        live.snapshot(&mut snapshot);
        let done = peer
            .checkpoint(SYNCED_OP, &snapshot, live.digest(), u64::MAX)
            .await
            .expect("checkpoint");
        peer.close().await.expect("close");
        let meta = percore_engine::journal::SnapshotMeta {
            cluster_id: CLUSTER_ID,
            shard: SHARD,
            op: SYNCED_OP,
            snapshot_bytes: snapshot.len() as u64,
            checkpoint_checksum: done.checkpoint.checksum,
            snapshot_checksum: percore_engine::journal::journal_checksum(&snapshot),
            digest: live.digest(),
        };
        // This replica holds ops 1..=4 and installs the peer's checkpoint.
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let mut behind = ledger();
        for op in 1..=4 {
            append_and_apply(&mut journal, &mut behind, op).await;
        }
        journal
            .install_synced_checkpoint(&meta, &snapshot)
            .await
            .expect("sync installed");
        let (journal, recovered, checkpoint_op) = recover(&dir).await.expect("recovers");
        assert_eq!(checkpoint_op, SYNCED_OP);
        assert_eq!(recovered.digest(), live.digest());
        assert_eq!(journal.op_durable(), SYNCED_OP);
        journal.close().await.expect("close");
        let inspect = percore_shards::inspect::InspectConfig {
            data_dir: data_dir.clone(),
            body_bytes_max: BODY_BYTES_MAX,
            replay: None,
            session_clients_max: 0,
        };
        let head = |text: &str| {
            text.lines()
                .find_map(|line| line.trim_start().strip_prefix("head: op "))
                .map(str::to_string)
        };
        let (text, problem) = percore_shards::inspect::run(&inspect).expect("inspect");
        assert!(!problem, "{text}");
        assert_eq!(
            head(&text),
            Some(format!(
                "{SYNCED_OP}, checksum {:032x}",
                done.checkpoint.checksum
            )),
            "{text}"
        );
        // The next op chains on the checkpoint and becomes the head.
        let (mut journal, mut ledger, _) = recover(&dir).await.expect("recovers");
        append_and_apply(&mut journal, &mut ledger, SYNCED_OP + 1).await;
        journal.close().await.expect("close");
        let (text, problem) = percore_shards::inspect::run(&inspect).expect("inspect");
        assert!(!problem, "{text}");
        assert!(
            head(&text).is_some_and(|head| head.starts_with(&format!("{}, ", SYNCED_OP + 1))),
            "{text}"
        );
        // The first checkpoint after the sync keeps the synced one's snapshot: the
        // superblock names it as the previous checkpoint (it was removed as stale, and an
        // older superblock copy, or a peer asking for it, then found no file).
        let (mut journal, mut ledger, _) = recover(&dir).await.expect("recovers");
        for op in SYNCED_OP + 2..=SYNCED_OP + 4 {
            append_and_apply(&mut journal, &mut ledger, op).await;
        }
        let mut next = Vec::new();
        ledger.snapshot(&mut next);
        let done = journal
            .checkpoint(SYNCED_OP + 4, &next, ledger.digest(), u64::MAX)
            .await
            .expect("checkpoint after the sync");
        assert_eq!(
            done.snapshots_removed, 0,
            "the synced snapshot is still named"
        );
        assert_eq!(journal.superblock().checkpoint_previous.op, SYNCED_OP);
        let synced_file = dir.join(percore_engine::journal::snapshot_file_name(SYNCED_OP));
        assert!(synced_file.exists(), "{} removed", synced_file.display());
        journal.close().await.expect("close");
    });
}
