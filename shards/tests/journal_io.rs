//! The shard journal against real files: append and replay, segment roll-over, torn tails,
//! corruption before the tail, superblock copies, every fsync policy, and (ignored) a
//! commit throughput measurement against the raw disk.
//!
//! Every test runs inside a glommio `LocalExecutor` on a fresh directory under the system
//! temporary directory, removed at the end.

mod support;

use std::fs::OpenOptions as StdOpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use percore_engine::journal::{
    EntryMeta, SEGMENT_BYTES_DEFAULT, SUPERBLOCK_BYTES, Tail, entry_bytes_padded, segment_file_name,
};
use percore_shards::io_fence;
use percore_shards::journal::{
    FsyncPolicy, Journal, JournalConfig, JournalError, JournalOptions, Recovered,
    SUPERBLOCK_FILE_NAME,
};

use support::{IO_MEMORY_BYTES_TEST, TempDir, join_within, run};

const SHARD: u32 = 3;
const CLUSTER_ID: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0042;
const RECORD_BYTES: u32 = 128;
const BODY_BYTES_MAX: usize = 64 * 1024;
/// Segments of the tests: small, because recovery reads the rest of the last segment.
const SEGMENT_BYTES_TEST: u64 = 8 << 20;

fn config(dir: &Path, segment_bytes: u64, fsync: FsyncPolicy) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        shard: SHARD,
        cluster_id: CLUSTER_ID,
        segment_bytes,
        body_bytes_max: BODY_BYTES_MAX,
        fsync,
        write_buffer_bytes: 1 << 20,
    }
}

/// One batch as the caller staged it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Batch {
    meta: EntryMeta,
    body: Vec<u8>,
}

/// A deterministic batch for `op`: `records` records whose bytes depend on op and `salt`.
fn batch(op: u64, records: u32, salt: u8) -> Batch {
    let body: Vec<u8> = (0..records as usize * RECORD_BYTES as usize)
        .map(|index| {
            (index as u64)
                .wrapping_mul(31)
                .wrapping_add(op * 7 + u64::from(salt)) as u8
        })
        .collect();
    Batch {
        meta: EntryMeta {
            shard: SHARD,
            view: op / 5,
            op,
            operation: 1 + (op % 3) as u16,
            entry_count: records,
            record_bytes: RECORD_BYTES,
            request_count: 0,
        },
        body,
    }
}

/// Records per batch for `op`: varies so entries have different padded sizes.
fn records_for(op: u64) -> u32 {
    [1, 7, 31, 100, 3, 250, 64, 500][(op % 8) as usize]
}

async fn open(config: JournalConfig) -> Result<(Journal, Recovered, Vec<Batch>), JournalError> {
    let mut replayed = Vec::new();
    let (journal, recovered) = Journal::open(config, |entry| {
        replayed.push(Batch {
            meta: entry.meta,
            body: entry.body.to_vec(),
        });
    })
    .await?;
    assert_eq!(replayed.len() as u64, recovered.entries);
    Ok((journal, recovered, replayed))
}

/// Stages `batches` in groups of `per_commit`, committing after each group.
async fn append(journal: &mut Journal, batches: &[Batch], per_commit: usize) {
    for group in batches.chunks(per_commit) {
        for batch in group {
            journal.stage(batch.meta, &batch.body).expect("stage");
        }
        let op_durable = journal.commit().await.expect("commit");
        assert_eq!(op_durable, group.last().expect("non-empty").meta.op);
        assert_eq!(journal.staged_bytes(), 0);
    }
}

fn batches(ops: std::ops::RangeInclusive<u64>, salt: u8) -> Vec<Batch> {
    ops.map(|op| batch(op, records_for(op), salt)).collect()
}

/// File offset of each batch in a single segment (entries are back to back from 0).
fn offsets(batches: &[Batch]) -> Vec<u64> {
    let mut offset = 0u64;
    batches
        .iter()
        .map(|batch| {
            let at = offset;
            offset += entry_bytes_padded(batch.body.len()) as u64;
            at
        })
        .collect()
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(segment_file_name(segment))
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let file = StdOpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for damage");
    file.write_all_at(bytes, offset).expect("damage");
    file.sync_all().expect("sync damage");
}

fn flip_bit(path: &Path, offset: u64) {
    let file = StdOpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open for damage");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).expect("flip");
    file.sync_all().expect("sync damage");
}

#[test]
fn append_commit_reopen_replays_exactly_in_order() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Dsync, FsyncPolicy::Never] {
        let temp = TempDir::new("journal-io", &format!("append-{fsync:?}"));
        let dir = temp.shard_dir(SHARD);
        run(move || async move {
            let config = config(&dir, SEGMENT_BYTES_TEST, fsync);
            let (mut journal, recovered, replayed) = open(config.clone()).await.expect("create");
            assert_eq!(
                recovered,
                Recovered {
                    op_last: 0,
                    checkpoint_op: 0,
                    entries: 0,
                    tail: Tail::Clean,
                    recovering: None,
                    replacing: false,
                }
            );
            assert!(replayed.is_empty());
            assert!(dir.join(SUPERBLOCK_FILE_NAME).exists());
            assert!(segment_path(&dir, 0).exists());

            let written = batches(1..=40, 0);
            append(&mut journal, &written[..1], 1).await;
            append(&mut journal, &written[1..10], 3).await;
            append(&mut journal, &written[10..], 7).await;
            assert_eq!(journal.op_durable(), 40);
            // Nothing staged: commit is a no-op that reports what is durable.
            assert_eq!(journal.commit().await.expect("empty commit"), 40);
            journal.close().await.expect("close");

            let (mut journal, recovered, replayed) = open(config.clone()).await.expect("reopen");
            assert_eq!(recovered.op_last, 40);
            assert_eq!(recovered.tail, Tail::Clean);
            assert_eq!(replayed, written);
            assert_eq!(journal.op_durable(), 40);

            // Appending continues the chain across the reopen.
            let more = batches(41..=45, 0);
            append(&mut journal, &more, 2).await;
            drop(journal);
            let (_journal, recovered, replayed) = open(config).await.expect("reopen again");
            assert_eq!(recovered.op_last, 45);
            assert_eq!(replayed[..40], written[..]);
            assert_eq!(replayed[40..], more[..]);
        });
    }
}

/// `open(2)` flags of this process's open descriptors of segment files in `dir`, read
/// from `/proc/self/fdinfo`.
fn segment_descriptor_flags(dir: &Path) -> Vec<(PathBuf, i32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let is_segment = target.parent() == Some(dir)
            && target
                .extension()
                .is_some_and(|extension| extension == "journal");
        if !is_segment {
            continue;
        }
        let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(entry.file_name()))
            .expect("fdinfo of an open descriptor");
        let flags = info
            .lines()
            .find_map(|line| line.strip_prefix("flags:"))
            .map(|octal| i32::from_str_radix(octal.trim(), 8).expect("octal flags"))
            .expect("a flags line");
        found.push((target, flags));
    }
    found
}

/// `FsyncPolicy::Dsync` skips the `fdatasync` after a group commit, so every segment a
/// commit writes into must be open `O_DSYNC`: the first, each one a roll-over creates, and
/// the one recovery reopens. `Always` opens them without it. Both replay what they committed.
#[test]
fn an_open_journal_holds_its_files_until_closed() {
    // Every file the journal writes through io_uring holds a lock on its description, so a
    // process taking the data directory waits for it (`io_fence::settle`), as it waits for a
    // killed process's writes still in flight; closed, the journal holds nothing.
    let temp = TempDir::new("journal-io", "fence");
    let root = temp.0.clone();
    let dir = temp.shard_dir(SHARD);
    let skip = root.join("percore.lock");
    run(move || async move {
        let (mut journal, _, _) = open(config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always))
            .await
            .expect("create");
        append(&mut journal, &batches(1..=30, 0), 5).await;
        let held = io_fence::settle(&root, &skip, std::time::Duration::from_millis(20));
        match held {
            Err(io_fence::FenceError::InFlight { files, .. }) => {
                // The superblock and the segment written to, at least.
                assert!(files >= 2, "{files} file(s) held");
            }
            other => panic!("{other:?}"),
        }
        journal.close().await.expect("close");
        let settled =
            io_fence::settle(&root, &skip, std::time::Duration::ZERO).expect("nothing held");
        assert_eq!(settled.files_waited, 0);
        assert!(settled.files >= 2, "{settled:?}");
    });
}

#[test]
fn dsync_opens_every_segment_o_dsync() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Dsync] {
        let temp = TempDir::new("journal-io", &format!("dsync-{fsync:?}"));
        let dir = temp.shard_dir(SHARD);
        run(move || async move {
            let config = config(&dir, 1 << 20, fsync);
            let (mut journal, _, _) = open(config.clone()).await.expect("create");
            let dir = dir.canonicalize().expect("the journal directory exists");
            let expect_dsync = |when: &str| {
                let segments = segment_descriptor_flags(&dir);
                assert!(!segments.is_empty(), "{fsync:?} {when}: no segment open");
                for (path, flags) in segments {
                    assert_eq!(
                        flags & libc::O_DSYNC == libc::O_DSYNC,
                        fsync == FsyncPolicy::Dsync,
                        "{fsync:?} {when}: {} open with flags {flags:o}",
                        path.display()
                    );
                }
            };
            expect_dsync("after create");
            // About 15 KB a batch: 1 MiB segments roll over several times.
            let written = batches(1..=240, 0);
            append(&mut journal, &written, 4).await;
            assert!(segment_path(&dir, 2).exists(), "the journal rolled over");
            expect_dsync("after roll-overs");
            journal.close().await.expect("close");
            let (journal, recovered, replayed) = open(config).await.expect("reopen");
            assert_eq!(recovered.op_last, 240);
            assert_eq!(replayed, written);
            expect_dsync("after recovery");
            journal.close().await.expect("close");
        });
    }
}

/// `--data-dir target/x` worked nowhere before: glommio resolved the relative directory
/// against no working directory (EBADF). The journal now makes it absolute first.
#[test]
fn a_relative_journal_directory_opens_and_reopens() {
    // Relative to the test's working directory (the crate), under the ignored target/.
    let relative = PathBuf::from(format!(
        "../target/percore-journal-io-relative-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&relative);
    let cleanup = TempDir(relative.clone());
    let dir = relative.join(format!("shard-{SHARD}"));
    assert!(dir.is_relative());
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Never);
        let (mut journal, _, _) = open(config.clone()).await.expect("create, relative");
        append(&mut journal, &batches(1..=5, 0), 2).await;
        drop(journal);
        let (_journal, recovered, replayed) = open(config).await.expect("reopen, relative");
        assert_eq!(recovered.op_last, 5);
        assert_eq!(replayed, batches(1..=5, 0));
    });
    drop(cleanup);
}

#[test]
fn segments_roll_over_and_replay_crosses_them() {
    let temp = TempDir::new("journal-io", "rollover");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let segment_bytes = 128 * 1024;
        let config = config(&dir, segment_bytes, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        // Bodies up to 64,000 bytes: some entries fill half a segment on their own.
        let written = batches(1..=60, 1);
        append(&mut journal, &written[..5], 1).await;
        append(&mut journal, &written[5..], 11).await;
        journal.close().await.expect("close");

        let segments = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|entry| {
                percore_engine::journal::parse_segment_name(entry.ok()?.file_name().to_str()?)
            })
            .count();
        assert!(segments >= 10, "expected many segments, found {segments}");
        for segment in 0..segments as u64 {
            let bytes = std::fs::metadata(segment_path(&dir, segment))
                .expect("segment")
                .len();
            assert_eq!(bytes, segment_bytes, "segments are pre-allocated whole");
        }

        let (mut journal, recovered, replayed) = open(config.clone()).await.expect("reopen");
        assert_eq!(recovered.op_last, 60);
        assert_eq!(recovered.tail, Tail::Clean);
        assert_eq!(replayed, written);

        let more = batches(61..=70, 1);
        append(&mut journal, &more, 4).await;
        drop(journal);
        let (_journal, recovered, replayed) = open(config).await.expect("reopen again");
        assert_eq!(recovered.op_last, 70);
        assert_eq!(replayed.len(), 70);
        assert_eq!(replayed[60..], more[..]);
    });
}

#[test]
fn torn_tail_is_truncated_and_the_next_append_is_clean() {
    // Damage the last entry's last sector with garbage, with zeros, or leave the entry
    // whole but put garbage after it (a write whose first sectors never landed).
    for damage in ["garbage", "zeros", "garbage_after"] {
        let temp = TempDir::new("journal-io", &format!("torn-{damage}"));
        let dir = temp.shard_dir(SHARD);
        run(move || async move {
            let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
            let (mut journal, _, _) = open(config.clone()).await.expect("create");
            // The last batch (op 14, 64 records) spans three sectors.
            let written = batches(1..=14, 2);
            append(&mut journal, &written, 4).await;
            journal.close().await.expect("close");

            let offsets = offsets(&written);
            let last = written.last().expect("batches");
            assert_eq!(entry_bytes_padded(last.body.len()), 3 * 4096);
            let last_end = offsets[13] + entry_bytes_padded(last.body.len()) as u64;
            let path = segment_path(&dir, 0);
            let (op_last, torn_at) = match damage {
                "garbage" => {
                    overwrite(&path, last_end - 4096, &[0xa5; 4096]);
                    (13, offsets[13])
                }
                "zeros" => {
                    // The header survives; the body's last bytes read as zero.
                    overwrite(&path, last_end - 4096, &[0; 4096]);
                    (13, offsets[13])
                }
                _ => {
                    overwrite(&path, last_end + 3 * 4096, &[0x5a; 8192]);
                    (14, last_end)
                }
            };

            let (mut journal, recovered, replayed) = open(config.clone()).await.expect("recover");
            assert_eq!(
                recovered,
                Recovered {
                    op_last,
                    checkpoint_op: 0,
                    entries: op_last,
                    tail: Tail::Torn { offset: torn_at },
                    recovering: None,
                    replacing: false,
                }
            );
            assert_eq!(replayed[..], written[..op_last as usize]);
            let file_bytes = std::fs::metadata(&path).expect("segment").len();
            assert_eq!(file_bytes, SEGMENT_BYTES_TEST, "pre-allocated again");

            // The torn bytes now read as zero: append a different entry there and reopen.
            let next = batch(op_last + 1, 9, 0xee);
            append(&mut journal, std::slice::from_ref(&next), 1).await;
            drop(journal);
            let (_journal, recovered, replayed) = open(config).await.expect("reopen");
            assert_eq!(recovered.tail, Tail::Clean);
            assert_eq!(recovered.op_last, op_last + 1);
            assert_eq!(replayed.last(), Some(&next));
        });
    }
}

#[test]
fn torn_segment_followed_by_an_empty_new_segment_recovers_there() {
    // A crash right after a roll created segment N+1 but before segment N's last write
    // landed: N+1 is empty and is removed; N+1 with data instead is corruption.
    for later_has_data in [false, true] {
        let temp = TempDir::new("journal-io", &format!("torn-roll-{later_has_data}"));
        let dir = temp.shard_dir(SHARD);
        run(move || async move {
            let segment_bytes = 128 * 1024;
            let config = config(&dir, segment_bytes, FsyncPolicy::Never);
            let (mut journal, _, _) = open(config.clone()).await.expect("create");
            // 20 KiB entries, six per segment: ops 1..=14 fill segments 0, 1 and two of 2.
            let written: Vec<Batch> = (1..=14).map(|op| batch(op, 128, 8)).collect();
            append(&mut journal, &written, 3).await;
            journal.close().await.expect("close");

            let entry_bytes = 20 * 1024u64;
            overwrite(
                &segment_path(&dir, 2),
                2 * entry_bytes - 4096,
                &[0xc3; 4096],
            );
            let mut next = vec![0u8; segment_bytes as usize];
            if later_has_data {
                let stray = batch(15, 128, 8);
                let mut encoded = vec![0u8; entry_bytes as usize];
                percore_engine::journal::encode_entry(&mut encoded, &stray.meta, &stray.body, 1);
                next[..encoded.len()].copy_from_slice(&encoded);
            }
            std::fs::write(segment_path(&dir, 3), &next).expect("segment 3");

            let result = open(config.clone()).await;
            if later_has_data {
                match result {
                    Err(JournalError::Corrupt {
                        op,
                        segment,
                        offset,
                        ..
                    }) => assert_eq!((op, segment, offset), (14, 2, entry_bytes)),
                    other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
                }
                return;
            }
            let (mut journal, recovered, replayed) = result.expect("recover");
            assert_eq!(
                recovered.tail,
                Tail::Torn {
                    offset: entry_bytes
                }
            );
            assert_eq!(replayed[..], written[..13]);
            assert!(
                !segment_path(&dir, 3).exists(),
                "empty later segment removed"
            );
            let again = batch(14, 128, 9);
            append(&mut journal, std::slice::from_ref(&again), 1).await;
            drop(journal);
            let (_journal, recovered, replayed) = open(config).await.expect("reopen");
            assert_eq!((recovered.op_last, recovered.tail), (14, Tail::Clean));
            assert_eq!(replayed.last(), Some(&again));
        });
    }
}

#[test]
fn corruption_before_the_tail_fails_open_naming_op_segment_offset() {
    let temp = TempDir::new("journal-io", "corrupt");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        let written = batches(1..=10, 3);
        append(&mut journal, &written, 3).await;
        journal.close().await.expect("close");

        let offsets = offsets(&written);
        // A bit in op 4's body.
        flip_bit(&segment_path(&dir, 0), offsets[3] + 128 + 57);
        match open(config).await {
            Err(JournalError::Corrupt {
                shard,
                op,
                segment,
                offset,
                error,
            }) => {
                assert_eq!(
                    (shard, op, segment, offset),
                    (SHARD, 4, 0, offsets[3]),
                    "{error}"
                );
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
        }
    });
}

#[test]
fn corruption_in_a_later_segment_names_that_segment() {
    let temp = TempDir::new("journal-io", "corrupt-segment");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let segment_bytes = 128 * 1024;
        let config = config(&dir, segment_bytes, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        // 16 KiB bodies: 20 KiB entries, six per segment.
        let written: Vec<Batch> = (1..=20).map(|op| batch(op, 128, 4)).collect();
        append(&mut journal, &written, 5).await;
        journal.close().await.expect("close");

        // Op 14 is the second entry of segment 2 (ops 13 to 18).
        flip_bit(&segment_path(&dir, 2), 20 * 1024 + 128 + 5);
        match open(config).await {
            Err(JournalError::Corrupt {
                op,
                segment,
                offset,
                ..
            }) => assert_eq!((op, segment, offset), (14, 2, 20 * 1024)),
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
        }
    });
}

#[test]
fn a_lost_stretch_followed_by_history_beyond_one_read_chunk_is_corruption() {
    let temp = TempDir::new("journal-io", "corrupt-far");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, 16 << 20, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        // 100 entries of 64 KiB + one sector: about 6.5 MiB, more than one 4 MiB read chunk.
        let written: Vec<Batch> = (1..=100).map(|op| batch(op, 512, 5)).collect();
        append(&mut journal, &written, 10).await;
        journal.close().await.expect("close");

        // Zero everything from op 20 to the end of the first read chunk: the first chunk
        // ends cleanly, and only the rest of the segment shows the history after it.
        let offsets = offsets(&written);
        let chunk_end = 4u64 << 20;
        let zeros = vec![0u8; (chunk_end - offsets[19]) as usize];
        overwrite(&segment_path(&dir, 0), offsets[19], &zeros);
        match open(config).await {
            Err(JournalError::Corrupt {
                op,
                segment,
                offset,
                ..
            }) => assert_eq!((op, segment, offset), (20, 0, offsets[19])),
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
        }
    });
}

/// Opens with [`JournalOptions::repair_from_peers`] (a replicated shard).
async fn open_repairing(
    config: JournalConfig,
) -> Result<(Journal, Recovered, Vec<Batch>), JournalError> {
    let mut replayed = Vec::new();
    let options = JournalOptions {
        repair_from_peers: true,
        ..JournalOptions::default()
    };
    let (journal, recovered) = Journal::open_with_options(config, options, |entry| {
        replayed.push(Batch {
            meta: entry.meta,
            body: entry.body.to_vec(),
        });
    })
    .await?;
    assert_eq!(replayed.len() as u64, recovered.entries);
    Ok((journal, recovered, replayed))
}

/// Recovery classification with peers to repair from (`docs/protocol.md` 8): a corrupt
/// entry with valid history after it (below or above the superblock's `op_durable`) cuts the
/// journal there, later segments included, and the replica recovers with the promise raised
/// to the last valid op found after the hole; the promise is durable before the cut, so a
/// restart before the repair recovers again; appending up to it ends recovering.
#[test]
fn with_peers_a_corrupt_entry_is_cut_and_the_replica_recovers_up_to_the_last_valid_op() {
    let temp = TempDir::new("journal-io", "corrupt-repair");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let segment_bytes = 128 * 1024;
        let config = config(&dir, segment_bytes, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        // 16 KiB bodies: 20 KiB entries, six per segment (ops 13 to 18 in segment 2).
        let written: Vec<Batch> = (1..=20).map(|op| batch(op, 128, 9)).collect();
        append(&mut journal, &written[..8], 4).await;
        journal
            .write_superblock()
            .await
            .expect("superblock at op 8");
        append(&mut journal, &written[8..], 4).await;
        journal.close().await.expect("close");

        // Op 5 (at or below op_durable 8): the hole is at op 5, promise 20.
        flip_bit(&segment_path(&dir, 0), 4 * 20 * 1024 + 128 + 9);
        let (journal, recovered, replayed) = open_repairing(config.clone()).await.expect("open");
        assert_eq!(recovered.op_last, 4);
        assert_eq!(replayed, written[..4].to_vec());
        assert!(
            matches!(recovered.tail, Tail::Corrupt { offset, op_expected: 5, .. } if offset == 4 * 20 * 1024),
            "{:?}",
            recovered.tail
        );
        assert_eq!(recovered.recovering, Some(20));
        assert_eq!(journal.op_promised(), 20);
        assert_eq!(journal.superblock().op_durable, 20);
        journal.close().await.expect("close");
        for segment in 1..=3 {
            assert!(
                !segment_path(&dir, segment).exists(),
                "segment {segment} removed"
            );
        }

        // The promise survived: without peers the journal refuses to open, with them it
        // recovers again (the journal now ends cleanly below the promise).
        assert!(matches!(
            open(config.clone()).await,
            Err(JournalError::Corrupt { op: 5, .. })
        ));
        let (mut journal, recovered, _) = open_repairing(config.clone()).await.expect("reopen");
        assert_eq!(
            (recovered.op_last, recovered.tail, recovered.recovering),
            (4, Tail::Clean, Some(20))
        );
        // Repair (the same entries, from a peer): the promise holds again at op 20.
        append(&mut journal, &written[4..19], 5).await;
        assert_eq!(journal.op_promised(), 20);
        append(&mut journal, &written[19..], 1).await;
        assert_eq!(journal.op_promised(), 0);
        journal.close().await.expect("close");
        let (_, recovered, replayed) = open(config).await.expect("repaired");
        assert_eq!((recovered.op_last, recovered.recovering), (20, None));
        assert_eq!(replayed, written);
    });
}

/// A corrupt entry above the superblock's `op_durable` (here 0: never written) with valid
/// entries after it is treated the same way: the entries after it were durable once and may
/// have been acknowledged (no superblock per group commit, D1). A journal that ends below
/// `op_durable` (lost writes) recovers up to it. [`Journal::promise_release`] drops the
/// promise when the replica recovered otherwise.
#[test]
fn with_peers_a_journal_ending_below_op_durable_recovers_and_the_promise_can_be_released() {
    let temp = TempDir::new("journal-io", "lost-repair");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        let written = batches(1..=10, 7);
        append(&mut journal, &written, 3).await;
        journal.close().await.expect("close");
        let offsets = offsets(&written);

        flip_bit(&segment_path(&dir, 0), offsets[6] + 3);
        let (journal, recovered, _) = open_repairing(config.clone()).await.expect("open");
        assert_eq!((recovered.op_last, recovered.recovering), (6, Some(10)));
        assert_eq!(journal.superblock().op_durable, 10);
        // Lost writes: ops 5 and 6 read as zeros now; the journal ends below the promise.
        journal.close().await.expect("close");
        let end = offsets[6];
        overwrite(
            &segment_path(&dir, 0),
            offsets[4],
            &vec![0u8; (end - offsets[4]) as usize],
        );
        let (mut journal, recovered, _) = open_repairing(config.clone()).await.expect("open");
        assert_eq!(
            (recovered.op_last, recovered.tail, recovered.recovering),
            (4, Tail::Clean, Some(10))
        );
        journal.promise_release().await.expect("release");
        assert_eq!(journal.op_promised(), 0);
        assert_eq!(journal.superblock().op_durable, 4);
        journal.close().await.expect("close");
        let (_, recovered, _) = open(config).await.expect("released");
        assert_eq!((recovered.op_last, recovered.recovering), (4, None));
    });
}

#[test]
fn superblock_survives_one_bad_copy_and_guards_op_durable() {
    let temp = TempDir::new("journal-io", "superblock");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        let written = batches(1..=8, 6);
        append(&mut journal, &written[..4], 2).await;
        journal.write_superblock().await.expect("superblock 2");
        append(&mut journal, &written[4..], 2).await;
        journal.write_superblock().await.expect("superblock 3");
        journal.close().await.expect("close");

        // Sequence 3 (op_durable 8) lives in slot 1; damage it: slot 0 (op_durable 4) rules.
        let superblock_path = dir.join(SUPERBLOCK_FILE_NAME);
        flip_bit(&superblock_path, SUPERBLOCK_BYTES as u64 + 40);
        let (journal, recovered, replayed) = open(config.clone()).await.expect("one copy left");
        assert_eq!(recovered.op_last, 8);
        assert_eq!(replayed, written);
        drop(journal);

        // Both copies bad: refuse.
        flip_bit(&superblock_path, 40);
        match open(config.clone()).await {
            Err(JournalError::Superblock { .. }) => {}
            other => panic!("expected Superblock, got {:?}", other.map(|(_, r, _)| r)),
        }
        flip_bit(&superblock_path, 40);

        // The surviving copy says ops up to 4 were durable: a journal that now ends before
        // op 4 has lost acknowledged entries, which is corruption, not a torn tail.
        let offsets = offsets(&written);
        let zeros = vec![0u8; (offsets[7] + 64 * 1024 - offsets[2]) as usize];
        overwrite(&segment_path(&dir, 0), offsets[2], &zeros);
        match open(config).await {
            Err(JournalError::Corrupt { op, offset, .. }) => {
                assert_eq!((op, offset), (3, offsets[2]));
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r, _)| r)),
        }
    });
}

#[test]
fn wrong_cluster_and_bad_inputs_are_refused() {
    let temp = TempDir::new("journal-io", "refuse");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Never);
        let too_small = JournalConfig {
            write_buffer_bytes: 32 * 1024,
            ..config.clone()
        };
        assert!(matches!(
            open(too_small).await,
            Err(JournalError::BatchTooLarge { .. })
        ));
        let unaligned = JournalConfig {
            segment_bytes: 100_000,
            ..config.clone()
        };
        assert!(matches!(
            open(unaligned).await,
            Err(JournalError::Config { .. })
        ));

        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        let one = batch(1, 1, 7);
        let skipped = batch(2, 1, 7);
        assert!(matches!(
            journal.stage(skipped.meta, &skipped.body),
            Err(JournalError::NotNext {
                op: 2,
                op_expected: 1,
                ..
            })
        ));
        let huge = vec![0u8; BODY_BYTES_MAX + 128];
        let huge_meta = EntryMeta {
            entry_count: huge.len() as u32 / RECORD_BYTES,
            ..one.meta
        };
        assert!(matches!(
            journal.stage(huge_meta, &huge),
            Err(JournalError::BatchTooLarge { .. })
        ));
        let short_meta = EntryMeta {
            entry_count: 2,
            ..one.meta
        };
        assert!(matches!(
            journal.stage(short_meta, &one.body),
            Err(JournalError::BodySizeMismatch { .. })
        ));
        // Fill the 1 MiB staging buffer with 64 KiB + 1 sector entries until it refuses.
        let mut op = 1;
        loop {
            let next = batch(op, 512, 7);
            match journal.stage(next.meta, &next.body) {
                Ok(()) => op += 1,
                Err(JournalError::BufferFull { staged_bytes, .. }) => {
                    assert_eq!(staged_bytes, journal.staged_bytes());
                    break;
                }
                Err(error) => panic!("unexpected {error}"),
            }
        }
        assert_eq!(op - 1, (1 << 20) / entry_bytes_padded(512 * 128) as u64);
        assert_eq!(journal.commit().await.expect("commit"), op - 1);
        journal.close().await.expect("close");

        let other_cluster = JournalConfig {
            cluster_id: CLUSTER_ID + 1,
            ..config
        };
        assert!(matches!(
            open(other_cluster).await,
            Err(JournalError::ClusterMismatch { .. })
        ));
    });
}

/// Rounds of the measurement; each case reports the median round.
const MEASURE_ROUNDS: usize = 5;

/// One case of the measurement: what it writes and how.
#[derive(Clone, Copy, Debug)]
enum Case {
    /// Raw glommio O_DIRECT writes of `write_bytes` into a file fallocated (unwritten
    /// extents) or pre-written; `fdatasync` after each write or once at the end.
    Raw {
        write_bytes: usize,
        writes: u64,
        sync_each: bool,
        prewritten: bool,
    },
    /// The journal: 128 KiB batch bodies, `per_commit` batches per group commit.
    Journal {
        fsync: FsyncPolicy,
        per_commit: u64,
        batches: u64,
    },
}

impl Case {
    fn label(self) -> String {
        match self {
            Case::Raw {
                write_bytes,
                sync_each,
                prewritten,
                ..
            } => format!(
                "raw O_DIRECT {} KiB writes, {}, {}",
                write_bytes / 1024,
                if sync_each {
                    "fdatasync each"
                } else {
                    "one fdatasync"
                },
                if prewritten {
                    "pre-written file"
                } else {
                    "fallocated file"
                }
            ),
            Case::Journal {
                fsync, per_commit, ..
            } => format!("journal fsync {fsync:?}, {per_commit} batch(es) per commit"),
        }
    }
}

/// Commit throughput of the journal against the raw disk, measured in the same run,
/// interleaved round by round (the development VM is noisy); medians are reported.
/// `cargo test --release -p percore-shards --test journal_io -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn journal_commit_throughput() {
    let temp = TempDir::new("journal-io", "throughput");
    let root = temp.0.clone();
    std::fs::create_dir_all(&root).expect("temp dir");
    println!(
        "journal commit throughput, 128 KiB batch bodies (132 KiB entries), dir {}",
        root.display()
    );
    for _ in 0..2 {
        raw_dd(&root);
    }
    let entry_bytes = entry_bytes_padded(128 * 1024);
    let cases = [
        Case::Raw {
            write_bytes: 1 << 20,
            writes: 256,
            sync_each: false,
            prewritten: false,
        },
        Case::Raw {
            write_bytes: entry_bytes,
            writes: 512,
            sync_each: true,
            prewritten: false,
        },
        Case::Raw {
            write_bytes: entry_bytes,
            writes: 512,
            sync_each: true,
            prewritten: true,
        },
        Case::Journal {
            fsync: FsyncPolicy::Always,
            per_commit: 1,
            batches: 512,
        },
        Case::Journal {
            fsync: FsyncPolicy::Always,
            per_commit: 8,
            batches: 2048,
        },
        Case::Journal {
            fsync: FsyncPolicy::Never,
            per_commit: 1,
            batches: 2048,
        },
        Case::Journal {
            fsync: FsyncPolicy::Never,
            per_commit: 8,
            batches: 4096,
        },
    ];
    run(move || async move {
        // Per case: (MB/s, operations/s) of every round.
        let mut results = vec![Vec::new(); cases.len()];
        // (MiB of entries, seconds) of every journal reopen.
        let mut recoveries = Vec::new();
        for _ in 0..MEASURE_ROUNDS {
            for (index, case) in cases.iter().enumerate() {
                let result = match *case {
                    Case::Raw {
                        write_bytes,
                        writes,
                        sync_each,
                        prewritten,
                    } => raw_dma(&root, write_bytes, writes, sync_each, prewritten).await,
                    Case::Journal {
                        fsync,
                        per_commit,
                        batches,
                    } => {
                        let result = measure_journal(&root, fsync, per_commit, batches).await;
                        recoveries.push((
                            batches as f64 * entry_bytes as f64 / (1 << 20) as f64,
                            RECOVERY_SECONDS.with(std::cell::Cell::get),
                        ));
                        result
                    }
                };
                results[index].push(result);
            }
        }
        println!(
            "{:<62} {:>9} {:>10}   (median of {MEASURE_ROUNDS}; min..max MB/s)",
            "case", "MB/s", "ops/s"
        );
        for (case, rounds) in cases.iter().zip(&mut results) {
            rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (megabytes, operations) = rounds[rounds.len() / 2];
            println!(
                "{:<62} {megabytes:>9.1} {operations:>10.0}   ({:.0}..{:.0})",
                case.label(),
                rounds[0].0,
                rounds[rounds.len() - 1].0,
            );
        }
        println!("ops/s: writes/s for raw cases, commits/s for the journal");
        recoveries.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for group in recoveries.chunk_by(|a, b| a.0 == b.0) {
            let (mebibytes, seconds) = group[group.len() / 2];
            println!(
                "recovery of {mebibytes:.0} MiB of entries in a 1 GiB segment: {:.0} ms (median of {})",
                seconds * 1e3,
                group.len()
            );
        }
    });
}

/// Returns (MB/s, commits/s).
async fn measure_journal(
    root: &Path,
    fsync: FsyncPolicy,
    per_commit: u64,
    batches: u64,
) -> (f64, f64) {
    let dir = root.join(format!("journal-{fsync:?}-{per_commit}"));
    let _ = std::fs::remove_dir_all(&dir);
    let config = JournalConfig {
        dir: dir.clone(),
        shard: SHARD,
        cluster_id: CLUSTER_ID,
        segment_bytes: SEGMENT_BYTES_DEFAULT,
        body_bytes_max: 128 * 1024,
        fsync,
        write_buffer_bytes: 4 << 20,
    };
    let (mut journal, _) = Journal::open(config.clone(), |_| {}).await.expect("open");
    let body = vec![0x3cu8; 128 * 1024];
    let start = Instant::now();
    let mut commits = 0u64;
    let mut op = 1;
    while op <= batches {
        for _ in 0..per_commit {
            let meta = EntryMeta {
                shard: SHARD,
                view: 0,
                op,
                operation: 1,
                entry_count: 1024,
                record_bytes: 128,
                request_count: 0,
            };
            journal.stage(meta, &body).expect("stage");
            op += 1;
        }
        journal.commit().await.expect("commit");
        commits += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes = batches as f64 * entry_bytes_padded(body.len()) as f64;
    journal.close().await.expect("close");

    // Recovery of what was just written: replay plus the check of the rest of the segment.
    let start = Instant::now();
    let (journal, recovered) = Journal::open(config, |_| {}).await.expect("reopen");
    let recovery_seconds = start.elapsed().as_secs_f64();
    assert_eq!(recovered.op_last, batches);
    journal.close().await.expect("close");
    RECOVERY_SECONDS.with(|cell| cell.set(recovery_seconds));
    let _ = std::fs::remove_dir_all(&dir);
    (bytes / seconds / 1e6, commits as f64 / seconds)
}

thread_local! {
    /// Seconds the last `measure_journal` took to reopen (recover) its journal.
    static RECOVERY_SECONDS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Raw glommio O_DIRECT writes into a file fallocated to 1 GiB like a journal segment
/// (unwritten extents), or with the written range pre-written. Returns (MB/s, writes/s).
async fn raw_dma(
    root: &Path,
    write_bytes: usize,
    writes: u64,
    sync_each: bool,
    prewritten: bool,
) -> (f64, f64) {
    let path = root.join("raw.dat");
    // Data at offset 0 before the DMA open, so glommio's poll-ring probe reads something
    // (see `journal_probe.rs`); the journal's superblock plays that part for the journal.
    std::fs::write(&path, [1u8; 4096]).expect("raw file");
    let total = write_bytes as u64 * writes;
    let file = glommio::io::OpenOptions::new()
        .read(true)
        .write(true)
        .dma_open(&path)
        .await
        .expect("raw open");
    file.pre_allocate(SEGMENT_BYTES_DEFAULT, false)
        .await
        .expect("fallocate");
    if prewritten {
        let chunk = 1 << 20;
        let mut offset = 0;
        while offset < total {
            let length = chunk.min((total - offset) as usize);
            let mut buffer = file.alloc_dma_buffer(length);
            buffer.as_bytes_mut().fill(1);
            file.write_at(buffer, offset).await.expect("prewrite");
            offset += length as u64;
        }
        file.fdatasync().await.expect("prewrite sync");
    }
    let start = Instant::now();
    for index in 0..writes {
        let mut buffer = file.alloc_dma_buffer(write_bytes);
        buffer.as_bytes_mut().fill(0x77);
        let written = file
            .write_at(buffer, index * write_bytes as u64)
            .await
            .expect("raw write");
        assert_eq!(written, write_bytes);
        if sync_each {
            file.fdatasync().await.expect("raw sync");
        }
    }
    if !sync_each {
        file.fdatasync().await.expect("raw sync");
    }
    let seconds = start.elapsed().as_secs_f64();
    file.close().await.expect("raw close");
    let _ = std::fs::remove_file(&path);
    (total as f64 / seconds / 1e6, writes as f64 / seconds)
}

fn raw_dd(root: &Path) {
    let path = root.join("dd.dat");
    let output = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .args(["bs=1M", "count=256", "oflag=direct", "conv=fdatasync"])
        .output();
    match output {
        Ok(output) => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            println!(
                "dd bs=1M count=256 oflag=direct conv=fdatasync: {}",
                stderr.lines().last().unwrap_or("")
            );
        }
        Err(error) => println!("dd unavailable: {error}"),
    }
    let _ = std::fs::remove_file(&path);
}

/// `percore format --replace`: a journal created replacing carries the mark in its first
/// superblock, keeps it through appends, superblock writes and restarts, and loses it only
/// when the replica says it rebuilt (`promise_release`).
#[test]
fn a_replacing_journal_keeps_its_mark_until_released() {
    let temp = TempDir::new("journal-io", "replacing");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let options = JournalOptions {
            repair_from_peers: true,
            replacing: true,
            ..JournalOptions::default()
        };
        let (mut journal, recovered) = Journal::open_with_options(config.clone(), options, |_| {})
            .await
            .expect("create");
        assert!(recovered.replacing && journal.replacing() && journal.created());
        let written = batches(1..=6, 3);
        append(&mut journal, &written, 2).await;
        journal.write_superblock().await.expect("superblock");
        journal.close().await.expect("close");

        // A restart, even one that would not create a replacing journal, keeps the mark.
        let (mut journal, recovered, replayed) =
            open_repairing(config.clone()).await.expect("reopen");
        assert!(recovered.replacing && journal.replacing() && !journal.created());
        assert_eq!(replayed, written);
        journal.promise_release().await.expect("release");
        assert!(!journal.replacing());
        journal.close().await.expect("close");

        let (_, recovered, replayed) = open(config).await.expect("rebuilt");
        assert!(!recovered.replacing);
        assert_eq!((recovered.op_last, replayed), (6, written));
    });
}

#[test]
fn a_hung_test_body_fails_with_the_io_state() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // A body that does not finish while the watchdog waits, holding an io_uring like every
    // journal test: the watchdog of `run` reports it (here with a short limit) instead of
    // waiting for ever. Released afterwards, so its executor does not outlive the test.
    let released = Arc::new(AtomicBool::new(false));
    let watched = released.clone();
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(IO_MEMORY_BYTES_TEST)
        .spawn(move || async move {
            while !watched.load(Ordering::Acquire) {
                glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .expect("executor starts");
    let report = join_within(executor, std::time::Duration::from_millis(300)).unwrap_err();
    released.store(true, Ordering::Release);
    assert!(report.contains("io_uring fd"), "{report}");
    assert!(report.contains("SqHead"), "{report}");
    assert!(report.contains("waiting in"), "{report}");
    // A body that finishes is joined as before.
    let executor = glommio::LocalExecutorBuilder::default()
        .io_memory(IO_MEMORY_BYTES_TEST)
        .spawn(|| async {})
        .expect("executor starts");
    assert_eq!(
        join_within(executor, std::time::Duration::from_secs(60)),
        Ok(())
    );
}

/// A node restarted with smaller batch limits than its journal was written under is
/// refused by name, and its entries stay: read under the smaller limit, every entry after
/// the first large one looked like garbage, and recovery cut them all as a torn write.
#[test]
fn entries_over_a_lowered_limit_are_refused_not_cut() {
    let temp = TempDir::new("journal-io", "over-limit");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let (mut journal, _, _) = open(config.clone()).await.expect("create");
        // Small entries, then ones of 32 KiB bodies (256 records).
        let mut written = batches(1..=4, 5);
        written.extend((5..=24).map(|op| batch(op, 256, 5)));
        append(&mut journal, &written, 3).await;
        // No superblock since the start: as after a crash.
        drop(journal);
        let lowered = JournalConfig {
            body_bytes_max: 16 * 1024,
            ..config.clone()
        };
        match open(lowered).await {
            Err(JournalError::OverLimit {
                op,
                segment,
                body_bytes,
                max,
                ..
            }) => {
                assert_eq!((op, segment, body_bytes, max), (5, 0, 32 * 1024, 16 * 1024));
            }
            other => panic!("opened under a lowered limit: {:?}", other.map(|r| r.1)),
        }
        let (_journal, recovered, replayed) = open(config).await.expect("reopen as written");
        assert_eq!(recovered.op_last, 24);
        assert_eq!(replayed, written);
    });
}

/// `body_bytes_max` admits a quarter more records than the batch cap (a body without
/// request descriptors): an entry holding more records than the state machine can apply
/// is refused by name, at staging (a leader with larger batch limits) and at recovery
/// above the checkpoint (written under larger limits), instead of reaching the state
/// machine, whose buffers hold the cap.
#[test]
fn entries_over_the_record_cap_are_refused_at_staging_and_recovery() {
    let temp = TempDir::new("journal-io", "records-over");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let config = config(&dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let capped = |records_max| JournalOptions {
            records_max,
            ..JournalOptions::default()
        };
        let (mut journal, _) = Journal::open_with_options(config.clone(), capped(256), |_| {})
            .await
            .expect("create");
        let mut written = batches(1..=4, 9);
        written.extend((5..=8).map(|op| batch(op, 256, 9)));
        append(&mut journal, &written, 2).await;
        // Staged as a follower stages a leader's bytes: 257 records fit the body limit.
        let over = batch(9, 257, 9);
        assert!(over.body.len() <= BODY_BYTES_MAX);
        let mut encoded = vec![0u8; entry_bytes_padded(over.body.len())];
        percore_engine::journal::encode_entry(
            &mut encoded,
            &over.meta,
            &over.body,
            journal.checksum_staged(),
        );
        let bytes = percore_engine::journal::ENTRY_HEADER_BYTES + over.body.len();
        match journal.stage_encoded(&encoded[..bytes]) {
            Err(JournalError::RecordsOverLimit {
                op, records, max, ..
            }) => assert_eq!((op, records, max), (9, 257, 256)),
            other => panic!("staged past the record cap: {other:?}"),
        }
        assert_eq!(journal.op_staged(), 8, "nothing staged");
        drop(journal);
        // Reopened with a lower cap, as after lowering --batch-entries-max.
        match Journal::open_with_options(config.clone(), capped(255), |_| {}).await {
            Err(JournalError::RecordsOverLimit {
                op, records, max, ..
            }) => assert_eq!((op, records, max), (5, 256, 255)),
            other => panic!("opened under a lowered cap: {:?}", other.map(|r| r.1)),
        }
        let mut replayed = Vec::new();
        let (_journal, recovered) = Journal::open_with_options(config, capped(256), |entry| {
            replayed.push(Batch {
                meta: entry.meta,
                body: entry.body.to_vec(),
            });
        })
        .await
        .expect("reopen as written");
        assert_eq!(recovered.op_last, 8);
        assert_eq!(replayed, written);
    });
}

/// A journal records the settings digest it was created under and is refused, by name,
/// under another (a node restarted with another `--transfers-max`, say, would replay its
/// ops to another state than the one acknowledged); reopened under its own it replays
/// everything. A journal that recorded none (created without one) takes the first digest
/// it is opened under, from its next superblock write on; opening without a digest checks
/// nothing.
#[test]
fn a_journal_is_refused_under_other_settings_that_decide_results() {
    const WRITTEN: u64 = 0x000a_5e77_1465_0001;
    const OTHER: u64 = 0x000a_5e77_1465_0002;
    let temp = TempDir::new("journal-io", "settings");
    let dir = temp.shard_dir(SHARD);
    let unrecorded_dir = temp.case_shard_dir("unrecorded", SHARD);
    run(move || async move {
        let under = |digest| JournalOptions {
            settings_digest: digest,
            ..JournalOptions::default()
        };
        let open_under = |config: JournalConfig, digest| async move {
            let mut replayed = Vec::new();
            let opened = Journal::open_with_options(config, under(digest), |entry| {
                replayed.push(Batch {
                    meta: entry.meta,
                    body: entry.body.to_vec(),
                });
            })
            .await;
            opened.map(|(journal, recovered)| (journal, recovered, replayed))
        };
        let refused = |opened: Result<(Journal, Recovered, Vec<Batch>), JournalError>,
                       recorded: u64| match opened {
            Err(
                error @ JournalError::SettingsChanged {
                    recorded: found,
                    given,
                    ..
                },
            ) => {
                assert_eq!((found, given), (recorded, OTHER));
                let message = error.to_string();
                assert!(
                    message.contains(&format!("{recorded:013x}"))
                        && message.contains(&format!("{OTHER:013x}"))
                        && message.contains("--session-clients-max"),
                    "{message}"
                );
            }
            other => panic!("opened under other settings: {:?}", other.map(|o| o.1)),
        };
        let config_of = |dir: &Path| config(dir, SEGMENT_BYTES_TEST, FsyncPolicy::Always);
        let config = config_of(&dir);
        let (mut journal, _, _) = open_under(config.clone(), Some(WRITTEN))
            .await
            .expect("create");
        assert_eq!(journal.superblock().settings_digest, WRITTEN);
        let written = batches(1..=12, 4);
        append(&mut journal, &written, 3).await;
        // No superblock write since the first: as after a crash.
        drop(journal);
        refused(open_under(config.clone(), Some(OTHER)).await, WRITTEN);
        let (journal, recovered, replayed) = open_under(config.clone(), Some(WRITTEN))
            .await
            .expect("reopen under its own settings");
        assert_eq!((recovered.op_last, replayed), (12, written.clone()));
        journal.close().await.expect("close");
        let (journal, _, replayed) = open_under(config, None)
            .await
            .expect("no digest checks nothing");
        assert_eq!(replayed, written);
        assert_eq!(journal.superblock().settings_digest, WRITTEN);
        journal.close().await.expect("close");

        // Created without a digest: the first one it is opened under is recorded.
        let config = config_of(&unrecorded_dir);
        let (mut journal, _, _) = open_under(config.clone(), None).await.expect("create");
        assert_eq!(journal.superblock().settings_digest, 0);
        append(&mut journal, &written, 4).await;
        journal.close().await.expect("close");
        let (mut journal, _, replayed) = open_under(config.clone(), Some(WRITTEN))
            .await
            .expect("takes the digest");
        assert_eq!(replayed, written);
        journal.write_superblock().await.expect("superblock");
        journal.close().await.expect("close");
        refused(open_under(config, Some(OTHER)).await, WRITTEN);
    });
}
