//! Checkpoints taken beside the shard, not by it: the checkpoint follower.
//!
//! A checkpoint is the state machine's snapshot at an op `c` ([`checkpoint_due`]: once per
//! interval, shard `k` of `S` at `(c + k × interval / S) % interval == 0`), written as a
//! snapshot file and recorded in the superblock; after it, recovery starts from the snapshot
//! and old segments can be removed. Capturing the *live* state machine stops
//! the shard while the snapshot is taken: at the node's default ledger size that was 137 ms
//! of capture plus 136 ms of file write, every few seconds under load (docs/benchmarks.md).
//!
//! Instead, every journaling shard with checkpoints has a *checkpoint follower*: a thread
//! that owns a second instance of the shard's state machine, built by the same factory, and
//! follows the shard's journal on disk. It reads every op the shard has applied, in order,
//! verifying each entry (header and body checksums, op continuity, the hash chain from the
//! checkpoint it started at), and applies it. State machines are deterministic, so its state
//! after op `c` is the shard's state after op `c`. At a checkpoint op it takes the snapshot
//! and digest, writes the snapshot file (`O_DIRECT`, `fdatasync`, rename, directory sync)
//! and hands the file's header to the shard, whose only work is to record it in the
//! superblock ([`Journal::checkpoint_install`]: one superblock write on its own io_uring).
//! The follower also unlinks the segment and snapshot files the install released (freeing
//! a large pre-allocated file takes milliseconds).
//!
//! What it costs: a second copy of the state in memory, every apply done twice (on another
//! thread) and the journal read back once (`O_DIRECT`, no page cache). What it buys: the
//! shard never stops to snapshot; its checkpoint cost is the superblock write.
//!
//! # Between the shard and its follower (no locks)
//! * `applied_op` (shard → follower): the highest op the shard has applied. Every op up to
//!   it is committed and durable, so it is never truncated or rewritten: the follower may
//!   read it from the journal at any time.
//! * `written` (follower → shard): a one-slot SPSC ring carrying a written snapshot file's
//!   header.
//! * `installed_op` (shard → follower): the checkpoint now in the superblock, with the
//!   segment and snapshot files it released (stored before it). The follower
//!   starts the next checkpoint only once the previous one is installed, so at most one
//!   snapshot file waits, and the segments the follower still has to read are never removed
//!   (removal stays below the superblock's *previous* checkpoint).
//! * `started` (follower → shard): the follower has built its state machine, restored it
//!   from the checkpoint and taken its buffers. The shard reports itself ready only after
//!   that, so that no load meets the follower's start-up (at the node's defaults a second
//!   ledger and a 130 MB snapshot buffer, page-faulted in beside the shard).
//! * `failure` (follower → shard): why the follower stopped (an unreadable journal entry, a
//!   snapshot that cannot be written). The shard stops the process on it, as it does when
//!   a checkpoint or a journal write fails.
//!
//! A follower that falls behind by more than an interval skips the checkpoint ops in
//! between and captures only the newest checkpoint op at or below `applied_op`
//! ([`checkpoint_at_or_below`]) when it chose its target: checkpoints then land less often,
//! never at an op the shard has not applied.
//!
//! # The node's disk (no shard takes part)
//! Snapshots are large (130 MB at the node's defaults). Two things keep a node's followers
//! from writing them all at once beside the journals' `fdatasync`s:
//! * **Staggered checkpoints.** Shard `k` of `S` checkpoints `k × interval / S` ops before
//!   the multiples of the interval, so under even load the followers of one node reach their
//!   checkpoint ops one after another. (Shard `k` of every replica uses the same offset:
//!   replicas are on different hosts.)
//! * **One write budget per node** ([`SnapshotWriteBudget`], `--snapshot-write-mib-per-s`):
//!   followers that still write at the same time (uneven load, one catching up) share it
//!   instead of each writing at the full rate. It is one atomic taken by follower threads
//!   only; a shard never touches it.
//!
//! [`Journal::checkpoint_install`]: crate::journal::Journal::checkpoint_install

#![deny(unsafe_code)]

use percore_engine::journal::request_descriptors;
use percore_engine::session::{RequestDescriptor, descriptors_valid};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use percore_engine::journal::{
    self as format, Checkpoint, EntryMeta, JournalChecksum, SECTOR_BYTES, SNAPSHOT_HEADER_BYTES,
    SnapshotMeta, Superblock,
};
use percore_engine::ring::spsc;
use percore_engine::state_machine::StateMachine;

use crate::journal::SNAPSHOT_TEMPORARY_SUFFIX;
use crate::metrics::ShardMetrics;

/// How long the follower sleeps when it has caught up with the shard (µs). It need only
/// keep up, not follow closely: at 1 ms the six followers of a local 3-replica cluster woke
/// 6,000 times a second between them, and a near-idle cluster on 2 vCPUs was busy 14-15 %
/// of the time instead of 11-12 %.
pub const FOLLOW_POLL_US: u64 = 10_000;
/// Bytes of the staging buffer the snapshot file is written through (`O_DIRECT`).
pub const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Default of the node's snapshot write budget, `--snapshot-write-mib-per-s` (MiB/s), shared
/// by all its followers ([`SnapshotWriteBudget`]). Unpaced, a 130 MB snapshot written at once
/// queued ahead of the journal's writes and stalled commits for seconds on a shared disk;
/// paced per follower, 12 followers checkpointing together still wrote 1.5 GB/s.
pub const SNAPSHOT_WRITE_MIB_PER_S_DEFAULT: u64 = 128;
/// Reads of one entry before the follower gives up on it. An applied op is durable, so the
/// first read finds it; the retries only cover a segment switch seen mid-way.
pub const READ_ATTEMPTS_MAX: u32 = 100;
/// Pause between those reads (µs).
pub const READ_RETRY_US: u64 = 10_000;
/// Bytes a released segment or snapshot file shrinks by per step before it is unlinked
/// ([`file_release`]). The file system frees a file's blocks in the journal commit of the
/// call that drops them (and, mounted with `-o discard`, discards them there too); every
/// journal's `fdatasync` on that file system waits for that commit. Unlinking a 256 MiB
/// segment at once held those commits for about 40 ms, three nodes releasing a checkpoint's
/// segments together for over 120 ms (docs/benchmarks.md, "Releasing checkpointed
/// segments"); in 4 MiB steps each wait is one step's.
pub const RELEASE_STEP_BYTES: u64 = 4 << 20;
/// Pause after each step (µs), so that the commits of the shards' `fdatasync`s come between
/// the steps': about 1.7 GiB/s of released files per follower.
pub const RELEASE_STEP_PAUSE_US: u64 = 2_000;
/// Name of the spare snapshot file in a shard's journal directory: the snapshot a
/// checkpoint released, kept for the follower's next snapshot write to overwrite in place
/// instead of being removed ([`snapshot_keep_as_spare`]). Its blocks are allocated and
/// written, so the next snapshot neither allocates blocks nor converts extents, and no
/// release frees (or, mounted with `-o discard`, discards) them: on a 16-core machine the
/// seconds with a release were the checkpoint seconds that slowed commits
/// (docs/benchmarks.md, "Sixth lease"). It is never a snapshot any checkpoint names, so
/// recovery never reads it; at most one is kept, beside the retained snapshots.
pub const SNAPSHOT_SPARE_FILE_NAME: &str = "snapshot.spare";

/// Adds the wall time of a long follower activity (a snapshot file write, a file release)
/// to a counter as it goes, a step at a time, so that a scrape in the middle of it already
/// counts what has passed: the soak's per-second series can then say which second a write
/// or a release took place in, not only the second it ended in.
struct TimeSpent<'a> {
    counter: &'a AtomicU64,
    mark: Instant,
}

impl<'a> TimeSpent<'a> {
    fn start(counter: &'a AtomicU64) -> Self {
        Self {
            counter,
            mark: Instant::now(),
        }
    }

    /// Adds the time since the last step (µs).
    fn step(&mut self) {
        let now = Instant::now();
        ShardMetrics::add(self.counter, (now - self.mark).as_micros() as u64);
        self.mark = now;
    }
}

const _: () = assert!(WRITE_BUFFER_BYTES.is_multiple_of(SECTOR_BYTES));

/// One sector, aligned for `O_DIRECT` transfers: buffers are slices of these.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
struct Sector([u8; SECTOR_BYTES]);

/// A zeroed, sector-aligned buffer of `bytes` (rounded up to a sector).
fn sectors(bytes: usize) -> Vec<Sector> {
    vec![Sector([0; SECTOR_BYTES]); bytes.div_ceil(SECTOR_BYTES)]
}

/// How far shard `shard` of `shard_count` shifts its checkpoints within an interval (ops,
/// below `interval_ops`): `shard × interval_ops / shard_count`, so the shards of a node
/// checkpoint evenly spread over the interval instead of all at once.
pub fn checkpoint_offset_ops(shard: usize, shard_count: usize, interval_ops: u64) -> u64 {
    assert!(shard < shard_count && interval_ops > 0);
    let offset = u128::from(interval_ops) * shard as u128 / shard_count as u128;
    debug_assert!(offset < u128::from(interval_ops));
    offset as u64
}

/// Whether shard `shard` of `shard_count` takes a checkpoint at `op`: the staggered rule
/// `(op + checkpoint_offset_ops) % interval_ops == 0`, `op > 0`. Shard 0 checkpoints at the
/// multiples of the interval; shard `k` `k × interval_ops / shard_count` ops before them.
pub fn checkpoint_due(op: u64, shard: usize, shard_count: usize, interval_ops: u64) -> bool {
    let offset = checkpoint_offset_ops(shard, shard_count, interval_ops);
    op > 0 && (u128::from(op) + u128::from(offset)).is_multiple_of(u128::from(interval_ops))
}

/// The newest op at or below `op` at which the shard checkpoints by [`checkpoint_due`]
/// (0: none).
pub fn checkpoint_at_or_below(op: u64, shard: usize, shard_count: usize, interval_ops: u64) -> u64 {
    let offset = u128::from(checkpoint_offset_ops(shard, shard_count, interval_ops));
    let interval = u128::from(interval_ops);
    let shifted = (u128::from(op) + offset) / interval * interval;
    let newest = shifted.saturating_sub(offset) as u64;
    debug_assert!(newest <= op);
    debug_assert!(newest == 0 || checkpoint_due(newest, shard, shard_count, interval_ops));
    newest
}

/// The snapshot write budget of one node (`--snapshot-write-mib-per-s`), shared by all its
/// checkpoint followers, so that N followers writing at once share one rate instead of
/// multiplying it. A token bucket without burst, kept as one atomic: the time at which the
/// budget is next free. A writer reserves its chunk's share of time after that point (or
/// after now, if the budget sat idle) and waits until its reservation starts; concurrent
/// writers interleave chunk by chunk in the order they reserved. Only follower threads take
/// from it, never a shard.
pub struct SnapshotWriteBudget {
    bytes_per_s: u64,
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the last reservation ends.
    free_at_ns: AtomicU64,
}

impl std::fmt::Debug for SnapshotWriteBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriteBudget")
            .field("bytes_per_s", &self.bytes_per_s)
            .finish_non_exhaustive()
    }
}

impl SnapshotWriteBudget {
    /// A budget of `bytes_per_s` (nonzero) for the whole node.
    pub fn new(bytes_per_s: u64) -> Self {
        assert!(
            bytes_per_s > 0,
            "a snapshot write budget of 0 bytes/s never writes"
        );
        SnapshotWriteBudget {
            bytes_per_s,
            epoch: Instant::now(),
            free_at_ns: AtomicU64::new(0),
        }
    }

    /// The node's rate (bytes/s).
    pub fn bytes_per_s(&self) -> u64 {
        self.bytes_per_s
    }

    /// Reserves `bytes` of the budget at `now_ns` (after the epoch) and returns when the
    /// reservation starts (ns after the epoch, at or after `now_ns`).
    fn reserve(&self, bytes: u64, now_ns: u64) -> u64 {
        let cost_ns = (u128::from(bytes) * 1_000_000_000 / u128::from(self.bytes_per_s)) as u64;
        // Relaxed is enough: the value is only a time, it publishes no other memory, and the
        // read-modify-write alone makes concurrent reservations disjoint.
        let previous = self
            .free_at_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free_at_ns| {
                Some(free_at_ns.max(now_ns).saturating_add(cost_ns))
            })
            .expect("the update always returns Some");
        let start = previous.max(now_ns);
        debug_assert!(start >= now_ns);
        start
    }

    /// Waits until `bytes` may be written: returns once the budget's earlier reservations,
    /// from this and every other follower of the node, have had their time. Returns the
    /// time waited.
    pub fn take(&self, bytes: u64) -> Duration {
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        let wait = Duration::from_nanos(self.reserve(bytes, now_ns) - now_ns);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        wait
    }
}

/// Why the follower stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot file of the checkpoint the follower starts from does not verify.
    #[error("{path}: {error}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What verification found.
        error: format::SnapshotError,
    },
    /// The state machine refused that snapshot, or restored it to another digest.
    #[error("{path}: restore: {error}")]
    Restore {
        /// The snapshot file.
        path: PathBuf,
        /// The state machine's reason.
        error: percore_engine::state_machine::RestoreError,
    },
    /// An op the shard applied could not be found in the journal, verified, where it
    /// must be.
    #[error(
        "op {op} not found in the journal after {attempts} reads (segment {segment}, \
         offset {offset}): {error}"
    )]
    EntryMissing {
        /// The op.
        op: u64,
        /// Where it was expected.
        segment: u64,
        /// See `segment`.
        offset: u64,
        /// Reads tried.
        attempts: u32,
        /// What the last read found there.
        error: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FollowerError + '_ {
    move |source| FollowerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a shard's journal forward from a checkpoint with blocking `O_DIRECT` reads,
/// verifying every entry: header and body checksums, op continuity and the hash chain.
/// Entries follow each other in a segment; one that does not fit the rest of a segment
/// starts the next segment at offset 0.
pub struct JournalReader {
    dir: PathBuf,
    body_bytes_max: usize,
    /// Segment and file offset of the next entry (as far as known: it may be at offset 0
    /// of the next segment instead).
    segment: u64,
    offset: u64,
    /// The op the next entry must carry, and the checksum it must chain to.
    op_next: u64,
    chain: JournalChecksum,
    /// The open segment file, and its index.
    file: Option<(u64, File)>,
    buffer: Vec<Sector>,
    /// File offset of `buffer[0]` and the valid bytes from there (in `segment_read`).
    buffer_offset: u64,
    buffer_len: usize,
    segment_read: u64,
}

impl std::fmt::Debug for JournalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReader")
            .field("dir", &self.dir)
            .field("segment", &self.segment)
            .field("offset", &self.offset)
            .field("op_next", &self.op_next)
            .finish_non_exhaustive()
    }
}

/// What [`JournalReader::entry_at`] found at a position.
enum Found {
    /// The expected entry: its header and body start at this index in the buffer's bytes,
    /// and it occupies this many bytes on disk (padded).
    Entry { start: usize, padded: usize },
    /// Something else (why, for the error message).
    Not(String),
}

impl JournalReader {
    /// A reader of the journal in `dir` whose next entry is the one after `start`.
    pub fn new(dir: &Path, body_bytes_max: usize, start: Checkpoint) -> Self {
        JournalReader {
            dir: dir.to_path_buf(),
            body_bytes_max,
            segment: start.segment,
            offset: start.offset,
            op_next: start.op + 1,
            chain: start.checksum,
            file: None,
            // One largest entry: the reader reads one entry at a time.
            buffer: sectors(format::entry_bytes_padded(body_bytes_max)),
            buffer_offset: 0,
            buffer_len: 0,
            segment_read: u64::MAX,
        }
    }

    /// The op [`JournalReader::next_entry`] returns next.
    pub fn op_next(&self) -> u64 {
        self.op_next
    }

    /// Segment and file offset of the next entry, as far as known (it may turn out to
    /// start the next segment).
    pub fn position(&self) -> (u64, u64) {
        (self.segment, self.offset)
    }

    /// The checksum of the last entry returned (the chain value after it).
    pub fn chain(&self) -> JournalChecksum {
        self.chain
    }

    /// Reads, verifies and returns entry `op_next` (its header's fields and body). The op
    /// must be durable in the journal; a read that does not find it is retried
    /// ([`READ_ATTEMPTS_MAX`] times, [`READ_RETRY_US`] apart) before it is an error.
    pub fn next_entry(&mut self) -> Result<(EntryMeta, &[u8]), FollowerError> {
        let mut attempts = 0;
        let (start, padded) = loop {
            attempts += 1;
            let fresh = attempts > 1;
            let here = self.entry_at(self.segment, self.offset, fresh)?;
            let why = match here {
                Found::Entry { start, padded } => break (start, padded),
                Found::Not(why) => why,
            };
            // Not here: the entry did not fit this segment and starts the next one.
            if self.offset > 0
                && self.segment_exists(self.segment + 1)
                && let Found::Entry { start, padded } = self.entry_at(self.segment + 1, 0, fresh)?
            {
                self.segment += 1;
                self.offset = 0;
                break (start, padded);
            }
            if attempts >= READ_ATTEMPTS_MAX {
                return Err(FollowerError::EntryMissing {
                    op: self.op_next,
                    segment: self.segment,
                    offset: self.offset,
                    attempts,
                    error: why,
                });
            }
            std::thread::sleep(Duration::from_micros(READ_RETRY_US));
        };
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer);
        let entry = format::decode_entry(&bytes[start..self.buffer_len], self.body_bytes_max)
            .expect("entry_at verified it");
        let (meta, checksum) = (entry.meta, entry.checksum);
        let body = start + format::ENTRY_HEADER_BYTES
            ..start + format::ENTRY_HEADER_BYTES + entry.body.len();
        self.op_next += 1;
        self.chain = checksum;
        self.offset += padded as u64;
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer);
        Ok((meta, &bytes[body]))
    }

    fn segment_exists(&self, segment: u64) -> bool {
        self.dir.join(format::segment_file_name(segment)).exists()
    }

    /// Whether the expected entry lies at `offset` of `segment`, reading from disk if the
    /// buffer does not hold it (or always, if `fresh`).
    fn entry_at(&mut self, segment: u64, offset: u64, fresh: bool) -> Result<Found, FollowerError> {
        let header = format::ENTRY_HEADER_BYTES;
        if fresh || !self.buffered(segment, offset, header) {
            self.fill(segment, offset, header)?;
        }
        let start = (offset - self.buffer_offset) as usize;
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer);
        let header = match format::decode_entry_header(
            &bytes[start..self.buffer_len],
            self.body_bytes_max,
        ) {
            Ok(header) => header,
            Err(error) => return Ok(Found::Not(error.to_string())),
        };
        if header.op != self.op_next {
            return Ok(Found::Not(format!("op {} there", header.op)));
        }
        if header.checksum_previous != self.chain {
            return Ok(Found::Not("hash chain broken".into()));
        }
        let padded = format::entry_bytes_padded(header.body_bytes as usize);
        let whole = format::ENTRY_HEADER_BYTES + header.body_bytes as usize;
        if !self.buffered(segment, offset, whole) {
            self.fill(segment, offset, whole)?;
        }
        let start = (offset - self.buffer_offset) as usize;
        let bytes: &[u8] = bytemuck::cast_slice(&self.buffer);
        match format::decode_entry(&bytes[start..self.buffer_len], self.body_bytes_max) {
            Ok(entry) if entry.meta.op == self.op_next && entry.checksum_previous == self.chain => {
                Ok(Found::Entry { start, padded })
            }
            Ok(_) => Ok(Found::Not("the entry changed between reads".into())),
            Err(error) => Ok(Found::Not(error.to_string())),
        }
    }

    /// Whether the buffer holds `bytes` bytes at `offset` of `segment`.
    fn buffered(&self, segment: u64, offset: u64, bytes: usize) -> bool {
        self.segment_read == segment
            && offset >= self.buffer_offset
            && offset + bytes as u64 <= self.buffer_offset + self.buffer_len as u64
    }

    /// Reads `wanted` bytes (rounded up to a sector) of `segment` from `offset` (sector
    /// aligned). Never more: past the entry asked for, the shard may be writing, and a
    /// read of a region being written and synced makes that `fdatasync` wait for it.
    fn fill(&mut self, segment: u64, offset: u64, wanted: usize) -> Result<(), FollowerError> {
        debug_assert!(offset.is_multiple_of(SECTOR_BYTES as u64));
        let path = self.dir.join(format::segment_file_name(segment));
        if self.file.as_ref().is_none_or(|(open, _)| *open != segment) {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .map_err(io_error(&path))?;
            self.file = Some((segment, file));
        }
        let (_, file) = self.file.as_ref().expect("opened above");
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.buffer);
        let length = wanted.next_multiple_of(SECTOR_BYTES).min(bytes.len());
        let bytes = &mut bytes[..length];
        let mut filled = 0;
        // Bounded: each turn reads at least one byte or ends the loop.
        while filled < bytes.len() {
            match file.read_at(&mut bytes[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(io_error(&path)(error)),
            }
        }
        self.segment_read = segment;
        self.buffer_offset = offset;
        self.buffer_len = filled;
        Ok(())
    }
}

/// Writes snapshot file `meta.op` in `dir` durably under its final name, in the format
/// the journal reads (header, snapshot, zero padding to a sector): into a temporary file
/// through `staging` with `O_DIRECT`, `fdatasync`, rename, directory sync.
fn snapshot_file_write(
    dir: &Path,
    meta: &SnapshotMeta,
    snapshot: &[u8],
    staging: &mut [Sector],
    budget: &SnapshotWriteBudget,
    spent: &AtomicU64,
    stopping: impl Fn() -> bool,
) -> Result<bool, FollowerError> {
    let mut spent = TimeSpent::start(spent);
    let name = format::snapshot_file_name(meta.op);
    let path = dir.join(&name);
    let path_temporary = dir.join(format!("{name}{SNAPSHOT_TEMPORARY_SUFFIX}"));
    // A spare (a released snapshot) becomes this write's file, overwritten from the start.
    let spare = dir.join(SNAPSHOT_SPARE_FILE_NAME);
    let reused = match std::fs::rename(&spare, &path_temporary) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => return Err(io_error(&spare)(error)),
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!reused)
        .custom_flags(libc::O_DIRECT)
        .open(&path_temporary)
        .map_err(io_error(&path_temporary))?;
    // A write left unfinished: its file goes back to being the spare if it was one, or is
    // removed (a start removes any temporary file it finds too). "Not written".
    let abandon = |file: File| {
        drop(file);
        if reused {
            std::fs::rename(&path_temporary, &spare).map_err(io_error(&spare))?;
        } else {
            file_remove(&path_temporary)?;
        }
        Ok::<bool, FollowerError>(false)
    };
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    format::encode_snapshot_header(meta, &mut header);
    let staging: &mut [u8] = bytemuck::cast_slice_mut(staging);
    let mut file_offset = 0u64;
    let mut staged = 0;
    let mut flush = |staging: &mut [u8], staged: usize, file_offset: &mut u64| {
        // A follower told to stop leaves a write it has not finished (the shard joins it
        // on its own thread: shutdown, a state sync's switch): a 130 MB snapshot at a
        // shared budget takes seconds, during which the shard answered nothing.
        if stopping() {
            return Ok(false);
        }
        // The last chunk is padded with zeros to a sector.
        let padded = staged.next_multiple_of(SECTOR_BYTES);
        staging[staged..padded].fill(0);
        // Paced by the node's budget: a burst of snapshot writes queues ahead of the
        // shards' journal writes and their fdatasyncs wait behind them.
        budget.take(padded as u64);
        file.write_all_at(&staging[..padded], *file_offset)
            .map_err(io_error(&path_temporary))?;
        *file_offset += padded as u64;
        spent.step();
        Ok::<bool, FollowerError>(true)
    };
    for part in [&header[..], snapshot] {
        let mut rest = part;
        // Bounded: every turn stages at least one byte or flushes a full buffer.
        while !rest.is_empty() {
            let take = rest.len().min(staging.len() - staged);
            staging[staged..staged + take].copy_from_slice(&rest[..take]);
            staged += take;
            rest = &rest[take..];
            if staged == staging.len() {
                if !flush(staging, staged, &mut file_offset)? {
                    return abandon(file);
                }
                staged = 0;
            }
        }
    }
    if staged > 0 && !flush(staging, staged, &mut file_offset)? {
        return abandon(file);
    }
    debug_assert_eq!(file_offset, meta.file_bytes());
    // A longer spare's older bytes beyond this snapshot go (a snapshot grows with the state
    // it holds, so this is rare and small).
    if reused && file.metadata().map_err(io_error(&path_temporary))?.len() > file_offset {
        file.set_len(file_offset)
            .map_err(io_error(&path_temporary))?;
    }
    file.sync_data().map_err(io_error(&path_temporary))?;
    spent.step();
    drop(file);
    std::fs::rename(&path_temporary, &path).map_err(io_error(&path))?;
    let synced = File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error(dir));
    spent.step();
    synced.map(|()| true)
}

/// A snapshot file the follower wrote, for the shard to install.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Its header (op, checksums, digest).
    pub meta: SnapshotMeta,
    /// Where the entry after the checkpoint's op starts in the journal, as the follower
    /// read it (segment, file offset): the superblock's checkpoint position.
    pub position_after: (u64, u64),
    /// Time to snapshot and digest the follower's state machine (µs).
    pub capture_us: u64,
    /// Time to checksum, write and sync the file (µs).
    pub write_us: u64,
}

/// What the shard and its follower share.
#[derive(Debug, Default)]
struct Shared {
    applied_op: AtomicU64,
    installed_op: AtomicU64,
    /// Set with `installed_op` (before it): segment files below this index and this
    /// snapshot file (by op, 0: none) are no longer part of the journal; the follower
    /// removes them.
    segments_below: AtomicU64,
    snapshot_stale_op: AtomicU64,
    /// Driven follower: the op to checkpoint next (0: none).
    requested_op: AtomicU64,
    /// Offered segments the journal has taken ([`CheckpointFollower::recycled_taken`]).
    recycled_taken: AtomicU64,
    stop: AtomicBool,
    /// The follower has its state machine and buffers ([`CheckpointFollower::started`]).
    started: AtomicBool,
    failure: OnceLock<String>,
}

/// What the follower needs to know of its shard.
#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// The shard's index.
    pub shard: usize,
    /// Shards of the node: checkpoints are staggered over them ([`checkpoint_due`]).
    pub shard_count: usize,
    /// The shard's journal directory.
    pub dir: PathBuf,
    /// The cluster, for the snapshot header.
    pub cluster_id: u128,
    /// Largest batch body (bytes).
    pub body_bytes_max: usize,
    /// A checkpoint every this many ops (nonzero), at the ops [`checkpoint_due`] names.
    pub interval_ops: u64,
    /// The node's snapshot write budget, shared with the other shards' followers.
    pub write_budget: Arc<SnapshotWriteBudget>,
    /// Checkpoint only at the ops the shard asks for ([`CheckpointFollower::request`]), not
    /// at the ops [`checkpoint_due`] names: BFT mode, where every replica must snapshot the
    /// same states (the journal op reached at each snapshot BFT op) for `2f + 1` of them to
    /// certify one.
    pub driven: bool,
    /// Cores the follower thread runs on ([`crate::affinity::helper_cores`]): spawned by
    /// the shard, it would otherwise inherit the shard's own core. Empty: left as inherited.
    pub cores: Vec<usize>,
    /// Offer released segments for reuse ([`CheckpointFollower::recycled_pop`], for
    /// [`crate::journal::Journal::recycled_add`]) instead of removing them: at most this many
    /// offered and not yet taken by a roll-over ([`CheckpointFollower::recycled_taken`]) at
    /// a time (at most [`crate::journal::SEGMENTS_RECYCLED_MAX`]); the rest are removed.
    /// 0: remove them all.
    pub recycle_max: usize,
}

/// The shard's side: where it publishes what it applied and collects written snapshots.
/// Dropping it stops the follower and waits for it (it finishes a snapshot it is writing).
pub struct CheckpointFollower {
    shared: Arc<Shared>,
    written: spsc::Consumer<Written>,
    /// Released segments offered for reuse, oldest first.
    recycled: spsc::Consumer<u64>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CheckpointFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointFollower")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl CheckpointFollower {
    /// Starts the follower thread of a shard whose journal was opened with `superblock`
    /// and whose state machine has applied `applied_op`. `make` builds the follower's
    /// state machine (on the follower's thread), configured exactly as the shard's.
    pub fn spawn<S, F>(
        config: FollowerConfig,
        superblock: Superblock,
        applied_op: u64,
        metrics: Arc<ShardMetrics>,
        make: F,
    ) -> std::io::Result<Self>
    where
        S: StateMachine,
        F: FnOnce() -> S + Send + 'static,
    {
        assert!(config.interval_ops > 0, "no follower without checkpoints");
        assert!(config.shard < config.shard_count);
        let shared = Arc::new(Shared::default());
        shared.applied_op.store(applied_op, Ordering::Release);
        shared
            .installed_op
            .store(superblock.checkpoint.op, Ordering::Release);
        let (producer, written) = spsc::channel(1);
        let (recycled_producer, recycled) = spsc::channel(crate::journal::SEGMENTS_RECYCLED_MAX);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("checkpoint-{}", config.shard))
            .spawn(move || {
                let shard = config.shard;
                if let Err(error) = crate::affinity::confine_current(&config.cores) {
                    tracing::warn!(shard, cores = ?config.cores, %error, "checkpoint follower: affinity not set");
                }
                let mut follower = Follower {
                    config,
                    shared: thread_shared.clone(),
                    metrics,
                    written: producer,
                    recycled: recycled_producer,
                    recycled_offered: 0,
                };
                if let Err(error) = follower.run(make(), &superblock) {
                    tracing::error!(shard, %error, "checkpoint follower stopped");
                    let _ = thread_shared.failure.set(error.to_string());
                }
            })?;
        Ok(CheckpointFollower {
            shared,
            written,
            recycled,
            thread: Some(thread),
        })
    }

    /// Driven follower ([`FollowerConfig::driven`]): checkpoint at `op`, which the shard has
    /// staged but not applied yet (so the follower has not passed it). A request not taken
    /// before the next one replaces it is skipped.
    pub fn request(&self, op: u64) {
        self.shared.requested_op.fetch_max(op, Ordering::Release);
    }

    /// The shard has applied every op up to `op`.
    pub fn note_applied(&self, op: u64) {
        self.shared.applied_op.fetch_max(op, Ordering::Release);
    }

    /// How many offered segments the journal has taken for roll-overs
    /// ([`crate::journal::Journal::recycled_taken`]): the follower offers more only while
    /// fewer than [`FollowerConfig::recycle_max`] wait.
    pub fn recycled_taken(&self, taken: u64) {
        self.shared.recycled_taken.store(taken, Ordering::Release);
    }

    /// The oldest released segment the follower offers for reuse, if any: its file keeps
    /// its name until the journal renames it at a roll-over, and the follower no longer
    /// touches it.
    pub fn recycled_pop(&mut self) -> Option<u64> {
        self.recycled.pop()
    }

    /// Whether the follower has built and restored its state machine and taken its
    /// buffers; why it stopped, if it stopped before that.
    pub fn started(&self) -> Result<bool, String> {
        if self.shared.started.load(Ordering::Acquire) {
            return Ok(true);
        }
        // A follower that fails sets `failure` and then ends its thread.
        if self
            .thread
            .as_ref()
            .is_none_or(|thread| thread.is_finished())
        {
            return Err(self.shared.failure.get().cloned().unwrap_or_else(|| {
                "the checkpoint follower thread ended before it started".into()
            }));
        }
        Ok(false)
    }

    /// A written snapshot file waiting to be installed, or why the follower stopped.
    pub fn poll(&mut self) -> Result<Option<Written>, String> {
        if let Some(written) = self.written.pop() {
            return Ok(Some(written));
        }
        match self.shared.failure.get() {
            Some(failure) => Err(failure.clone()),
            None => Ok(None),
        }
    }

    /// Checkpoint `op` is in the superblock: the follower may take the next one. It also
    /// removes the files the journal released with it: segments below `segments_below` and
    /// the snapshot of `snapshot_stale_op` (0: none).
    pub fn installed(&self, op: u64, segments_below: u64, snapshot_stale_op: u64) {
        self.shared
            .segments_below
            .store(segments_below, Ordering::Relaxed);
        self.shared
            .snapshot_stale_op
            .store(snapshot_stale_op, Ordering::Relaxed);
        self.shared.installed_op.store(op, Ordering::Release);
    }
}

impl Drop for CheckpointFollower {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The follower thread's state.
struct Follower {
    config: FollowerConfig,
    shared: Arc<Shared>,
    metrics: Arc<ShardMetrics>,
    written: spsc::Producer<Written>,
    recycled: spsc::Producer<u64>,
    /// Segments offered through `recycled` since spawn.
    recycled_offered: u64,
}

impl Follower {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// Restores the checkpoint `superblock` names, then follows the shard until told to stop.
    fn run<S: StateMachine>(
        &mut self,
        mut machine: S,
        superblock: &Superblock,
    ) -> Result<(), FollowerError> {
        let start = superblock.checkpoint;
        if start.op > 0 {
            restore(&self.config.dir, superblock, &mut machine)?;
        }
        let mut reader = JournalReader::new(&self.config.dir, self.config.body_bytes_max, start);
        let record_bytes = size_of::<S::Record>();
        let records_max = self.config.body_bytes_max / record_bytes;
        let mut records: Vec<S::Record> = vec![bytemuck::Zeroable::zeroed(); records_max];
        let mut results: Vec<S::Result> = vec![bytemuck::Zeroable::zeroed(); records_max];
        let mut requests = vec![RequestDescriptor::default(); records_max];
        // Sized and touched now, so that memory is taken at start-up, not at the first
        // checkpoint under load.
        // (A nonzero fill: a zeroed allocation may be mapped lazily and touch nothing.)
        let mut snapshot = vec![1u8; machine.snapshot_bytes_max().unwrap_or(0)];
        snapshot.clear();
        let mut staging = sectors(WRITE_BUFFER_BYTES);
        self.shared.started.store(true, Ordering::Release);
        let interval = self.config.interval_ops;
        let (shard, shard_count) = (self.config.shard, self.config.shard_count);
        let mut segment_next = segment_lowest(&self.config.dir)?;
        let mut niced = false;
        // Bounded by `stop`: every turn applies an op, writes a checkpoint, or sleeps.
        while !self.stopping() {
            let applied = self.shared.applied_op.load(Ordering::Acquire);
            let op = reader.op_next() - 1;
            // Polite while it keeps up; a full competitor once it falls more than an
            // interval behind, so checkpoints (and segment removal) keep coming under any
            // sustained load.
            let nice = applied.saturating_sub(op) <= interval;
            if nice != niced {
                set_priority(self.config.shard, if nice { FOLLOWER_NICE } else { 0 });
                niced = nice;
            }
            if op >= applied {
                std::thread::sleep(Duration::from_micros(FOLLOW_POLL_US));
                continue;
            }
            let installed = self.shared.installed_op.load(Ordering::Acquire);
            let newest = if self.config.driven {
                // Loaded after `applied`: a request is stored before its op is applied.
                let requested = self.shared.requested_op.load(Ordering::Acquire);
                if requested <= applied { requested } else { 0 }
            } else {
                checkpoint_at_or_below(applied, shard, shard_count, interval)
            };
            let target = if newest > op.max(installed) {
                newest
            } else {
                applied
            };
            // Bounded by `target - op`.
            while reader.op_next() <= target {
                if self.stopping() {
                    return Ok(());
                }
                let (meta, body) = reader.next_entry()?;
                let scratch = (&mut records[..], &mut requests[..], &mut results[..]);
                apply(&mut machine, &meta, body, scratch);
                ShardMetrics::set(&self.metrics.checkpoint_follower_op, meta.op);
            }
            if target == newest && newest > installed {
                self.checkpoint(&machine, &reader, &mut snapshot, &mut staging)?;
                // Bounded by `stop`: the shard installs it on its next turn.
                while self.shared.installed_op.load(Ordering::Acquire) < target {
                    if self.stopping() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_micros(FOLLOW_POLL_US));
                }
                segment_next = self.remove_released(segment_next)?;
            }
        }
        Ok(())
    }

    /// Disposes of the files the shard's journal released with its last checkpoint:
    /// segments from `segment_next` up to the released bound are offered for reuse
    /// (up to [`FollowerConfig::recycle_max`] waiting) or removed in steps
    /// ([`file_release`]), and the stale snapshot is removed. Returns the next segment to
    /// dispose of. Told to stop, it returns at once: what is left (a file, maybe shrunk) is
    /// below the checkpoint, which recovery never reads, and is disposed of at the next
    /// checkpoint (from the lowest segment on disk) or, for a snapshot, at the next open.
    fn remove_released(&mut self, segment_next: u64) -> Result<u64, FollowerError> {
        let started = Instant::now();
        let below = self.shared.segments_below.load(Ordering::Relaxed);
        for segment in segment_next..below {
            let path = self.config.dir.join(format::segment_file_name(segment));
            // After a restart the walk starts again at the lowest file left, and indices
            // above it may be gone already (removed, or reused by the journal under a new
            // name): offering one made the roll-over fall back to creating a segment, and
            // counted a reuse that never happened.
            if !path.exists() {
                continue;
            }
            let taken = self.shared.recycled_taken.load(Ordering::Acquire);
            let waiting = self.recycled_offered.saturating_sub(taken);
            if waiting < self.config.recycle_max as u64 && self.recycled.push(segment).is_ok() {
                self.recycled_offered += 1;
                ShardMetrics::add(&self.metrics.checkpoint_segments_recycled_total, 1);
                continue;
            }
            if !file_release(
                &path,
                || self.stopping(),
                &self.metrics.checkpoint_release_us_total,
            )? {
                return Ok(segment);
            }
        }
        let stale = self.shared.snapshot_stale_op.load(Ordering::Relaxed);
        if stale > 0 {
            let path = self.config.dir.join(format::snapshot_file_name(stale));
            let spare = self.config.dir.join(SNAPSHOT_SPARE_FILE_NAME);
            if snapshot_keep_as_spare(&path, &spare)? {
                ShardMetrics::add(&self.metrics.checkpoint_snapshots_kept_total, 1);
            } else {
                snapshot_release(
                    &path,
                    || self.stopping(),
                    &self.metrics.checkpoint_release_us_total,
                )?;
            }
        }
        ShardMetrics::set(
            &self.metrics.checkpoint_release_us,
            started.elapsed().as_micros() as u64,
        );
        Ok(segment_next.max(below))
    }

    /// Captures the machine's state at the reader's last op, writes its snapshot file and
    /// hands its header to the shard.
    fn checkpoint<S: StateMachine>(
        &mut self,
        machine: &S,
        reader: &JournalReader,
        snapshot: &mut Vec<u8>,
        staging: &mut [Sector],
    ) -> Result<(), FollowerError> {
        let op = reader.op_next() - 1;
        let started = Instant::now();
        snapshot.clear();
        let digest = machine.snapshot_and_digest(snapshot);
        let capture_us = started.elapsed().as_micros() as u64;
        let written_at = Instant::now();
        let meta = SnapshotMeta {
            cluster_id: self.config.cluster_id,
            shard: self.config.shard as u32,
            op,
            snapshot_bytes: snapshot.len() as u64,
            checkpoint_checksum: reader.chain(),
            snapshot_checksum: format::journal_checksum(snapshot),
            digest,
        };
        let stop = &self.shared.stop;
        let finished = snapshot_file_write(
            &self.config.dir,
            &meta,
            snapshot,
            staging,
            &self.config.write_budget,
            &self.metrics.checkpoint_write_us_total,
            || stop.load(Ordering::Acquire),
        )?;
        if !finished {
            return Ok(());
        }
        let written = Written {
            meta,
            position_after: reader.position(),
            capture_us,
            write_us: written_at.elapsed().as_micros() as u64,
        };
        ShardMetrics::set(&self.metrics.checkpoint_capture_us, written.capture_us);
        ShardMetrics::set(&self.metrics.checkpoint_write_us, written.write_us);
        // The slot is free: the previous checkpoint was installed before this one started.
        let pushed = self.written.push(written);
        debug_assert!(pushed.is_ok());
        Ok(())
    }
}

/// Nice value of the follower thread while it keeps up with its shard (is at most one
/// checkpoint interval behind): below the shards', so that on a machine where it shares
/// cores with them (it is unpinned) the scheduler runs a shard first. Further behind it
/// runs at the shards' priority (0), so that checkpoints keep coming under sustained load.
pub const FOLLOWER_NICE: i32 = 10;

/// Sets the calling thread's nice value (on Linux, PRIO_PROCESS with a thread id applies to
/// that thread only). Lowering always works; raising it back to 0 needs `CAP_SYS_NICE` (or
/// an `RLIMIT_NICE` allowing it): without, the follower stays polite and a failure is
/// logged once per change.
fn set_priority(shard: usize, nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::warn!(shard, nice, %error, "checkpoint follower: priority not changed");
    }
}

/// Removes a released file: shrinks it by [`RELEASE_STEP_BYTES`] at a time, pausing
/// [`RELEASE_STEP_PAUSE_US`] after each step, then unlinks it. A file already gone is fine.
/// Returns `false`, leaving the file, as soon as `stopping()` says so before a step. The
/// time it takes is added to `spent` (µs) step by step.
pub fn file_release(
    path: &Path,
    stopping: impl Fn() -> bool,
    spent: &AtomicU64,
) -> Result<bool, FollowerError> {
    let mut spent = TimeSpent::start(spent);
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(error) => return Err(io_error(path)(error)),
    };
    let mut bytes = file.metadata().map_err(io_error(path))?.len();
    // Bounded: every turn shrinks the file by a step.
    while bytes > 0 {
        if stopping() {
            return Ok(false);
        }
        bytes = bytes.saturating_sub(RELEASE_STEP_BYTES);
        file.set_len(bytes).map_err(io_error(path))?;
        std::thread::sleep(Duration::from_micros(RELEASE_STEP_PAUSE_US));
        spent.step();
    }
    drop(file);
    let removed = file_remove(path);
    spent.step();
    removed.map(|()| true)
}

/// [`file_release`] of a stale snapshot file, unless a state sync is serving it: the
/// server holds a shared `flock` on its open file (`sync::serve`), and shrinking the file
/// would shrink what that open file reads too (the transfer then failed as `NotRetained`,
/// and one slower than two checkpoints never finished). A served file is only unlinked:
/// its blocks are freed when the server closes it.
pub fn snapshot_release(
    path: &Path,
    stopping: impl Fn() -> bool,
    spent: &AtomicU64,
) -> Result<bool, FollowerError> {
    match snapshot_lock(path)? {
        SnapshotLock::Gone => return Ok(true),
        SnapshotLock::Served => return file_remove(path).map(|()| true),
        // Not known to be served: released in steps, the lock dropped first.
        SnapshotLock::Held(_) | SnapshotLock::Failed(_) => {}
    }
    file_release(path, stopping, spent)
}

/// What [`snapshot_lock`] found.
enum SnapshotLock {
    /// No file at the path.
    Gone,
    /// A state sync serves it: its server holds a shared `flock` on its open file.
    Served,
    /// Locked exclusively (until dropped): no server holds it, and none takes it meanwhile.
    Held(std::fs::File),
    /// The lock could not be tried.
    Failed(std::io::Error),
}

/// Opens the snapshot file at `path` and locks it exclusively unless a state sync serves
/// it.
fn snapshot_lock(path: &Path) -> Result<SnapshotLock, FollowerError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(SnapshotLock::Gone);
        }
        Err(error) => return Err(io_error(path)(error)),
    };
    match file.try_lock() {
        Ok(()) => Ok(SnapshotLock::Held(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(SnapshotLock::Served),
        Err(std::fs::TryLockError::Error(error)) => Ok(SnapshotLock::Failed(error)),
    }
}

/// Keeps the stale snapshot at `path` as the spare (renames it to `spare`) for the next
/// snapshot write to overwrite, unless a spare is kept already or a state sync is serving
/// it (its server reads it through its open file, and the next write would overwrite what
/// it sends). Returns whether it did; if not, the caller releases the file. The rename is
/// not made durable: after a crash the file may be back under its snapshot name, which the
/// journal's open removes as stale.
pub fn snapshot_keep_as_spare(path: &Path, spare: &Path) -> Result<bool, FollowerError> {
    if spare.exists() {
        return Ok(false);
    }
    // Held exclusively across the rename: a server takes its shared lock on the file it
    // sends from (`sync::serve`) before it reads.
    match snapshot_lock(path)? {
        SnapshotLock::Held(_file) => {
            std::fs::rename(path, spare).map_err(io_error(spare))?;
            Ok(true)
        }
        SnapshotLock::Gone | SnapshotLock::Served => Ok(false),
        SnapshotLock::Failed(error) => Err(io_error(path)(error)),
    }
}

/// Removes `path`; one already gone is fine.
fn file_remove(path: &Path) -> Result<(), FollowerError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(io_error(path)(error)),
        _ => Ok(()),
    }
}

/// The lowest segment index in `dir` (0 if there is none).
fn segment_lowest(dir: &Path) -> Result<u64, FollowerError> {
    let entries = std::fs::read_dir(dir).map_err(io_error(dir))?;
    let mut lowest = None::<u64>;
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        if let Some(segment) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_segment_name)
        {
            lowest = Some(lowest.map_or(segment, |lowest| lowest.min(segment)));
        }
    }
    Ok(lowest.unwrap_or(0))
}

/// Restores the snapshot of `superblock`'s checkpoint into `machine` and checks its digest.
fn restore<S: StateMachine>(
    dir: &Path,
    superblock: &Superblock,
    machine: &mut S,
) -> Result<(), FollowerError> {
    let path = dir.join(format::snapshot_file_name(superblock.checkpoint.op));
    let file = std::fs::read(&path).map_err(io_error(&path))?;
    let (meta, snapshot) =
        format::verify_snapshot(&file, superblock).map_err(|error| FollowerError::Snapshot {
            path: path.clone(),
            error,
        })?;
    let restored = machine.restore(snapshot).and_then(|()| {
        if machine.digest() == meta.digest {
            Ok(())
        } else {
            Err(percore_engine::state_machine::RestoreError::DigestMismatch)
        }
    });
    restored.map_err(|error| FollowerError::Restore { path, error })
}

/// Applies one journal entry to `machine` as the shard did, and drops what it sends to
/// other shards (the shard sends those).
fn apply<S: StateMachine>(
    machine: &mut S,
    meta: &EntryMeta,
    body: &[u8],
    (records, requests, results): (&mut [S::Record], &mut [RequestDescriptor], &mut [S::Result]),
) {
    let operation = S::Operation::try_from(meta.operation)
        .ok()
        .expect("the journal holds operations of this state machine");
    let (record_bytes, request_bytes) = body.split_at(meta.records_bytes());
    let count = meta.entry_count as usize;
    bytemuck::cast_slice_mut::<S::Record, u8>(&mut records[..count]).copy_from_slice(record_bytes);
    let request_count = request_descriptors(request_bytes, requests)
        .expect("the journal verified the descriptors' size");
    let requests = &requests[..request_count];
    assert!(
        descriptors_valid(requests, count),
        "the leader wrote valid descriptors"
    );
    machine.apply_requests(
        meta.op,
        operation,
        &records[..count],
        requests,
        &mut results[..count],
    );
    while machine.poll_outbound().is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every op in `1..=ops` at which `shard` checkpoints, by brute force over the rule.
    fn due_ops(ops: u64, shard: usize, shard_count: usize, interval: u64) -> Vec<u64> {
        (1..=ops)
            .filter(|&op| checkpoint_due(op, shard, shard_count, interval))
            .collect()
    }

    #[test]
    fn shard_zero_checkpoints_at_the_multiples_of_the_interval() {
        assert_eq!(due_ops(64, 0, 1, 16), vec![16, 32, 48, 64]);
        assert_eq!(due_ops(64, 0, 4, 16), vec![16, 32, 48, 64]);
        assert!(!checkpoint_due(0, 0, 1, 16), "op 0 is never a checkpoint");
    }

    #[test]
    fn the_shards_of_a_node_checkpoint_spread_over_the_interval() {
        assert_eq!(due_ops(64, 1, 4, 16), vec![12, 28, 44, 60]);
        assert_eq!(due_ops(64, 2, 4, 16), vec![8, 24, 40, 56]);
        assert_eq!(due_ops(64, 3, 4, 16), vec![4, 20, 36, 52]);
        // The node default: shard 1 of 2 halfway between shard 0's checkpoints.
        let interval = 16_384;
        assert!(checkpoint_due(8_192, 1, 2, interval));
        assert!(checkpoint_due(8_192 + interval, 1, 2, interval));
        assert!(!checkpoint_due(interval, 1, 2, interval));
        // Each shard checkpoints once per interval, and no two shards share an op while
        // there are fewer shards than ops in an interval.
        for (shard_count, interval) in [(2, 8), (3, 16), (12, 16_384), (16, 16)] {
            let mut all = Vec::new();
            for shard in 0..shard_count {
                let ops = due_ops(interval * 8, shard, shard_count, interval);
                assert_eq!(ops.len(), 8, "shard {shard} of {shard_count}");
                assert!(ops.windows(2).all(|w| w[1] - w[0] == interval));
                all.extend(ops);
            }
            all.sort_unstable();
            assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
        }
        // More shards than ops in an interval: offsets repeat, every op is still one
        // interval after the last.
        assert_eq!(due_ops(8, 3, 4, 2), vec![1, 3, 5, 7]);
    }

    #[test]
    fn the_newest_checkpoint_at_or_below_agrees_with_the_rule() {
        for (shard_count, interval) in [(1, 8), (2, 8), (3, 16), (4, 2), (5, 7)] {
            for shard in 0..shard_count {
                let mut newest = 0;
                for op in 0..=interval * 5 {
                    if checkpoint_due(op, shard, shard_count, interval) {
                        newest = op;
                    }
                    assert_eq!(
                        checkpoint_at_or_below(op, shard, shard_count, interval),
                        newest,
                        "op {op}, shard {shard} of {shard_count}, interval {interval}"
                    );
                }
            }
        }
        // No overflow near the top of the op space.
        let top = checkpoint_at_or_below(u64::MAX, 1, 2, 16_384);
        assert!(checkpoint_due(top, 1, 2, 16_384) && u64::MAX - top < 16_384);
    }

    #[test]
    fn budget_reservations_follow_each_other_and_keep_no_idle_credit() {
        // 1,000 bytes/s: a byte costs 1 ms.
        let budget = SnapshotWriteBudget::new(1_000);
        let ms = 1_000_000;
        assert_eq!(budget.reserve(100, 0), 0);
        // A second writer at the same moment waits for the first one's 100 ms.
        assert_eq!(budget.reserve(100, 0), 100 * ms);
        assert_eq!(budget.reserve(50, 10 * ms), 200 * ms);
        // Idle from 250 ms to 1 s: no credit saved up, the next chunk starts now and the
        // one after it waits its full share again.
        assert_eq!(budget.reserve(100, 1_000 * ms), 1_000 * ms);
        assert_eq!(budget.reserve(100, 1_000 * ms), 1_100 * ms);
    }

    /// Writes `writers` × `chunks` chunks of `chunk_bytes` through `budget` from that many
    /// threads at once (as the followers of one node write snapshots); returns the time.
    fn write_concurrently(
        budget: &Arc<SnapshotWriteBudget>,
        writers: usize,
        chunks: usize,
        chunk_bytes: u64,
    ) -> Duration {
        let started = Instant::now();
        let threads: Vec<_> = (0..writers)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..chunks {
                        budget.take(chunk_bytes);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("writer thread");
        }
        started.elapsed()
    }

    #[test]
    fn two_followers_writing_at_once_share_one_budget() {
        const BYTES_PER_S: u64 = 32 << 20;
        const CHUNK_BYTES: u64 = WRITE_BUFFER_BYTES as u64;
        const CHUNKS: usize = 4;
        let seconds = |chunks: usize| (chunks as u64 * CHUNK_BYTES) as f64 / BYTES_PER_S as f64;
        // The last chunk may start once every earlier one has had its time.
        let alone = write_concurrently(
            &Arc::new(SnapshotWriteBudget::new(BYTES_PER_S)),
            1,
            CHUNKS,
            CHUNK_BYTES,
        );
        assert!(alone.as_secs_f64() >= seconds(CHUNKS - 1), "{alone:?}");
        let together = write_concurrently(
            &Arc::new(SnapshotWriteBudget::new(BYTES_PER_S)),
            2,
            CHUNKS,
            CHUNK_BYTES,
        );
        // Two followers with a budget each would finish in `alone`'s time; sharing one,
        // they take the time of all their bytes at the one rate.
        assert!(
            together.as_secs_f64() >= seconds(2 * CHUNKS - 1),
            "two writers {together:?}, one {alone:?}"
        );
        assert!(
            together.as_secs_f64() < seconds(2 * CHUNKS) + 1.0,
            "two writers {together:?}: the budget is not used up"
        );
    }

    #[test]
    fn a_released_file_shrinks_in_steps_and_is_unlinked() {
        let dir = std::env::temp_dir().join(format!("percore-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("segment-released");
        let bytes = 3 * RELEASE_STEP_BYTES + 100;
        File::create(&path)
            .and_then(|file| file.set_len(bytes))
            .expect("file");
        // Told to stop before the third step: two steps taken, the file left.
        let asked = std::cell::Cell::new(0);
        let stop_at_third = || {
            asked.set(asked.get() + 1);
            asked.get() == 3
        };
        let spent = AtomicU64::new(0);
        assert!(!file_release(&path, stop_at_third, &spent).expect("release"));
        let two_steps = spent.load(Ordering::Relaxed);
        assert!(
            two_steps >= 2 * RELEASE_STEP_PAUSE_US,
            "two steps with their pauses counted: {two_steps} µs"
        );
        let left = std::fs::metadata(&path).expect("file left").len();
        assert_eq!(left, bytes - 2 * RELEASE_STEP_BYTES);
        // Released to the end: every step taken, then unlinked.
        asked.set(0);
        let count = || {
            asked.set(asked.get() + 1);
            false
        };
        assert!(file_release(&path, count, &spent).expect("release"));
        assert!(spent.load(Ordering::Relaxed) >= 4 * RELEASE_STEP_PAUSE_US);
        assert_eq!(asked.get(), 2, "two steps were left: 4 MiB + 100 bytes");
        assert!(!path.exists());
        // Gone already (a crash after the unlink): nothing to do.
        assert!(file_release(&path, || false, &spent).expect("release of a missing file"));
        std::fs::remove_dir_all(&dir).expect("temp dir removed");
    }

    /// A follower told to stop leaves a snapshot write it has not finished, at the next
    /// chunk, and removes its temporary file: the shard joins the follower on its own
    /// thread, and a slow budget made that join (shutdown, a state sync's switch) wait for
    /// the whole file.
    #[test]
    fn a_snapshot_write_stops_at_the_next_chunk_when_told() {
        let dir = std::env::temp_dir().join(format!("percore-stop-write-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let snapshot = vec![7u8; 64 * SECTOR_BYTES];
        let meta = SnapshotMeta {
            cluster_id: 1,
            shard: 0,
            op: 9,
            snapshot_bytes: snapshot.len() as u64,
            checkpoint_checksum: 1,
            snapshot_checksum: format::journal_checksum(&snapshot),
            digest: [0; 32],
        };
        // Four sectors a chunk at 1 MiB/s: the whole file would take about 250 ms.
        let mut staging = vec![Sector([0; SECTOR_BYTES]); 4];
        let budget = SnapshotWriteBudget::new(1 << 20);
        let spent = AtomicU64::new(0);
        let mut write = |stopping: &dyn Fn() -> bool| {
            snapshot_file_write(
                &dir,
                &meta,
                &snapshot,
                &mut staging,
                &budget,
                &spent,
                stopping,
            )
            .expect("write")
        };
        let chunks = std::cell::Cell::new(0);
        let started = Instant::now();
        let finished = write(&|| {
            chunks.set(chunks.get() + 1);
            chunks.get() > 2
        });
        assert!(!finished, "abandoned");
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "no file left: {left:?}");
        // Not told to stop: written whole, under its final name.
        assert!(write(&|| false));
        let path = dir.join(format::snapshot_file_name(9));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), meta.file_bytes());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A released snapshot kept as the spare is the next write's file: overwritten in
    /// place (same inode), cut to the new snapshot's length, holding exactly its bytes; a
    /// write told to stop hands it back as the spare; a served one or a second one is not
    /// kept.
    #[test]
    fn a_kept_snapshot_is_overwritten_by_the_next_write() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = std::env::temp_dir().join(format!("percore-spare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let spare = dir.join(SNAPSHOT_SPARE_FILE_NAME);
        let mut staging = vec![Sector([0; SECTOR_BYTES]); 4];
        let budget = SnapshotWriteBudget::new(1 << 30);
        let spent = AtomicU64::new(0);
        let meta_of = |op: u64, snapshot: &[u8]| SnapshotMeta {
            cluster_id: 1,
            shard: 0,
            op,
            snapshot_bytes: snapshot.len() as u64,
            checkpoint_checksum: u128::from(op),
            snapshot_checksum: format::journal_checksum(snapshot),
            digest: [0; 32],
        };
        let mut write = |op: u64, snapshot: &[u8], stopping: &dyn Fn() -> bool| {
            let meta = meta_of(op, snapshot);
            snapshot_file_write(
                &dir,
                &meta,
                snapshot,
                &mut staging,
                &budget,
                &spent,
                stopping,
            )
            .expect("write")
        };
        let large = vec![0x11u8; 40 * SECTOR_BYTES + 100];
        assert!(write(9, &large, &|| false));
        let path_9 = dir.join(format::snapshot_file_name(9));
        let inode = std::fs::metadata(&path_9).unwrap().ino();
        assert!(snapshot_keep_as_spare(&path_9, &spare).expect("keep"));
        assert!(!path_9.exists() && spare.exists());
        // One spare at most: another released snapshot is left to be released.
        std::fs::write(dir.join("other"), [1u8; 10]).unwrap();
        assert!(!snapshot_keep_as_spare(&dir.join("other"), &spare).expect("keep"));
        std::fs::remove_file(dir.join("other")).unwrap();
        // Told to stop part-way, the write hands the spare back.
        let chunks = std::cell::Cell::new(0);
        assert!(!write(13, &large, &|| {
            chunks.set(chunks.get() + 1);
            chunks.get() > 2
        }));
        assert_eq!(std::fs::metadata(&spare).unwrap().ino(), inode);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from(SNAPSHOT_SPARE_FILE_NAME)]
        );
        // A smaller snapshot over it: same file, its exact bytes, nothing of the older.
        let small = vec![0x22u8; 5 * SECTOR_BYTES + 7];
        assert!(write(17, &small, &|| false));
        let path_17 = dir.join(format::snapshot_file_name(17));
        assert!(!spare.exists());
        let metadata = std::fs::metadata(&path_17).unwrap();
        assert_eq!(metadata.ino(), inode, "overwritten in place");
        let meta = meta_of(17, &small);
        assert_eq!(metadata.len(), meta.file_bytes());
        let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
        format::encode_snapshot_header(&meta, &mut header);
        let mut expected = header.to_vec();
        expected.extend_from_slice(&small);
        expected.resize(meta.file_bytes() as usize, 0);
        assert_eq!(std::fs::read(&path_17).unwrap(), expected);
        // A snapshot a state sync is serving is not kept.
        let served = std::fs::File::open(&path_17).unwrap();
        crate::io_fence::hold(&served).unwrap();
        assert!(!snapshot_keep_as_spare(&path_17, &spare).expect("keep"));
        assert!(path_17.exists() && !spare.exists());
        drop(served);
        assert!(snapshot_keep_as_spare(&path_17, &spare).expect("keep"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_served_snapshot_is_unlinked_but_not_shrunk_under_its_reader() {
        let dir = std::env::temp_dir().join(format!("percore-served-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot");
        let bytes = vec![0x5au8; 3 * RELEASE_STEP_BYTES as usize];
        std::fs::write(&path, &bytes).unwrap();
        let spent = AtomicU64::new(0);
        // As a state sync serving it: open, held shared.
        let served = std::fs::File::open(&path).unwrap();
        crate::io_fence::hold(&served).unwrap();
        assert!(snapshot_release(&path, || false, &spent).expect("release"));
        assert!(!path.exists(), "unlinked");
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut &served, &mut read).unwrap();
        assert_eq!(read.len(), bytes.len(), "the served file kept its bytes");
        drop(served);
        // Not served: shrunk in steps, then removed, as segments are.
        std::fs::write(&path, &bytes).unwrap();
        let reader = std::fs::File::open(&path).unwrap();
        assert!(snapshot_release(&path, || false, &spent).expect("release"));
        assert!(!path.exists());
        assert_eq!(
            reader.metadata().unwrap().len(),
            0,
            "shrunk before the unlink"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
