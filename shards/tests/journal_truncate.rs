//! What a view change needs from the shard journal, against real files
//! (`docs/protocol.md` 6.4, 7.4, 8): truncating a divergent suffix so that it never comes
//! back after a crash, appending a different history after it, the superblock's `view`,
//! `log_view` and `commit_max` (persisted, never regressing), and recovery that replays only
//! committed ops while keeping the rest readable.
//!
//! Every test runs inside a glommio `LocalExecutor` with a small `io_memory` (the box's
//! `RLIMIT_MEMLOCK` is 8 MiB) on a fresh directory under the system temporary directory,
//! removed at the end. A "crash" drops the journal without `close`.

mod support;

use std::panic::AssertUnwindSafe;
use std::path::Path;

use futures_lite::FutureExt as _;
use percore_engine::journal::{
    ENTRY_HEADER_BYTES, EntryMeta, JOURNAL_CHAIN_ROOT, JournalChecksum, SNAPSHOT_HEADER_BYTES,
    SnapshotMeta, Tail, decode_entry, encode_entry, encode_snapshot_header, entry_bytes_padded,
    journal_checksum, parse_segment_name, snapshot_file_name,
};
use percore_shards::journal::{
    FsyncPolicy, Journal, JournalConfig, JournalError, JournalOptions, Recovered,
};

use support::{TempDir, run_small as run};

const SHARD: u32 = 2;
const CLUSTER_ID: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0099;
const RECORD_BYTES: u32 = 128;
const BODY_BYTES_MAX: usize = 16 * 1024;
/// Small segments (16 sectors): entries of one to five sectors roll over every few ops.
const SEGMENT_BYTES_TEST: u64 = 64 << 10;
const WRITE_BUFFER_BYTES_TEST: usize = 128 << 10;
/// Ops of the first history in most tests.
const OPS_FIRST_HISTORY: u64 = 40;
/// Salts of the two histories: same ops, different bodies, so different chains.
const SALT_OLD: u8 = 1;
const SALT_NEW: u8 = 2;

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        shard: SHARD,
        cluster_id: CLUSTER_ID,
        segment_bytes: SEGMENT_BYTES_TEST,
        body_bytes_max: BODY_BYTES_MAX,
        fsync: FsyncPolicy::Always,
        write_buffer_bytes: WRITE_BUFFER_BYTES_TEST,
    }
}

/// Opens (recovers) the journal; returns it, what recovery found, and the replayed entries
/// (header + body, unpadded, re-encoded from what `replay` saw).
async fn open(
    dir: &Path,
    options: JournalOptions,
) -> Result<(Journal, Recovered, Vec<(u64, Vec<u8>)>), JournalError> {
    let mut replayed = Vec::new();
    let (journal, recovered) = Journal::open_with_options(config(dir), options, |entry| {
        let (meta, body) = (entry.meta, entry.body);
        let bytes = encoded_with(meta, body, entry.checksum_previous);
        assert_eq!(
            decode_entry(&bytes, BODY_BYTES_MAX)
                .expect("valid")
                .checksum,
            entry.checksum
        );
        replayed.push((meta.op, bytes));
    })
    .await?;
    Ok((journal, recovered, replayed))
}

/// Records in op's batch: varied, so entries take one to five sectors.
fn records_for(op: u64, salt: u8) -> u32 {
    [1, 7, 31, 0, 3, 120, 64, 31, 2, 100][((op + u64::from(salt)) % 10) as usize]
}

/// A deterministic batch for `op`; `salt` makes another history (other sizes and bytes).
fn batch(op: u64, salt: u8) -> (EntryMeta, Vec<u8>) {
    let records = records_for(op, salt);
    let body = (0..records as usize * RECORD_BYTES as usize)
        .map(|index| {
            (index as u64)
                .wrapping_mul(29)
                .wrapping_add(op * 11 + u64::from(salt) * 101) as u8
        })
        .collect();
    let meta = EntryMeta {
        shard: SHARD,
        view: u64::from(salt),
        op,
        operation: 1,
        entry_count: records,
        record_bytes: RECORD_BYTES,
        request_count: 0,
    };
    (meta, body)
}

fn encoded_with(meta: EntryMeta, body: &[u8], checksum_previous: JournalChecksum) -> Vec<u8> {
    let mut buf = vec![0u8; entry_bytes_padded(body.len())];
    encode_entry(&mut buf, &meta, body, checksum_previous);
    buf.truncate(ENTRY_HEADER_BYTES + body.len());
    buf
}

/// The encoded entries of ops `ops` of history `salt`, chained from `checksum_previous`.
fn history(
    ops: std::ops::RangeInclusive<u64>,
    salt: u8,
    mut checksum_previous: JournalChecksum,
) -> Vec<Vec<u8>> {
    ops.map(|op| {
        let (meta, body) = batch(op, salt);
        let bytes = encoded_with(meta, &body, checksum_previous);
        checksum_previous = decode_entry(&bytes, BODY_BYTES_MAX).unwrap().checksum;
        bytes
    })
    .collect()
}

fn checksum_of(entry: &[u8]) -> JournalChecksum {
    decode_entry(entry, BODY_BYTES_MAX).expect("valid").checksum
}

/// Appends `entries` (the next ops) with `stage_encoded`, committing every `per_commit` and
/// whenever the buffer is full.
async fn append(journal: &mut Journal, entries: &[Vec<u8>], per_commit: usize) {
    for (index, entry) in entries.iter().enumerate() {
        if journal.staged_bytes() + entry_bytes_padded(entry.len() - ENTRY_HEADER_BYTES)
            > journal.write_buffer_bytes()
        {
            journal.commit().await.expect("commit");
        }
        let checksum = journal.stage_encoded(entry).expect("stage_encoded");
        assert_eq!(checksum, checksum_of(entry));
        if (index + 1) % per_commit == 0 {
            journal.commit().await.expect("commit");
        }
    }
    journal.commit().await.expect("commit");
}

/// Reads ops `1..=log.len()` back and compares them with `log` (op `i + 1` at `log[i]`),
/// in order and then backwards (the cursor, then the index).
async fn read_all(journal: &mut Journal, log: &[Vec<u8>]) {
    let mut out = Vec::new();
    let ops = 1..=log.len() as u64;
    for op in ops.clone().chain(ops.rev()) {
        journal
            .read_entry(op, &mut out)
            .await
            .unwrap_or_else(|error| panic!("read op {op}: {error}"));
        assert_eq!(out, log[op as usize - 1], "op {op}");
    }
}

async fn assert_not_readable(journal: &mut Journal, op: u64) {
    let mut out = Vec::new();
    assert!(
        matches!(
            journal.read_entry(op, &mut out).await,
            Err(JournalError::OpNotReadable { op: found, .. }) if found == op
        ),
        "op {op} must not be readable"
    );
    assert!(out.is_empty());
}

/// Where each entry lies, by the writer's rule: back to back, rolling to the next segment
/// when an entry would cross the end. Returns (segment, offset, padded bytes) per op.
fn positions(log: &[Vec<u8>]) -> Vec<(u64, u64, u64)> {
    let (mut segment, mut offset) = (0, 0);
    log.iter()
        .map(|entry| {
            let padded = entry_bytes_padded(entry.len() - ENTRY_HEADER_BYTES) as u64;
            if offset + padded > SEGMENT_BYTES_TEST {
                segment += 1;
                offset = 0;
            }
            let at = (segment, offset, padded);
            offset += padded;
            at
        })
        .collect()
}

/// Segment indexes on disk, ascending.
fn segments(dir: &Path) -> Vec<u64> {
    let mut found: Vec<u64> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|entry| {
            let name = entry.expect("entry").file_name();
            parse_segment_name(name.to_str()?)
        })
        .collect();
    found.sort_unstable();
    found
}

/// The ways a suffix can be cut, each picked from the layout of the first history.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// Entry `op` ends inside its segment, entry `op + 1` follows in the same segment.
    MiddleOfSegment,
    /// Entry `op` fills its segment exactly: `op + 1` starts the next one.
    SegmentFilled,
    /// Entry `op + 1` did not fit after entry `op` and starts the next segment.
    SegmentRolledOver,
    /// The head is at least three segments after entry `op`.
    AcrossSegments,
    /// Everything.
    ToZero,
    /// `op` is the head: nothing is removed.
    AtHead,
}

/// The op to truncate after for `shape`, in a journal holding `old`.
fn op_for(shape: Shape, old: &[Vec<u8>]) -> u64 {
    let at = positions(old);
    let segment_last = at.last().unwrap().0;
    let op_of = |index: usize| index as u64 + 1;
    let found = match shape {
        Shape::MiddleOfSegment => (0..at.len() - 1)
            .find(|&i| at[i + 1].0 == at[i].0 && at[i].0 < segment_last && at[i].1 > 0),
        Shape::SegmentFilled => {
            (0..at.len() - 1).find(|&i| at[i].1 + at[i].2 == SEGMENT_BYTES_TEST)
        }
        Shape::SegmentRolledOver => (0..at.len() - 1)
            .find(|&i| at[i + 1].0 == at[i].0 + 1 && at[i].1 + at[i].2 < SEGMENT_BYTES_TEST),
        Shape::AcrossSegments => (0..at.len() - 1).find(|&i| at[i].0 + 3 <= segment_last),
        Shape::ToZero => return 0,
        Shape::AtHead => return old.len() as u64,
    };
    op_of(found.unwrap_or_else(|| panic!("layout has no {shape:?}")))
}

/// Truncates a journal of the old history after the op `shape` picks and checks the result:
/// the returned chain value, what is readable, the files, the superblock, and that the bytes
/// after the new end read as zero. Returns the op.
async fn truncate_checked(journal: &mut Journal, dir: &Path, old: &[Vec<u8>], shape: Shape) -> u64 {
    let op = op_for(shape, old);
    // The superblock claims the whole old history: truncation must lower it.
    journal.write_superblock().await.expect("superblock");
    assert_eq!(journal.superblock().op_durable, old.len() as u64);

    let checksum = journal.truncate_after(op).await.expect("truncate");
    let expected = match op {
        0 => JOURNAL_CHAIN_ROOT,
        op => checksum_of(&old[op as usize - 1]),
    };
    assert_eq!(checksum, expected, "{shape:?}");
    assert_eq!(journal.checksum_staged(), expected);
    assert_eq!(
        (journal.op_durable(), journal.op_staged()),
        (op, op),
        "{shape:?}"
    );
    assert_eq!(journal.superblock().op_durable, op, "{shape:?}");
    read_all(journal, &old[..op as usize]).await;
    assert_not_readable(journal, op + 1).await;

    // Files: nothing after the segment where entry `op + 1` would go (the next one when
    // entry `op` fills its segment exactly), and that segment reads as zero from there on.
    let at = positions(old);
    let (segment_end, offset_end) = match op {
        0 => (0, 0),
        op => match at[op as usize - 1] {
            (segment, offset, padded) if offset + padded == SEGMENT_BYTES_TEST => (segment + 1, 0),
            (segment, offset, padded) => (segment, offset + padded),
        },
    };
    let segment_end = segment_end.min(at.last().unwrap().0);
    let on_disk = segments(dir);
    assert_eq!(on_disk.last(), Some(&segment_end), "{shape:?}: {on_disk:?}");
    let bytes = std::fs::read(dir.join(percore_engine::journal::segment_file_name(segment_end)))
        .expect("read segment");
    assert_eq!(bytes.len() as u64, SEGMENT_BYTES_TEST, "pre-allocated back");
    assert!(
        bytes[offset_end as usize..].iter().all(|&byte| byte == 0),
        "{shape:?}: stale bytes after the new end"
    );
    op
}

const SHAPES: [Shape; 6] = [
    Shape::MiddleOfSegment,
    Shape::SegmentFilled,
    Shape::SegmentRolledOver,
    Shape::AcrossSegments,
    Shape::ToZero,
    Shape::AtHead,
];

#[test]
fn truncation_shapes_are_picked_from_a_layout_that_has_them() {
    let old = history(1..=OPS_FIRST_HISTORY, SALT_OLD, JOURNAL_CHAIN_ROOT);
    let at = positions(&old);
    assert!(at.last().unwrap().0 >= 4, "several segments: {at:?}");
    let ops: Vec<u64> = SHAPES.iter().map(|&shape| op_for(shape, &old)).collect();
    assert!(ops[..4].iter().all(|&op| op > 0 && op < OPS_FIRST_HISTORY));
    assert_eq!(ops[4..], [0, OPS_FIRST_HISTORY]);
}

/// Truncate, append a different history after the cut (fewer entries than were removed, so
/// stale ones would show if left on disk), read everything back, crash, recover exactly the
/// new log; then crash right after a truncation and recover exactly the prefix.
#[test]
fn truncation_then_a_new_history_survives_a_crash_at_every_shape() {
    let temp = TempDir::new("journal-truncate", "shapes");
    let root = temp.0.clone();
    run(move || async move {
        let old = history(1..=OPS_FIRST_HISTORY, SALT_OLD, JOURNAL_CHAIN_ROOT);
        for shape in SHAPES {
            let dir = root
                .join(format!("{shape:?}"))
                .join(format!("shard-{SHARD}"));
            let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
            append(&mut journal, &old, 7).await;
            let op = truncate_checked(&mut journal, &dir, &old, shape).await;

            // A different op + 1 onwards, chained to what truncation returned.
            let appended = 3.min(OPS_FIRST_HISTORY - op + 3);
            let new = history(op + 1..=op + appended, SALT_NEW, journal.checksum_staged());
            if op < OPS_FIRST_HISTORY {
                assert_ne!(new[0], old[op as usize], "{shape:?}: a different op + 1");
            }
            // The old op + 1 still chains to the kept prefix: append it and cut it again.
            if op < OPS_FIRST_HISTORY {
                assert!(journal.stage_encoded(&old[op as usize]).is_ok());
                journal.commit().await.expect("commit");
                journal.truncate_after(op).await.expect("truncate again");
                assert_not_readable(&mut journal, op + 1).await;
            }
            append(&mut journal, &new, 2).await;
            let log: Vec<Vec<u8>> = old[..op as usize].iter().chain(&new).cloned().collect();
            read_all(&mut journal, &log).await;
            drop(journal); // Crash.

            let (mut journal, recovered, replayed) =
                open(&dir, JournalOptions::default()).await.expect("reopen");
            assert_eq!(recovered.op_last, log.len() as u64, "{shape:?}");
            assert_eq!(recovered.tail, Tail::Clean, "{shape:?}");
            let replayed: Vec<Vec<u8>> = replayed.into_iter().map(|(_, bytes)| bytes).collect();
            assert_eq!(replayed, log, "{shape:?}: exactly the new log comes back");
            assert_eq!(journal.checksum_staged(), checksum_of(log.last().unwrap()));
            read_all(&mut journal, &log).await;
            assert_not_readable(&mut journal, log.len() as u64 + 1).await;

            // Crash right after truncating (nothing appended): the prefix, nothing else.
            let cut = op.min(log.len() as u64 - 1);
            journal.truncate_after(cut).await.expect("truncate");
            drop(journal);
            let (mut journal, recovered, replayed) =
                open(&dir, JournalOptions::default()).await.expect("reopen");
            assert_eq!(recovered.op_last, cut, "{shape:?}");
            assert_eq!(recovered.tail, Tail::Clean, "{shape:?}");
            assert_eq!(replayed.len() as u64, cut);
            read_all(&mut journal, &log[..cut as usize]).await;
            assert_not_readable(&mut journal, cut + 1).await;
            // And it continues once more after recovery.
            let again = history(cut + 1..=cut + 2, SALT_OLD + 7, journal.checksum_staged());
            append(&mut journal, &again, 1).await;
            journal.close().await.expect("close");
            let (mut journal, recovered, _) =
                open(&dir, JournalOptions::default()).await.expect("reopen");
            assert_eq!(recovered.op_last, cut + 2);
            let log: Vec<Vec<u8>> = log[..cut as usize].iter().chain(&again).cloned().collect();
            read_all(&mut journal, &log).await;
            journal.close().await.expect("close");
        }
    });
}

/// Many truncations and appends in a row, each at a pseudo-random op, crashing half the
/// time: the journal always recovers to exactly the model log.
#[test]
fn repeated_truncations_match_a_model_log() {
    let temp = TempDir::new("journal-truncate", "model");
    let dir = temp.case_shard_dir("model", SHARD);
    run(move || async move {
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        let mut log: Vec<Vec<u8>> = Vec::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..24u8 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let grow = 1 + state % 12;
            let head = log.len() as u64;
            let checksum = log
                .last()
                .map_or(JOURNAL_CHAIN_ROOT, |entry| checksum_of(entry));
            let new = history(head + 1..=head + grow, round, checksum);
            append(&mut journal, &new, 1 + (state % 5) as usize).await;
            log.extend(new);
            let op = (state >> 20) % (log.len() as u64 + 1);
            let checksum = journal.truncate_after(op).await.expect("truncate");
            log.truncate(op as usize);
            assert_eq!(
                checksum,
                log.last()
                    .map_or(JOURNAL_CHAIN_ROOT, |entry| checksum_of(entry))
            );
            if state & 1 == 0 {
                drop(journal); // Crash.
                let (reopened, recovered, replayed) =
                    open(&dir, JournalOptions::default()).await.expect("reopen");
                journal = reopened;
                assert_eq!(recovered.op_last, op, "round {round}");
                let replayed: Vec<Vec<u8>> = replayed.into_iter().map(|(_, bytes)| bytes).collect();
                assert_eq!(replayed, log, "round {round}");
            }
            read_all(&mut journal, &log).await;
            assert_not_readable(&mut journal, op + 1).await;
        }
        journal.close().await.expect("close");
    });
}

/// Truncation may reach the latest checkpoint but not below it (typed error, journal still
/// usable); after truncating at the checkpoint, recovery restores it and the new ops follow.
#[test]
fn truncation_stops_at_the_checkpoint() {
    const CHECKPOINT_OP: u64 = 12;
    let temp = TempDir::new("journal-truncate", "checkpoint");
    let dir = temp.case_shard_dir("checkpoint", SHARD);
    run(move || async move {
        let old = history(1..=OPS_FIRST_HISTORY, SALT_OLD, JOURNAL_CHAIN_ROOT);
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        append(&mut journal, &old[..20], 4).await;
        let snapshot = vec![0x5a; 10_000];
        journal
            .checkpoint(CHECKPOINT_OP, &snapshot, [3; 32], 0)
            .await
            .expect("checkpoint");
        append(&mut journal, &old[20..], 4).await;

        for op in [0, CHECKPOINT_OP - 1] {
            assert!(matches!(
                journal.truncate_after(op).await,
                Err(JournalError::TruncateBelowCheckpoint {
                    op: found,
                    checkpoint_op: CHECKPOINT_OP
                }) if found == op
            ));
        }
        assert!(matches!(
            journal.truncate_after(OPS_FIRST_HISTORY + 1).await,
            Err(JournalError::OpNotReadable { op, .. }) if op == OPS_FIRST_HISTORY + 1
        ));
        assert_eq!(journal.op_durable(), OPS_FIRST_HISTORY, "nothing removed");
        read_all(&mut journal, &old).await;

        let checksum = journal
            .truncate_after(CHECKPOINT_OP)
            .await
            .expect("truncate");
        assert_eq!(checksum, checksum_of(&old[CHECKPOINT_OP as usize - 1]));
        assert_eq!(journal.superblock().op_durable, CHECKPOINT_OP);
        assert_not_readable(&mut journal, CHECKPOINT_OP + 1).await;
        let new = history(
            CHECKPOINT_OP + 1..=CHECKPOINT_OP + 5,
            SALT_NEW,
            journal.checksum_staged(),
        );
        append(&mut journal, &new[..2], 1).await;
        drop(journal); // Crash.

        let (mut journal, recovered, replayed) =
            open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!(recovered.checkpoint_op, CHECKPOINT_OP);
        assert_eq!(recovered.op_last, CHECKPOINT_OP + 2);
        assert_eq!(
            replayed,
            vec![
                (CHECKPOINT_OP + 1, new[0].clone()),
                (CHECKPOINT_OP + 2, new[1].clone())
            ]
        );
        // Truncating at the checkpoint right after recovery, then a crash.
        journal
            .truncate_after(CHECKPOINT_OP)
            .await
            .expect("truncate");
        drop(journal);
        let (mut journal, recovered, replayed) =
            open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!(recovered.op_last, CHECKPOINT_OP);
        assert!(replayed.is_empty());
        let log: Vec<Vec<u8>> = old[..CHECKPOINT_OP as usize]
            .iter()
            .chain(&new)
            .cloned()
            .collect();
        append(&mut journal, &new, 2).await;
        read_all(&mut journal, &log).await;
        journal.close().await.expect("close");
    });
}

/// Views and `commit_max` persist across a clean close and a crash, survive
/// `write_superblock` and checkpoints, and are never written lower.
#[test]
fn views_round_trip_and_never_regress() {
    let temp = TempDir::new("journal-truncate", "views");
    let dir = temp.case_shard_dir("views", SHARD);
    run(move || async move {
        let old = history(1..=10, SALT_OLD, JOURNAL_CHAIN_ROOT);
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        assert_eq!(journal.views(), (0, 0, 0), "a fresh journal");
        append(&mut journal, &old, 3).await;
        journal.write_views(3, 2, 7).await.expect("views");
        assert_eq!(journal.views(), (3, 2, 7));
        assert_eq!(journal.superblock().op_durable, 10);
        journal.write_superblock().await.expect("superblock");
        assert_eq!(journal.views(), (3, 2, 7), "write_superblock keeps them");
        journal.close().await.expect("close");

        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!(journal.views(), (3, 2, 7));
        // Equal values are fine; log_view may reach view.
        journal.write_views(3, 3, 7).await.expect("views");
        journal.write_views(5, 3, 9).await.expect("views");
        journal
            .checkpoint(4, &[1; 100], [0; 32], 0)
            .await
            .expect("checkpoint");
        assert_eq!(journal.views(), (5, 3, 9), "a checkpoint keeps them");
        let sequence = journal.superblock().sequence;

        // Each regression panics before anything is written.
        for (view, log_view, commit_max) in [(4, 3, 9), (5, 2, 9), (5, 3, 8), (5, 6, 9)] {
            let result = AssertUnwindSafe(journal.write_views(view, log_view, commit_max))
                .catch_unwind()
                .await;
            assert!(
                result.is_err(),
                "write_views({view}, {log_view}, {commit_max}) after (5, 3, 9)"
            );
            assert_eq!(journal.views(), (5, 3, 9));
            assert_eq!(journal.superblock().sequence, sequence, "nothing written");
        }
        // Truncation keeps them too.
        journal.truncate_after(6).await.expect("truncate");
        assert_eq!(journal.views(), (5, 3, 9));
        drop(journal); // Crash.

        let (journal, recovered, _) = open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!(recovered.op_last, 6);
        assert_eq!(journal.views(), (5, 3, 9));
        assert_eq!(journal.superblock().op_durable, 6);
        journal.close().await.expect("close");
    });
}

/// With `replay_committed_only`, recovery replays up to the superblock's
/// `min(commit_max, op_durable)`; the entries above stay verified, indexed and readable, and
/// `op_durable()` is the journal's head.
#[test]
fn replay_committed_only_stops_at_commit_max() {
    let temp = TempDir::new("journal-truncate", "replay");
    let dir = temp.case_shard_dir("replay", SHARD);
    run(move || async move {
        let committed_only = JournalOptions {
            replay_committed_only: true,
            ..JournalOptions::default()
        };
        let old = history(1..=30, SALT_OLD, JOURNAL_CHAIN_ROOT);
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        assert_eq!(journal.op_replayed(), 0);
        append(&mut journal, &old[..25], 4).await;
        // Superblock: op_durable 25, commit_max 20.
        journal.write_views(1, 1, 20).await.expect("views");
        journal.close().await.expect("close");

        let (mut journal, recovered, replayed) = open(&dir, committed_only).await.expect("reopen");
        assert_eq!(recovered.op_last, 25);
        assert_eq!(recovered.entries, 20);
        assert_eq!(journal.op_replayed(), 20);
        assert_eq!(journal.op_durable(), 25, "the head, not the replayed op");
        let expected: Vec<(u64, Vec<u8>)> = (1..=20).zip(old[..20].iter().cloned()).collect();
        assert_eq!(replayed, expected);
        read_all(&mut journal, &old[..25]).await;

        // commit_max above the superblock's op_durable: replay stops at op_durable (25),
        // even though the journal holds 30 (never acknowledged in the superblock).
        journal.write_views(1, 1, 28).await.expect("views");
        append(&mut journal, &old[25..], 2).await;
        drop(journal); // Crash: the superblock still says op_durable 25.
        let (mut journal, recovered, replayed) = open(&dir, committed_only).await.expect("reopen");
        assert_eq!(recovered.op_last, 30);
        assert_eq!(journal.op_replayed(), 25);
        assert_eq!(replayed.last().map(|(op, _)| *op), Some(25));
        read_all(&mut journal, &old).await;
        journal.close().await.expect("close");

        // Without the option, everything is replayed.
        let (journal, recovered, replayed) =
            open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!((recovered.entries, journal.op_replayed()), (30, 30));
        assert_eq!(replayed.len(), 30);
        journal.close().await.expect("close");
    });
}

/// A checkpoint above `commit_max` (an applied op is committed): replay under
/// `replay_committed_only` starts after the checkpoint and `op_replayed` is at least it.
#[test]
fn replay_committed_only_never_goes_below_the_checkpoint() {
    let temp = TempDir::new("journal-truncate", "replay-checkpoint");
    let dir = temp.case_shard_dir("replay-checkpoint", SHARD);
    run(move || async move {
        let old = history(1..=16, SALT_OLD, JOURNAL_CHAIN_ROOT);
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        append(&mut journal, &old, 4).await;
        journal
            .checkpoint(10, &[9; 5000], [1; 32], 0)
            .await
            .expect("checkpoint");
        journal.close().await.expect("close");
        let options = JournalOptions {
            replay_committed_only: true,
            ..JournalOptions::default()
        };
        let (mut journal, recovered, replayed) = open(&dir, options).await.expect("reopen");
        assert_eq!(journal.views(), (1, 0, 0), "entries of view 1 raise view");
        assert_eq!((recovered.checkpoint_op, recovered.entries), (10, 0));
        assert!(replayed.is_empty());
        assert_eq!(journal.op_replayed(), 10);
        assert_eq!(journal.op_durable(), 16);
        read_all(&mut journal, &old).await;
        journal.close().await.expect("close");
    });
}

/// A checkpoint installed by the follower at the end of an entry that fills its segment
/// exactly (the follower's reader gives the position `(segment, segment_bytes)`, not the
/// next segment's start): truncating at that checkpoint cuts at the next segment's start,
/// where it asserted, and recovery afterwards finds the checkpoint and the new ops.
#[test]
fn truncation_at_a_checkpoint_that_ends_its_segment() {
    let temp = TempDir::new("journal-truncate", "checkpoint-at-segment-end");
    let dir = temp.case_shard_dir("checkpoint-at-segment-end", SHARD);
    run(move || async move {
        // One-sector entries: sixteen fill a segment exactly.
        let per_segment = SEGMENT_BYTES_TEST / 4096;
        let one_sector = |ops: std::ops::RangeInclusive<u64>, salt: u8, mut previous| {
            ops.map(|op| {
                let (mut meta, _) = batch(op, salt);
                meta.entry_count = 1;
                let body = vec![salt; RECORD_BYTES as usize];
                let bytes = encoded_with(meta, &body, previous);
                previous = checksum_of(&bytes);
                bytes
            })
            .collect::<Vec<Vec<u8>>>()
        };
        let checkpoint_op = per_segment;
        let old = one_sector(1..=checkpoint_op + 5, SALT_OLD, JOURNAL_CHAIN_ROOT);
        let (mut journal, _, _) = open(&dir, JournalOptions::default()).await.expect("open");
        append(&mut journal, &old, 4).await;
        let meta = SnapshotMeta {
            cluster_id: CLUSTER_ID,
            shard: SHARD,
            op: checkpoint_op,
            snapshot_bytes: 0,
            checkpoint_checksum: checksum_of(&old[checkpoint_op as usize - 1]),
            snapshot_checksum: journal_checksum(&[]),
            digest: [0; 32],
        };
        // The follower's file (an empty state), as it writes one before the install.
        let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
        encode_snapshot_header(&meta, &mut header);
        std::fs::write(dir.join(snapshot_file_name(checkpoint_op)), header).expect("snapshot");
        journal
            .checkpoint_install(&meta, (0, SEGMENT_BYTES_TEST), u64::MAX)
            .await
            .expect("install at the segment's end");
        let checksum = journal
            .truncate_after(checkpoint_op)
            .await
            .expect("truncate at the checkpoint");
        assert_eq!(checksum, meta.checkpoint_checksum);
        assert_not_readable(&mut journal, checkpoint_op + 1).await;
        let new = one_sector(checkpoint_op + 1..=checkpoint_op + 3, SALT_NEW, checksum);
        append(&mut journal, &new, 1).await;
        drop(journal); // Crash.
        let (_journal, recovered, replayed) =
            open(&dir, JournalOptions::default()).await.expect("reopen");
        assert_eq!(recovered.checkpoint_op, checkpoint_op);
        assert_eq!(recovered.op_last, checkpoint_op + 3);
        let ops: Vec<u64> = replayed.iter().map(|(op, _)| *op).collect();
        assert_eq!(
            ops,
            (checkpoint_op + 1..=checkpoint_op + 3).collect::<Vec<_>>()
        );
        assert_eq!(replayed[0].1, new[0]);
    });
}
