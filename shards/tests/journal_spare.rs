//! The journal's spare segment (`percore_shards::journal::SegmentSpare`): the next segment
//! zero-filled ahead of use, renamed into place at a roll-over.
//!
//! What must hold: a roll-over with a spare ready takes it, and the segment it becomes has
//! no unwritten blocks (read with `filefrag`, e2fsprogs: the file system's own extent map),
//! while one created by `fallocate` alone has them; entries written across such roll-overs
//! replay exactly; a spare left by an earlier process is removed at open; a stopped
//! preparer returns.

mod support;

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use percore_engine::journal::{EntryMeta, Tail, segment_file_name};
use percore_shards::journal::{
    FsyncPolicy, Journal, JournalConfig, SEGMENT_SPARE_FILE_NAME, SegmentSpare, SpareStats,
};

use support::{TempDir, run, unwritten_extents};

const SHARD: u32 = 1;
const RECORD_BYTES: u32 = 128;
/// Small segments: a test fills several.
const SEGMENT_BYTES_TEST: u64 = 2 << 20;
/// Records per entry: 64 KiB bodies, 32 entries per segment.
const RECORDS: u32 = 500;

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        shard: SHARD,
        cluster_id: 7,
        segment_bytes: SEGMENT_BYTES_TEST,
        body_bytes_max: 64 * 1024,
        fsync: FsyncPolicy::Always,
        write_buffer_bytes: 1 << 20,
    }
}

fn entry(op: u64) -> (EntryMeta, Vec<u8>) {
    let body = (0..RECORDS as usize * RECORD_BYTES as usize)
        .map(|index| (index as u64).wrapping_mul(13).wrapping_add(op) as u8)
        .collect();
    let meta = EntryMeta {
        shard: SHARD,
        view: 0,
        op,
        operation: 1,
        entry_count: RECORDS,
        record_bytes: RECORD_BYTES,
        request_count: 0,
    };
    (meta, body)
}

/// Appends ops `ops`, one commit each.
async fn append(journal: &mut Journal, ops: std::ops::RangeInclusive<u64>) {
    for op in ops {
        let (meta, body) = entry(op);
        journal.stage(meta, &body).expect("stage");
        assert_eq!(journal.commit().await.expect("commit"), op);
    }
}

/// Waits (on the executor's timer, up to 20 s) until `done`.
async fn until(what: &str, spare: &SegmentSpare, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s: {:?}",
            spare.stats()
        );
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the spare is ready.
async fn until_ready(spare: &SegmentSpare) {
    until("spare ready", spare, || spare.is_ready()).await;
}

/// Runs the spare's preparer beside the journal, publishing its stats to `published`.
fn spawn_preparer(
    spare: &Rc<SegmentSpare>,
    published: impl FnMut(SpareStats) + 'static,
) -> glommio::Task<()> {
    let spare = spare.clone();
    glommio::spawn_local(async move { spare.run(published).await })
}

/// Reopens the journal and checks that it replays exactly ops `1..=op_last`, cleanly.
async fn reopen_replays_exactly(config: JournalConfig, op_last: u64) -> Journal {
    let mut replayed = Vec::new();
    let (journal, recovered) = Journal::open(config, |entry| {
        replayed.push((entry.meta, entry.body.to_vec()));
    })
    .await
    .expect("reopen");
    assert_eq!(recovered.op_last, op_last);
    assert_eq!(recovered.tail, Tail::Clean);
    let expected: Vec<_> = (1..=op_last).map(entry).collect();
    assert_eq!(replayed, expected);
    journal
}

#[test]
fn a_roll_over_takes_the_ready_spare_whose_blocks_are_all_written() {
    let temp = TempDir::new("journal-spare", "rollover");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        let spare = journal.segment_spare();
        let published = Rc::new(std::cell::Cell::new(SpareStats::default()));
        let task = {
            let published = published.clone();
            spawn_preparer(&spare, move |stats| published.set(stats))
        };
        until_ready(&spare).await;
        assert!(dir.join(SEGMENT_SPARE_FILE_NAME).exists());
        // Segment 0 was created by fallocate: unwritten beyond what is appended.
        assert!(unwritten_extents(&dir.join(segment_file_name(0))) > 0);

        // 40 entries of 64 KiB: into segment 1 (32 fit in one segment).
        append(&mut journal, 1..=40).await;
        let stats = spare.stats();
        assert_eq!(stats.switches_prepared, 1, "{stats:?}");
        assert_eq!(stats.switches_unprepared, 0, "{stats:?}");
        let segment_1 = dir.join(segment_file_name(1));
        assert_eq!(
            std::fs::metadata(&segment_1).expect("segment 1").len(),
            SEGMENT_BYTES_TEST
        );
        assert_eq!(
            unwritten_extents(&segment_1),
            0,
            "a segment from a spare has every block written"
        );

        // The preparer goes on with the next spare, and publishes what happened.
        until_ready(&spare).await;
        until("stats published", &spare, || {
            published.get() == spare.stats()
        })
        .await;
        assert_eq!(published.get().prepared, 2);
        append(&mut journal, 41..=70).await;
        assert_eq!(spare.stats().switches_prepared, 2);
        spare.stop();
        task.await;
        journal.close().await.expect("close");

        // Everything replays across the two roll-overs; the spare left behind is removed.
        let _journal = reopen_replays_exactly(config(&dir), 70).await;
        assert!(!dir.join(SEGMENT_SPARE_FILE_NAME).exists());
    });
}

#[test]
fn without_a_spare_the_roll_over_creates_the_segment_by_fallocate() {
    let temp = TempDir::new("journal-spare", "none");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        append(&mut journal, 1..=34).await;
        let stats = journal.segment_spare().stats();
        assert_eq!((stats.switches_prepared, stats.switches_unprepared), (0, 1));
        // The control for the test above: unwritten blocks past the two entries appended.
        assert!(unwritten_extents(&dir.join(segment_file_name(1))) > 0);
    });
}

#[test]
fn a_leftover_spare_is_removed_at_open_and_a_stopped_preparer_returns() {
    let temp = TempDir::new("journal-spare", "leftover");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        let (mut journal, _) = Journal::open(config(&dir), |_| {}).await.expect("create");
        append(&mut journal, 1..=3).await;
        let spare = journal.segment_spare();
        // Stopped as soon as its file exists: the journal is idle, so the spare is written
        // at the idle rate and is still partial.
        let task = spawn_preparer(&spare, |_| {});
        let leftover = dir.join(SEGMENT_SPARE_FILE_NAME);
        until("the spare file is created", &spare, || leftover.exists()).await;
        spare.stop();
        task.await;
        journal.close().await.expect("close");
        assert!(
            leftover.exists(),
            "a partial spare stays until the next open"
        );
        // Garbage in it, as a crash could leave: never read, only removed.
        std::fs::write(&leftover, b"not zeros").expect("damage the leftover");

        let (_journal, recovered) = Journal::open(config(&dir), |_| {}).await.expect("reopen");
        assert_eq!(recovered.op_last, 3);
        assert!(!leftover.exists(), "open removes a leftover spare");
    });
}

#[test]
fn many_roll_overs_onto_spares_keep_every_entry() {
    let temp = TempDir::new("journal-spare", "many");
    let dir = temp.shard_dir(SHARD);
    run(move || async move {
        // Four 64 KiB entries per segment: every fifth append rolls over.
        let config = JournalConfig {
            segment_bytes: 256 << 10,
            ..config(&dir)
        };
        let (mut journal, _) = Journal::open(config.clone(), |_| {}).await.expect("create");
        let spare = journal.segment_spare();
        let task = spawn_preparer(&spare, |_| {});
        let rolls = 20;
        for segment in 0..rolls {
            until_ready(&spare).await;
            append(&mut journal, segment * 4 + 1..=segment * 4 + 4).await;
        }
        until_ready(&spare).await;
        append(&mut journal, rolls * 4 + 1..=rolls * 4 + 1).await;
        let stats = spare.stats();
        assert_eq!(stats.switches_prepared, rolls, "{stats:?}");
        assert_eq!((stats.switches_unprepared, stats.failures), (0, 0));
        spare.stop();
        task.await;
        journal.close().await.expect("close");

        for segment in 1..=rolls {
            let path = dir.join(segment_file_name(segment));
            let bytes = std::fs::metadata(&path).expect("segment").len();
            assert_eq!(bytes, 256 << 10, "segment {segment} is whole");
        }
        reopen_replays_exactly(config, rolls * 4 + 1).await;
    });
}
