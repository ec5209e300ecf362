//! What log replication needs from the shard journal, against real files: the encoded bytes
//! of staged entries (leader), staging entries encoded elsewhere (follower, byte-identical
//! segment files), reading committed entries back by op (catch-up), recovery of all of it,
//! and the position index's fixed capacity.
//!
//! Every test runs inside a glommio `LocalExecutor` with a small `io_memory` (the box's
//! `RLIMIT_MEMLOCK` is 8 MiB) on a fresh directory under the system temporary directory,
//! removed at the end.

mod support;

use std::os::unix::fs::FileExt as _;
use std::path::Path;

use percore_engine::journal::{
    ENTRY_HEADER_BYTES, EntryError, EntryMeta, JOURNAL_CHAIN_ROOT, JournalChecksum, decode_entry,
    encode_entry, entry_bytes_padded, segment_file_name,
};
use percore_shards::journal::{
    FsyncPolicy, Journal, JournalConfig, JournalError, JournalOptions, POSITION_INDEX_ENTRIES_MAX,
};

use support::{TempDir, run_small as run};

const SHARD: u32 = 3;
const CLUSTER_ID: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0077;
const RECORD_BYTES: u32 = 128;
const BODY_BYTES_MAX: usize = 16 * 1024;
/// Small segments, so a few thousand entries roll over many times.
const SEGMENT_BYTES_TEST: u64 = 256 << 10;
const WRITE_BUFFER_BYTES_TEST: usize = 256 << 10;

fn config(dir: &Path, shard: u32, fsync: FsyncPolicy) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        shard,
        cluster_id: CLUSTER_ID,
        segment_bytes: SEGMENT_BYTES_TEST,
        body_bytes_max: BODY_BYTES_MAX,
        fsync,
        write_buffer_bytes: WRITE_BUFFER_BYTES_TEST,
    }
}

fn options(position_index_entries_max: usize) -> JournalOptions {
    JournalOptions {
        position_index_entries_max,
        ..JournalOptions::default()
    }
}

async fn open(config: JournalConfig, options: JournalOptions) -> Journal {
    let (journal, _) = Journal::open_with_options(config, options, |_| {})
        .await
        .expect("open");
    journal
}

/// Records in op's batch: varied, so entries take one to five sectors.
fn records_for(op: u64) -> u32 {
    [1, 7, 31, 0, 3, 120, 64, 31, 2, 100][(op % 10) as usize]
}

/// A deterministic batch for `op` of `shard`; `salt` makes another history.
fn batch(shard: u32, op: u64, salt: u8) -> (EntryMeta, Vec<u8>) {
    let records = records_for(op);
    let body = (0..records as usize * RECORD_BYTES as usize)
        .map(|index| {
            (index as u64)
                .wrapping_mul(31)
                .wrapping_add(op * 7 + u64::from(salt)) as u8
        })
        .collect();
    let meta = EntryMeta {
        shard,
        view: op / 100,
        op,
        operation: 1 + (op % 3) as u16,
        entry_count: records,
        record_bytes: RECORD_BYTES,
        request_count: 0,
    };
    (meta, body)
}

/// The encoded entry (header + body, unpadded) the format produces for op's batch.
fn encoded(shard: u32, op: u64, salt: u8, checksum_previous: JournalChecksum) -> Vec<u8> {
    let (meta, body) = batch(shard, op, salt);
    let mut buf = vec![0u8; entry_bytes_padded(body.len())];
    encode_entry(&mut buf, &meta, &body, checksum_previous);
    buf.truncate(ENTRY_HEADER_BYTES + body.len());
    buf
}

/// Stages ops `ops` through `stage`, committing every `per_commit` (and whenever the buffer
/// is full); returns each op's encoded bytes as `staged_entry` reported them before commit.
async fn lead(
    journal: &mut Journal,
    ops: std::ops::RangeInclusive<u64>,
    salt: u8,
    per_commit: usize,
) -> Vec<Vec<u8>> {
    let mut entries = Vec::new();
    let mut pending = Vec::new();
    let last = *ops.end();
    for op in ops {
        let (meta, body) = batch(SHARD, op, salt);
        let padded = entry_bytes_padded(body.len());
        if journal.staged_bytes() + padded > journal.write_buffer_bytes() {
            drain(journal, &mut pending, &mut entries).await;
        }
        let checksum_before = journal.checksum_staged();
        journal.stage(meta, &body).expect("stage");
        assert_eq!(journal.op_staged(), op);
        let bytes = journal.staged_entry(op).expect("staged").to_vec();
        assert_eq!(
            bytes,
            encoded(SHARD, op, salt, checksum_before),
            "staged_entry is the format's encoding of op {op}"
        );
        assert_eq!(
            decode_entry(&bytes, BODY_BYTES_MAX)
                .expect("valid")
                .checksum,
            journal.checksum_staged()
        );
        pending.push(op);
        if pending.len() == per_commit || op == last {
            drain(journal, &mut pending, &mut entries).await;
        }
    }
    entries
}

/// Copies the encoded bytes of every pending op, then commits them.
async fn drain(journal: &mut Journal, pending: &mut Vec<u64>, entries: &mut Vec<Vec<u8>>) {
    for &op in pending.iter() {
        entries.push(journal.staged_entry(op).expect("staged").to_vec());
    }
    let last = *pending.last().expect("something staged");
    assert_eq!(journal.commit().await.expect("commit"), last);
    assert_eq!(
        journal.staged_entry(last),
        None,
        "committed: no longer staged"
    );
    pending.clear();
}

/// Stages `entries` (ops `op_first`, …) through `stage_encoded`, committing every
/// `per_commit`; checks each returned checksum against the chain head.
async fn follow(journal: &mut Journal, entries: &[Vec<u8>], per_commit: usize) {
    for (index, entry) in entries.iter().enumerate() {
        let padded = entry.len().next_multiple_of(4096);
        if journal.staged_bytes() + padded > journal.write_buffer_bytes() {
            journal.commit().await.expect("commit");
        }
        let checksum = journal.stage_encoded(entry).expect("stage_encoded");
        assert_eq!(checksum, journal.checksum_staged());
        assert_eq!(journal.staged_entry(journal.op_staged()), Some(&entry[..]));
        if (index + 1) % per_commit == 0 {
            journal.commit().await.expect("commit");
        }
    }
    journal.commit().await.expect("commit");
}

/// Reads every op in `order` and compares with `entries` (op `i + 1` at `entries[i]`).
async fn read_all(journal: &mut Journal, entries: &[Vec<u8>], order: &[u64]) {
    let mut out = Vec::new();
    for &op in order {
        journal
            .read_entry(op, &mut out)
            .await
            .unwrap_or_else(|error| panic!("read op {op}: {error}"));
        assert_eq!(out, entries[op as usize - 1], "op {op}");
    }
    assert_eq!(
        out.capacity(),
        journal.entry_bytes_max(),
        "grew once, exactly"
    );
}

/// A deterministic permutation of `1..=ops` (xorshift Fisher–Yates).
fn shuffled(ops: u64, seed: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (1..=ops).collect();
    let mut state = seed | 1;
    for index in (1..order.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        order.swap(index, (state % (index as u64 + 1)) as usize);
    }
    order
}

/// Where each entry lies, by the writer's rule: back to back, rolling to the next segment
/// when an entry would cross the end.
fn positions(entries: &[Vec<u8>]) -> Vec<(u64, u64)> {
    let mut segment = 0;
    let mut offset = 0;
    let mut positions = Vec::new();
    for entry in entries {
        let padded = entry.len().next_multiple_of(4096) as u64;
        if offset + padded > SEGMENT_BYTES_TEST {
            segment += 1;
            offset = 0;
        }
        positions.push((segment, offset));
        offset += padded;
    }
    positions
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("journal dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .filter(|name| name.starts_with("segment-"))
        .collect();
    names.sort();
    names
}

const OPS_MANY: u64 = 5_000;

#[test]
fn read_entry_returns_every_committed_op_in_any_order() {
    // Default index (stride 1) and a tiny one (stride 128 after 5,000 ops: walks that cross
    // segment roll-overs).
    for entries_max in [POSITION_INDEX_ENTRIES_MAX, 64] {
        let temp = TempDir::new("journal-replica", &format!("read-{entries_max}"));
        let dir = temp.case_shard_dir("leader", SHARD);
        run(move || async move {
            let cfg = config(&dir, SHARD, FsyncPolicy::Never);
            let mut journal = open(cfg, options(entries_max)).await;
            let entries = lead(&mut journal, 1..=OPS_MANY, 0, 37).await;
            assert_eq!(entries.len() as u64, OPS_MANY);
            let segments = positions(&entries).last().expect("entries").0 + 1;
            assert!(
                segments >= 20,
                "{segments} segments: roll-over is exercised"
            );
            assert_eq!(segment_files(&dir).len() as u64, segments);
            let usage = journal.position_index_usage();
            assert!(usage.entries <= usage.entries_max && usage.entries_max == entries_max);

            let sequential: Vec<u64> = (1..=OPS_MANY).collect();
            read_all(&mut journal, &entries, &sequential).await;
            read_all(&mut journal, &entries, &shuffled(OPS_MANY, 0x9e37)).await;
            let backwards: Vec<u64> = (1..=OPS_MANY).rev().collect();
            read_all(&mut journal, &entries, &backwards).await;

            // Not durable, or not an op: typed errors, `out` left empty.
            let (meta, body) = batch(SHARD, OPS_MANY + 1, 0);
            journal.stage(meta, &body).expect("stage");
            let mut out = vec![1, 2, 3];
            for op in [0, OPS_MANY + 1, OPS_MANY + 2] {
                match journal.read_entry(op, &mut out).await {
                    Err(JournalError::OpNotReadable {
                        op: refused,
                        op_first: 1,
                        op_durable: OPS_MANY,
                    }) => assert_eq!(refused, op),
                    other => panic!("op {op}: {other:?}"),
                }
                assert!(out.is_empty());
            }
            journal.close().await.expect("close");
        });
    }
}

#[test]
fn stage_encoded_writes_segment_files_identical_to_stage() {
    let temp = TempDir::new("journal-replica", "identical");
    let leader_dir = temp.case_shard_dir("leader", SHARD);
    let follower_dir = temp.case_shard_dir("follower", SHARD);
    run(move || async move {
        let ops = 600;
        let mut leader = open(
            config(&leader_dir, SHARD, FsyncPolicy::Always),
            options(POSITION_INDEX_ENTRIES_MAX),
        )
        .await;
        let entries = lead(&mut leader, 1..=ops, 5, 11).await;
        let mut follower = open(
            config(&follower_dir, SHARD, FsyncPolicy::Always),
            options(POSITION_INDEX_ENTRIES_MAX),
        )
        .await;
        assert_eq!(follower.checksum_staged(), JOURNAL_CHAIN_ROOT);
        // Other group-commit boundaries than the leader's: the files must not care.
        follow(&mut follower, &entries, 4).await;
        assert_eq!(follower.op_durable(), ops);
        assert_eq!(follower.checksum_staged(), leader.checksum_staged());
        leader.close().await.expect("close");
        follower.close().await.expect("close");

        let names = segment_files(&leader_dir);
        assert!(names.len() >= 5, "{} segments", names.len());
        assert_eq!(names, segment_files(&follower_dir));
        for name in &names {
            let leader_bytes = std::fs::read(leader_dir.join(name)).expect("leader segment");
            let follower_bytes = std::fs::read(follower_dir.join(name)).expect("follower segment");
            assert_eq!(leader_bytes.len() as u64, SEGMENT_BYTES_TEST);
            assert!(leader_bytes == follower_bytes, "{name} differs");
        }
    });
}

#[test]
fn stage_encoded_rejects_bad_entries_and_stays_usable() {
    let temp = TempDir::new("journal-replica", "reject");
    let dir = temp.case_shard_dir("follower", SHARD);
    run(move || async move {
        let mut journal = open(
            config(&dir, SHARD, FsyncPolicy::Never),
            options(POSITION_INDEX_ENTRIES_MAX),
        )
        .await;
        // Op 15 holds 120 records: a body of several sectors to flip bits in.
        let next = 15;
        let mut chain = JOURNAL_CHAIN_ROOT;
        for op in 1..next {
            chain = journal
                .stage_encoded(&encoded(SHARD, op, 0, chain))
                .expect("stage_encoded");
        }
        journal.commit().await.expect("commit");
        let good = encoded(SHARD, next, 0, chain);
        assert!(
            good.len() > 4096 + ENTRY_HEADER_BYTES,
            "op {next} spans sectors"
        );

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("header bit", flipped(&good, 40 * 8 + 3)),
            ("body bit", flipped(&good, (ENTRY_HEADER_BYTES + 5000) * 8)),
            ("op after next", encoded(SHARD, next + 1, 0, chain)),
            ("op before next", encoded(SHARD, next - 1, 0, chain)),
            ("other history", encoded(SHARD, next, 0, chain ^ 1)),
            ("other shard", encoded(SHARD + 1, next, 0, chain)),
            ("padded", {
                let mut padded = good.clone();
                padded.resize(good.len().next_multiple_of(4096), 0);
                padded
            }),
            ("truncated", good[..good.len() - 1].to_vec()),
            ("empty", Vec::new()),
        ];
        for (name, bytes) in &cases {
            let result = journal.stage_encoded(bytes);
            let expected = match (*name, &result) {
                ("header bit", Err(JournalError::EntryInvalid { op_expected, error })) => {
                    *op_expected == next && *error == EntryError::HeaderChecksum
                }
                ("body bit", Err(JournalError::EntryInvalid { op_expected, error })) => {
                    *op_expected == next && *error == EntryError::BodyChecksum
                }
                (
                    "op after next",
                    Err(JournalError::NotNext {
                        op, op_expected, ..
                    }),
                ) => (*op, *op_expected) == (next + 1, next),
                (
                    "op before next",
                    Err(JournalError::NotNext {
                        op, op_expected, ..
                    }),
                ) => (*op, *op_expected) == (next - 1, next),
                (
                    "other history",
                    Err(JournalError::ChainMismatch {
                        op,
                        checksum_previous_expected,
                        checksum_previous_found,
                    }),
                ) => {
                    (*op, *checksum_previous_expected, *checksum_previous_found)
                        == (next, chain, chain ^ 1)
                }
                (
                    "other shard",
                    Err(JournalError::NotNext {
                        shard,
                        shard_expected,
                        ..
                    }),
                ) => (*shard, *shard_expected) == (SHARD + 1, SHARD),
                ("padded", Err(JournalError::EntryLengthMismatch { bytes, entry_bytes })) => {
                    (*bytes, *entry_bytes) == (good.len().next_multiple_of(4096), good.len())
                }
                (
                    "truncated" | "empty",
                    Err(JournalError::EntryInvalid {
                        error: EntryError::Truncated { .. },
                        ..
                    }),
                ) => true,
                _ => false,
            };
            assert!(expected, "{name}: {result:?}");
            assert_eq!(journal.op_staged(), next - 1, "{name}: nothing staged");
            assert_eq!(journal.checksum_staged(), chain, "{name}: chain unchanged");
            assert_eq!(journal.staged_bytes(), 0, "{name}: nothing staged");
        }

        // Still usable: the good entry stages, commits and reads back.
        let checksum = journal.stage_encoded(&good).expect("good entry");
        assert_eq!(journal.commit().await.expect("commit"), next);
        assert_eq!(checksum, journal.checksum_staged());
        let mut out = Vec::new();
        journal.read_entry(next, &mut out).await.expect("read");
        assert_eq!(out, good);
        journal.close().await.expect("close");
    });
}

fn flipped(bytes: &[u8], bit: usize) -> Vec<u8> {
    let mut flipped = bytes.to_vec();
    flipped[bit / 8] ^= 1 << (bit % 8);
    flipped
}

#[test]
fn reopen_serves_old_ops_and_continues_the_chain() {
    for entries_max in [POSITION_INDEX_ENTRIES_MAX, 8] {
        let temp = TempDir::new("journal-replica", &format!("reopen-{entries_max}"));
        let leader_dir = temp.case_shard_dir("leader", SHARD);
        let follower_dir = temp.case_shard_dir("follower", SHARD);
        run(move || async move {
            let (ops_before, ops_after) = (400, 150);
            let mut leader = open(
                config(&leader_dir, SHARD, FsyncPolicy::Never),
                options(entries_max),
            )
            .await;
            let entries = lead(&mut leader, 1..=ops_before + ops_after, 9, 16).await;
            let checksums: Vec<JournalChecksum> = entries
                .iter()
                .map(|entry| decode_entry(entry, BODY_BYTES_MAX).expect("valid").checksum)
                .collect();
            let follower_config = config(&follower_dir, SHARD, FsyncPolicy::Always);
            let mut follower = open(follower_config.clone(), options(entries_max)).await;
            follow(&mut follower, &entries[..ops_before as usize], 8).await;
            follower.write_superblock().await.expect("superblock");
            follower.close().await.expect("close");

            let (mut follower, recovered) =
                Journal::open_with_options(follower_config.clone(), options(entries_max), |_| {})
                    .await
                    .expect("reopen");
            assert_eq!(recovered.op_last, ops_before);
            assert_eq!(follower.op_staged(), ops_before);
            assert_eq!(follower.op_durable(), ops_before);
            assert_eq!(
                follower.checksum_staged(),
                checksums[ops_before as usize - 1]
            );
            let usage = follower.position_index_usage();
            assert!(usage.entries >= 1 && usage.entries <= entries_max);
            read_all(
                &mut follower,
                &entries,
                &shuffled(ops_before, 0x51ed + entries_max as u64),
            )
            .await;

            // The chain continues where recovery left it.
            follow(&mut follower, &entries[ops_before as usize..], 8).await;
            let ops = ops_before + ops_after;
            assert_eq!(follower.checksum_staged(), checksums[ops as usize - 1]);
            let sequential: Vec<u64> = (1..=ops).collect();
            read_all(&mut follower, &entries, &sequential).await;
            follower.close().await.expect("close");

            // Once more from disk, a leader's journal too.
            let mut reopened = open(follower_config, options(entries_max)).await;
            read_all(&mut reopened, &entries, &shuffled(ops, 7)).await;
            reopened.close().await.expect("close");
            leader.close().await.expect("close");
            let mut leader = open(
                config(&leader_dir, SHARD, FsyncPolicy::Never),
                options(entries_max),
            )
            .await;
            read_all(&mut leader, &entries, &shuffled(ops, 8)).await;
            leader.close().await.expect("close");
        });
    }
}

#[test]
fn position_index_stays_within_its_capacity() {
    let temp = TempDir::new("journal-replica", "capacity");
    let dir = temp.case_shard_dir("leader", SHARD);
    run(move || async move {
        let entries_max = 8;
        let ops = 1_000;
        let cfg = config(&dir, SHARD, FsyncPolicy::Never);
        let mut journal = open(cfg.clone(), options(entries_max)).await;
        let mut entries = Vec::new();
        let mut chain = JOURNAL_CHAIN_ROOT;
        for op in 1..=ops {
            let entry = encoded(SHARD, op, 1, chain);
            if journal.staged_bytes() + entry.len().next_multiple_of(4096)
                > journal.write_buffer_bytes()
            {
                journal.commit().await.expect("commit");
            }
            chain = journal.stage_encoded(&entry).expect("stage_encoded");
            entries.push(entry);
            let usage = journal.position_index_usage();
            assert!(usage.entries <= entries_max, "op {op}: {usage:?}");
            assert!(usage.stride_ops.is_power_of_two());
            // Every op lies within one stride after an indexed one.
            assert!(
                op <= usage.entries as u64 * usage.stride_ops,
                "op {op}: {usage:?}"
            );
        }
        journal.commit().await.expect("commit");
        let usage = journal.position_index_usage();
        assert_eq!(usage.entries_max, entries_max);
        assert_eq!(usage.op_first, 1);
        assert!(usage.stride_ops >= ops / entries_max as u64, "{usage:?}");
        read_all(&mut journal, &entries, &shuffled(ops, 3)).await;
        journal.close().await.expect("close");

        // Recovery rebuilds the same index.
        let mut reopened = open(cfg.clone(), options(entries_max)).await;
        assert_eq!(reopened.position_index_usage(), usage);
        read_all(&mut reopened, &entries, &shuffled(ops, 4)).await;
        reopened.close().await.expect("close");

        // Too small to halve: refused.
        match Journal::open_with_options(cfg, options(1), |_| {}).await {
            Err(JournalError::Config { .. }) => {}
            other => panic!("capacity 1: {:?}", other.map(|(_, recovered)| recovered)),
        }
    });
}

#[test]
fn read_entry_refuses_damaged_bytes_with_their_place() {
    for entries_max in [POSITION_INDEX_ENTRIES_MAX, 4] {
        let temp = TempDir::new("journal-replica", &format!("damage-{entries_max}"));
        let dir = temp.case_shard_dir("leader", SHARD);
        run(move || async move {
            let ops = 200;
            let mut journal = open(
                config(&dir, SHARD, FsyncPolicy::Always),
                options(entries_max),
            )
            .await;
            let entries = lead(&mut journal, 1..=ops, 2, 10).await;
            let places = positions(&entries);
            // Damage op 120's body and op 150's header, behind the journal's back.
            let (body_op, header_op) = (120u64, 150u64);
            for (op, byte) in [(body_op, ENTRY_HEADER_BYTES + 1), (header_op, 44)] {
                let (segment, offset) = places[op as usize - 1];
                let path = dir.join(segment_file_name(segment));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .expect("segment");
                let at = offset + byte as u64;
                let mut value = [0u8];
                file.read_exact_at(&mut value, at).expect("read");
                file.write_all_at(&[value[0] ^ 0x10], at).expect("damage");
                file.sync_all().expect("sync");
            }
            assert!(
                entries[body_op as usize - 1].len() > ENTRY_HEADER_BYTES + 1,
                "op {body_op} has a body"
            );

            let mut out = Vec::new();
            for op in [body_op, header_op] {
                match journal.read_entry(op, &mut out).await {
                    Err(JournalError::Corrupt {
                        shard,
                        op: found,
                        segment,
                        offset,
                        ..
                    }) => {
                        assert_eq!((shard, found), (SHARD, op));
                        assert_eq!((segment, offset), places[op as usize - 1], "op {op}");
                    }
                    other => panic!("op {op}: {other:?}"),
                }
                assert!(out.is_empty(), "no unverified bytes returned");
            }
            // Undamaged ops still read, in any order, with or without walking over damage.
            let intact: Vec<u64> = shuffled(ops, 11)
                .into_iter()
                .filter(|&op| op != body_op && op != header_op)
                .collect();
            let mut walked_into_damage = 0;
            for &op in &intact {
                match journal.read_entry(op, &mut out).await {
                    Ok(()) => assert_eq!(out, entries[op as usize - 1], "op {op}"),
                    // With a sparse index, finding an op after the damaged header walks over
                    // it: refused, never a wrong entry.
                    Err(JournalError::Corrupt { op: found, .. }) if entries_max < 8 => {
                        assert!(op > header_op && found == header_op, "op {op}");
                        walked_into_damage += 1;
                    }
                    Err(error) => panic!("op {op}: {error}"),
                }
            }
            if entries_max == POSITION_INDEX_ENTRIES_MAX {
                assert_eq!(walked_into_damage, 0);
            }
            journal.close().await.expect("close");
        });
    }
}
