//! The shard's journal driver: makes sealed batches durable in O_DIRECT segment files.
//!
//! This module owns the I/O of one shard's journal directory (`<data-dir>/shard-<i>`): a
//! `superblock` file holding two alternating copies, and append-only segment files of
//! sector-padded entries, each pre-allocated to `segment_bytes`. The on-disk format (entry
//! encoding, checksums, the chain, the scan that tells a clean end from a torn or corrupt one,
//! the superblock encoding) belongs to the sans-IO `percore_engine::journal`; this module only
//! moves bytes with glommio's `DmaFile` and decides what to do with what the scan reports.
//! It lives on one shard's executor and must never block that executor on anything but
//! open-time directory listing, and never write an entry across two segments.
//!
//! Write path: [`Journal::stage`] encodes a batch into the staging `DmaBuffer` (no I/O, no
//! allocation); [`Journal::commit`] writes everything staged in one O_DIRECT write per
//! segment touched (one, unless it rolls over) and issues one `fdatasync` per segment
//! written under [`FsyncPolicy::Always`]; under [`FsyncPolicy::Dsync`] the segments are
//! opened `O_DSYNC` and the write itself is durable when it completes.
//!
//! Buffer ownership (glommio 0.9): `DmaFile::write_at` takes the `DmaBuffer` by value and the
//! write length is the buffer's length, which can only shrink (`trim_to_size`). A buffer can
//! therefore not be reused for writes of varying length. `commit` hands the filled staging
//! buffer, trimmed to the staged length, to the kernel without copying, and takes a fresh
//! staging buffer from glommio's allocator: one `DmaBuffer` allocation per group commit (from
//! the executor's registered io memory when it has room, else an aligned heap allocation).
//! Fixed-size writes (the superblock) reuse one buffer through `write_rc_at` and
//! `Rc::get_mut`, which succeeds once glommio has dropped its clone at completion.
//!
//! Reads (recovery and [`Journal::read_entry`]) are O_DIRECT too, with a buffered fallback:
//! glommio decides once per process and device whether to use io_uring's poll ring by
//! reading offset 0 of the first file it opens there; an empty file answers that probe with success, and every later
//! O_DIRECT read on a device without poll queues then fails with EOPNOTSUPP. The superblock
//! is therefore created with `std::fs` (so the first DMA open sees data), and a read refused
//! with EOPNOTSUPP is redone as a buffered read.
//!
//! Checkpoints ([`Journal::checkpoint`]): the runtime hands over a snapshot of the state
//! machine taken after applying op `C`; the journal writes it to `snapshot-<C>.state` with a
//! glommio `DmaStreamWriter` (temporary name, `fdatasync`, rename, directory `fsync`), then
//! the superblock (the new checkpoint, the previous one kept as `checkpoint_previous`), and
//! only then removes segments that hold nothing but ops at or below the *previous*
//! checkpoint and below `retain_from_op` (what peers still lack), and snapshots older than
//! the previous one ([`CHECKPOINTS_RETAINED`]). Recovery restores the latest snapshot, scans
//! (verifies and indexes) the journal from the previous checkpoint and replays only the ops
//! after the latest, so ops above the previous checkpoint stay readable across restarts.
//!
//! Replication: a leader copies each staged entry's bytes ([`Journal::staged_entry`]) into
//! its Prepare messages; a follower stages those bytes unchanged ([`Journal::stage_encoded`]),
//! so both journals hold byte-identical entries. A lagging replica is served committed
//! entries by op ([`Journal::read_entry`]), located through a sparse position index of fixed
//! capacity (every `stride`-th op; full, it drops every other entry and doubles the stride)
//! plus a cursor that makes consecutive reads cost one read each.
//!
//! View change (`docs/protocol.md` 6.4, 7.4, 8): the superblock carries `view`, `log_view`
//! and `commit_max` ([`Journal::write_views`], [`Journal::views`]); none of them ever
//! decreases. [`Journal::truncate_after`] removes a divergent suffix so that it can never come
//! back: the scanner takes any later valid entry as real history, so the bytes after the new
//! end are made to read as zero (the segment is cut and pre-allocated back, later segments
//! are deleted, all synced) before anything is appended. With
//! [`JournalOptions::replay_committed_only`], recovery replays only up to the superblock's
//! `min(commit_max, op_durable)` while still verifying and indexing the whole journal.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use futures_lite::AsyncWriteExt as _;
use glommio::io::{Directory, DmaBuffer, DmaFile, DmaStreamWriterBuilder, OpenOptions, ReadResult};

use percore_engine::checksum::Digest256;
use percore_engine::journal::{
    self as format, Checkpoint, DecodedEntry, ENTRY_HEADER_BYTES, EntryError, EntryHeader,
    EntryMeta, JournalChecksum, JournalScanError, SECTOR_BYTES, SNAPSHOT_HEADER_BYTES,
    SUPERBLOCK_BYTES, ScanOutcome, SnapshotError, SnapshotMeta, Superblock, SuperblockError, Tail,
};
use percore_engine::state_machine::RestoreError;

use crate::io_fence;

/// Name of the superblock file in a shard's journal directory (two copies, one per sector).
pub const SUPERBLOCK_FILE_NAME: &str = "superblock";
/// Name the superblock file is written under before it is renamed into place at creation.
pub const SUPERBLOCK_FILE_NAME_NEW: &str = "superblock.new";
/// Default staging buffer for group commit (bytes).
pub const WRITE_BUFFER_BYTES_DEFAULT: usize = 4 << 20;
/// Recovery reads segments in chunks of this many bytes (or one largest entry, if larger).
pub const RECOVERY_READ_BYTES: usize = 4 << 20;
/// Number of superblock copies; `write_superblock` alternates between them.
pub const SUPERBLOCK_COPIES: u64 = 2;

/// Default capacity of the position index [`Journal::read_entry`] locates ops with
/// (entries; 16 bytes each: 1 MiB per shard).
pub const POSITION_INDEX_ENTRIES_MAX: usize = 65_536;
/// Smallest position index capacity: halving a full index must leave an entry (entries).
pub const POSITION_INDEX_ENTRIES_MIN: usize = 2;
/// `read_entry` walks entry headers forward from an indexed op in reads of this many bytes.
pub const LOCATE_READ_BYTES: usize = 64 << 10;

/// Checkpoints whose snapshots (and the journal after them) are kept: the latest, which
/// recovery restores, and the one before, so that peers can still repair ops above it.
pub const CHECKPOINTS_RETAINED: usize = 2;
/// Buffer of the snapshot file writer (bytes); [`SNAPSHOT_WRITE_BEHIND`] of them in flight.
pub const SNAPSHOT_WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Snapshot writes in flight at once (buffers).
pub const SNAPSHOT_WRITE_BEHIND: usize = 4;
/// Suffix of a snapshot file while it is written (renamed away once durable).
pub const SNAPSHOT_TEMPORARY_SUFFIX: &str = ".tmp";

/// Most released segments a journal keeps for reuse ([`Journal::recycled_add`]); see also
/// [`SEGMENTS_RECYCLED_BYTES_MAX`].
pub const SEGMENTS_RECYCLED_MAX: usize = 16;
/// Most bytes of released segments a journal keeps for reuse: what a checkpoint releases
/// beyond it is removed, so that a shard's disk use stays within about one checkpoint
/// interval of segments above what it retains.
pub const SEGMENTS_RECYCLED_BYTES_MAX: u64 = 4 << 30;

/// How many released segments of `segment_bytes` a journal keeps for reuse (at least one).
pub fn segments_recycled_max(segment_bytes: u64) -> usize {
    let by_bytes =
        usize::try_from(SEGMENTS_RECYCLED_BYTES_MAX / segment_bytes.max(1)).unwrap_or(usize::MAX);
    by_bytes.clamp(1, SEGMENTS_RECYCLED_MAX)
}

/// Name of the spare segment file in a shard's journal directory: zero-filled ahead of use
/// by [`SegmentSpare::run`], renamed to the next segment's name at a roll-over. Not a segment
/// name ([`format::parse_segment_name`] refuses it); open removes a leftover one.
pub const SEGMENT_SPARE_FILE_NAME: &str = "spare.segment";
/// Bytes of zeros the spare preparer writes at once (one write in flight): small, because a
/// journal write that queues behind one waits for it (1 MiB raised the commit p99).
pub const SPARE_WRITE_BYTES: usize = 128 << 10;
/// Most the spare preparer writes, per shard (MiB/s): one [`SPARE_WRITE_BYTES`] write per
/// `SPARE_WRITE_BYTES / rate` at most, so that zeros never crowd out the journal's writes.
pub const SPARE_ZERO_MIB_PER_S_MAX: u64 = 256;
/// Least it writes while the journal is idle (MiB/s), so that an idle shard's spare is ready
/// when load comes.
pub const SPARE_ZERO_MIB_PER_S_MIN: u64 = 8;
/// The spare's zeroed length is kept `segment_bytes / SPARE_LEAD_DIVISOR` ahead of the bytes
/// written into the current segment: it is whole before the current segment is full, and the
/// zeros written track the journal's own write rate.
pub const SPARE_LEAD_DIVISOR: u64 = 4;
/// How often the preparer looks again when it is ahead, or its spare waits (ms).
pub const SPARE_POLL_MS: u64 = 5;
/// Pause after a failed preparation (a full disk) before it tries again (ms).
pub const SPARE_RETRY_MS: u64 = 1_000;

const _: () = assert!(SPARE_WRITE_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () =
    assert!(SPARE_ZERO_MIB_PER_S_MIN > 0 && SPARE_ZERO_MIB_PER_S_MIN <= SPARE_ZERO_MIB_PER_S_MAX);
const _: () = assert!(SPARE_LEAD_DIVISOR > 0);

const _: () = assert!(
    CHECKPOINTS_RETAINED == 2,
    "the superblock holds two checkpoints"
);
const _: () = assert!(SNAPSHOT_WRITE_BUFFER_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(WRITE_BUFFER_BYTES_DEFAULT.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(LOCATE_READ_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(POSITION_INDEX_ENTRIES_MAX >= POSITION_INDEX_ENTRIES_MIN);
const _: () = assert!(RECOVERY_READ_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(SUPERBLOCK_BYTES.is_multiple_of(SECTOR_BYTES));

/// How a group commit is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// One `fdatasync` per group commit (per segment written): a committed op survives power loss.
    Always,
    /// Segments opened `O_DIRECT | O_DSYNC`: a group commit's write is durable when it
    /// completes, with no `fdatasync` after it (and, on a disk that honours FUA writes, no
    /// separate cache flush). A committed op survives power loss, as with `Always`; a
    /// roll-over, the superblock and snapshots are synced as under `Always`.
    Dsync,
    /// No `fdatasync`: a committed op survives a process crash, not power loss. Benchmarks only.
    Never,
}

impl FsyncPolicy {
    /// The policy as `--fsync` and the config file spell it (`always`, `dsync`, `never`).
    pub fn arg_name(self) -> &'static str {
        match self {
            FsyncPolicy::Always => "always",
            FsyncPolicy::Dsync => "dsync",
            FsyncPolicy::Never => "never",
        }
    }

    /// Whether a committed op survives power loss (`Always`, `Dsync`).
    pub fn is_durable(self) -> bool {
        matches!(self, FsyncPolicy::Always | FsyncPolicy::Dsync)
    }

    /// Flags a segment file is opened with beside `O_DIRECT`.
    fn segment_open_flags(self) -> i32 {
        match self {
            FsyncPolicy::Dsync => libc::O_DSYNC,
            FsyncPolicy::Always | FsyncPolicy::Never => 0,
        }
    }
}

/// Everything one shard's journal needs; every limit is fixed here.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The shard's journal directory, `<data-dir>/shard-<i>`; created if absent.
    pub dir: PathBuf,
    /// The shard (replication group) this journal belongs to.
    pub shard: u32,
    /// The cluster this journal belongs to; a directory of another cluster is refused.
    pub cluster_id: u128,
    /// Size of each segment file (bytes, a multiple of `SECTOR_BYTES`).
    pub segment_bytes: u64,
    /// Largest batch body one entry may carry (bytes).
    pub body_bytes_max: usize,
    /// When to `fdatasync`.
    pub fsync: FsyncPolicy,
    /// Staging buffer for group commit (bytes, a multiple of `SECTOR_BYTES`); one largest
    /// entry must fit.
    pub write_buffer_bytes: usize,
}

/// Journal settings that have defaults. Kept apart from [`JournalConfig`] so that code
/// building a `JournalConfig` literal keeps compiling when a setting is added here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// Capacity of the position index (entries, at least [`POSITION_INDEX_ENTRIES_MIN`]),
    /// allocated at open. A lookup walks at most `stride` entries from an indexed op, and the
    /// stride is about `ops / (entries_max / 2)` once the index has filled.
    pub position_index_entries_max: usize,
    /// Recovery replays only ops known committed: up to the superblock's
    /// `min(commit_max, op_durable)` (ops up to the checkpoint are in its snapshot, as
    /// always). Entries above are still verified, indexed and kept: readable with
    /// [`Journal::read_entry`], and [`Journal::op_durable`] is the journal's head. Off: every
    /// entry after the checkpoint is replayed. See [`Journal::op_replayed`].
    pub replay_committed_only: bool,
    /// Lost acknowledged entries are repaired from peers (a replicated shard): a corrupt
    /// entry (valid history after it) is cut with everything after it instead of refusing
    /// to open, and a journal that ends below the superblock's `op_durable` opens too;
    /// [`Recovered::recovering`] then names the op promised (`docs/protocol.md` 8). Off
    /// (a journal with no peers): both are [`JournalError::Corrupt`] and nothing is cut.
    pub repair_from_peers: bool,
    /// A directory without a journal gets a new, empty one. Off (a replica's restart,
    /// `crate::format`): it is [`JournalError::Missing`] instead, since an empty journal
    /// would forget what this replica acknowledged.
    pub create: bool,
    /// A journal created by this open is marked [`Superblock::replacing`] from its first
    /// superblock (`percore format --replace`): the replica lost its disk and rebuilds from
    /// its peers ([`Recovered::replacing`]). An existing journal keeps its mark.
    pub replacing: bool,
    /// Most records one entry may carry: the batch cap of the state machine that applies
    /// them. `body_bytes_max` alone admits more (a body without request descriptors holds
    /// a quarter more records of 128 bytes), and an entry the state machine cannot apply
    /// must be refused here, by name, rather than reach it: staged
    /// ([`Journal::stage_encoded`], a leader with larger batch limits) or recovered above
    /// the checkpoint (written under larger limits), it is [`JournalError::RecordsOverLimit`].
    pub records_max: usize,
    /// The digest of the settings that decide results under which this node runs (a
    /// `percore node`: [`crate::config::SettingsDigest`]). A new journal records it in its
    /// superblock; an existing one written under another is refused
    /// ([`JournalError::SettingsChanged`]): replaying its ops under other limits could
    /// reach another state than the one acknowledged. A journal that recorded none takes
    /// this one. `None`: nothing is checked, and a new journal records none (tools, tests).
    pub settings_digest: Option<u64>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            position_index_entries_max: POSITION_INDEX_ENTRIES_MAX,
            replay_committed_only: false,
            repair_from_peers: false,
            create: true,
            replacing: false,
            records_max: usize::MAX,
            settings_digest: None,
        }
    }
}

/// How full the position index is ([`Journal::position_index_usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionIndexUsage {
    /// Entries held now.
    pub entries: usize,
    /// The fixed capacity (entries).
    pub entries_max: usize,
    /// One op in this many is indexed (ops).
    pub stride_ops: u64,
    /// The op of the first entry (the first op recovery or staging saw).
    pub op_first: u64,
}

/// What recovery found. The chain head after recovery (the checksum of entry `op_last`,
/// [`percore_engine::journal::JOURNAL_CHAIN_ROOT`] when empty) is [`Journal::checksum_staged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Highest op in the journal (0 when empty).
    pub op_last: u64,
    /// The checkpoint restored from its snapshot (0: none; replay started at op 1).
    pub checkpoint_op: u64,
    /// Entries replayed (those after the checkpoint, up to [`Journal::op_replayed`]).
    pub entries: u64,
    /// `Clean`, or `Torn` or `Corrupt` at the offset the journal was truncated to (`Corrupt`
    /// only with [`JournalOptions::repair_from_peers`]).
    pub tail: Tail,
    /// The journal lost entries this replica may have acknowledged: ops up to this one
    /// (the superblock's `op_durable`, raised to the last valid entry found after a corrupt
    /// one) were durable, and the journal now ends below it. The replica must recover them
    /// from peers before it acknowledges or votes; the superblock keeps the promise until
    /// then ([`Journal::op_promised`]). `None` otherwise.
    pub recovering: Option<u64>,
    /// The superblock is marked [`Superblock::replacing`]: the replica lost its disk and
    /// must rebuild from its peers before it acknowledges or votes (`docs/protocol.md` 8).
    /// The mark stays until [`Journal::promise_release`].
    pub replacing: bool,
}

/// Everything that can go wrong with a shard's journal.
#[derive(thiserror::Error, Debug)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal I/O on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An authentic entry holds more records than this node's batch cap
    /// ([`JournalOptions::records_max`]): it was written, or sealed by a leader, under
    /// larger batch limits. This node's state machine cannot apply it.
    #[error(
        "shard {shard} journal entry at op {op} holds {records} records, over this node's \
         batch cap of {max}: it was written, or sent by a leader, under larger batch limits \
         (--batch-entries-max, --batch-bytes-max). Run every replica with limits that admit \
         it (raise them everywhere before any replica leads with them; lower them only once \
         a checkpoint has passed such entries)"
    )]
    RecordsOverLimit {
        /// The shard.
        shard: u32,
        /// The entry's op.
        op: u64,
        /// Records it holds.
        records: u32,
        /// This node's cap.
        max: usize,
    },
    /// An authentic entry (its header verifies) of this journal's history has a body
    /// larger than this node's `body_bytes_max`: it was written under larger batch limits.
    /// Read as the end of the journal it would be cut as a torn write, with every
    /// acknowledged entry after it.
    #[error(
        "shard {shard} journal entry at op {op} (segment {segment}, offset {offset}) has a \
         {body_bytes}-byte body, over this node's limit of {max} bytes: it was written under \
         larger batch limits (--batch-entries-max, --batch-bytes-max). Start with limits \
         that admit it (the ones it ran with) until a checkpoint has passed it; lowering them \
         now would cut acknowledged entries"
    )]
    OverLimit {
        /// The shard.
        shard: u32,
        /// The entry's op.
        op: u64,
        /// Segment index.
        segment: u64,
        /// Byte offset within the segment.
        offset: u64,
        /// The entry's body size.
        body_bytes: u32,
        /// This node's limit.
        max: usize,
    },
    /// An entry before the tail fails verification; it must be repaired from a peer.
    #[error(
        "shard {shard} journal corrupt at op {op} (segment {segment}, offset {offset}): {error}"
    )]
    Corrupt {
        /// The shard whose journal is corrupt.
        shard: u32,
        /// The op expected at `offset`.
        op: u64,
        /// Segment index.
        segment: u64,
        /// Byte offset within the segment.
        offset: u64,
        /// What verification found.
        error: String,
    },
    /// The directory belongs to another cluster or shard.
    #[error(
        "journal {path} belongs to cluster {cluster_id_found:#x} shard {shard_found}, \
         expected cluster {cluster_id_expected:#x} shard {shard_expected}"
    )]
    ClusterMismatch {
        /// The superblock file.
        path: PathBuf,
        /// Cluster in the configuration.
        cluster_id_expected: u128,
        /// Cluster in the superblock.
        cluster_id_found: u128,
        /// Shard in the configuration.
        shard_expected: u32,
        /// Shard in the superblock.
        shard_found: u32,
    },
    /// A batch body is larger than `body_bytes_max`, or one largest entry does not fit the
    /// write buffer or a segment.
    #[error("batch entry of {entry_bytes} bytes exceeds the limit of {entry_bytes_max} bytes")]
    BatchTooLarge {
        /// Bytes of the entry (or body) refused.
        entry_bytes: usize,
        /// The limit it exceeds.
        entry_bytes_max: usize,
    },
    /// The staging buffer has no room for this entry: commit first.
    #[error("write buffer full: {staged_bytes} bytes staged, entry needs {entry_bytes} more")]
    BufferFull {
        /// Bytes staged now.
        staged_bytes: usize,
        /// Padded bytes of the entry refused.
        entry_bytes: usize,
    },
    /// `stage` was given an op that does not follow the last one, or another shard's entry.
    #[error(
        "entry op {op} shard {shard} is not next: expected op {op_expected} shard {shard_expected}"
    )]
    NotNext {
        /// Op given.
        op: u64,
        /// Op expected (`op_last + 1`).
        op_expected: u64,
        /// Shard given.
        shard: u32,
        /// This journal's shard.
        shard_expected: u32,
    },
    /// `stage` was given a body whose length is not `entry_count * record_bytes`.
    #[error("body of {body_bytes} bytes is not {entry_count} records of {record_bytes} bytes")]
    BodySizeMismatch {
        /// Body length given.
        body_bytes: usize,
        /// Records announced.
        entry_count: u32,
        /// Record size announced.
        record_bytes: u32,
    },
    /// `stage_encoded` was given bytes that are not a valid entry (any checksum, magic,
    /// version, reserved bytes, sizes or the body limit).
    #[error("encoded entry (op {op_expected} expected) invalid: {error}")]
    EntryInvalid {
        /// The op this journal expected next.
        op_expected: u64,
        /// What verification found.
        #[source]
        error: EntryError,
    },
    /// `stage_encoded` was given a valid entry followed by further bytes: it takes exactly
    /// header + body, unpadded.
    #[error("encoded entry is {bytes} bytes, its header and body are {entry_bytes}")]
    EntryLengthMismatch {
        /// Bytes given.
        bytes: usize,
        /// Header + body of the entry found in them.
        entry_bytes: usize,
    },
    /// `stage_encoded` was given the next op, but it chains to another history: its
    /// `checksum_previous` is not this journal's last checksum.
    #[error(
        "entry op {op} chains to {checksum_previous_found:#x}, \
         this journal's last checksum is {checksum_previous_expected:#x}"
    )]
    ChainMismatch {
        /// Op of the entry refused.
        op: u64,
        /// Checksum of this journal's last staged entry.
        checksum_previous_expected: JournalChecksum,
        /// `checksum_previous` the entry records.
        checksum_previous_found: JournalChecksum,
    },
    /// `read_entry` was asked for an op that is not durable, or is before the first op this
    /// journal holds.
    #[error("op {op} is not readable: ops {op_first}..={op_durable} are")]
    OpNotReadable {
        /// Op asked for.
        op: u64,
        /// First op the journal holds.
        op_first: u64,
        /// Highest durable op.
        op_durable: u64,
    },
    /// A configuration value is out of range.
    #[error("journal config: {reason}")]
    Config {
        /// Which rule was broken.
        reason: &'static str,
    },
    /// The superblock file exists but neither copy is valid.
    #[error("journal superblock {path} unreadable: {error}")]
    Superblock {
        /// The superblock file.
        path: PathBuf,
        /// What decoding found.
        #[source]
        error: SuperblockError,
    },
    /// No journal (no superblock, no segment) where one must exist: a replica that ran
    /// before lost it. Never replaced by an empty one (`crate::format`).
    #[error(
        "journal {path} is missing: this replica ran before (its data directory records a \
         first start), so an empty journal would forget the ops it acknowledged; see \
         docs/operations.md, \"A replica lost its disk\""
    )]
    Missing {
        /// The journal directory.
        path: PathBuf,
    },
    /// The journal was written under other settings that decide results than this node's
    /// ([`JournalOptions::settings_digest`]).
    #[error(
        "journal {path} was written under settings digest {recorded:013x}, this node's is \
         {given:013x}: a setting that decides results differs (the shard count, \
         --accounts-max, --transfers-max, --credit-legs-max, --session-clients-max; in BFT \
         mode the batch cap), and replaying these ops under it could reach another state \
         than the one acknowledged. Start the node with the settings the journal was written \
         under (docs/operations.md, \"Settings digest\")"
    )]
    SettingsChanged {
        /// The journal directory.
        path: PathBuf,
        /// The digest in the superblock.
        recorded: u64,
        /// This node's.
        given: u64,
    },
    /// Segments exist but the superblock does not: refuse to guess.
    #[error("journal {path} has segments but no superblock")]
    SuperblockMissing {
        /// The journal directory.
        path: PathBuf,
    },
    /// The latest checkpoint's snapshot file is missing, unreadable or fails verification.
    /// Never ignored: the journal before the checkpoint may be gone.
    #[error("checkpoint snapshot {path} is invalid: {error}")]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What verification found.
        #[source]
        error: SnapshotError,
    },
    /// The state machine refused the checkpoint's snapshot (or its digest after restoring
    /// differs from the one recorded).
    #[error("checkpoint snapshot {path} could not be restored: {error}")]
    SnapshotRestore {
        /// The snapshot file.
        path: PathBuf,
        /// What the state machine said.
        #[source]
        error: RestoreError,
    },
    /// `checkpoint` was asked for an op that is not after the latest checkpoint or not
    /// durable.
    #[error(
        "cannot checkpoint op {op}: the latest checkpoint is op {checkpoint_op}, op_durable {op_durable}"
    )]
    CheckpointOp {
        /// Op asked for.
        op: u64,
        /// The latest checkpoint.
        checkpoint_op: u64,
        /// Highest durable op.
        op_durable: u64,
    },
    /// `truncate_after` was asked to remove ops at or below the latest checkpoint: its
    /// snapshot has applied them, so they can never be divergent.
    #[error("cannot truncate after op {op}: the latest checkpoint is op {checkpoint_op}")]
    TruncateBelowCheckpoint {
        /// Op asked for.
        op: u64,
        /// The latest checkpoint.
        checkpoint_op: u64,
    },
    /// An earlier write or `fdatasync` failed; what reached the disk is unknown, so the
    /// journal refuses further use until it is reopened (and recovered).
    #[error("journal of shard {shard} failed earlier and must be reopened")]
    Failed {
        /// The shard.
        shard: u32,
    },
}

/// A contiguous run of staged bytes that lands in one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StagedRun {
    staging_start: usize,
    staging_end: usize,
    segment: u64,
    offset: u64,
}

/// Where the next entry goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    segment: u64,
    offset: u64,
}

/// One staged entry: where it lies in the staging buffer, unpadded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StagedEntry {
    staging_start: usize,
    /// Header + body (bytes, no padding).
    entry_bytes: usize,
}

/// Where ops start on disk, sparsely: the position of every `stride_ops`-th op from
/// `op_first`, in a buffer of fixed capacity. When it is full, every other entry is dropped
/// and the stride doubles, so memory stays constant and any op lies at most
/// `stride_ops - 1` entries after an indexed one.
#[derive(Debug)]
struct PositionIndex {
    op_first: u64,
    stride_ops: u64,
    entries_max: usize,
    /// `positions[i]` is where op `op_first + i * stride_ops` starts.
    positions: Vec<Position>,
}

impl PositionIndex {
    fn new(op_first: u64, entries_max: usize) -> Self {
        assert!(op_first >= 1, "op numbers start at 1");
        assert!(entries_max >= POSITION_INDEX_ENTRIES_MIN);
        PositionIndex {
            op_first,
            stride_ops: 1,
            entries_max,
            positions: Vec::with_capacity(entries_max),
        }
    }

    /// Records where `op` starts. Every op from `op_first` on is offered once, in order
    /// (by recovery, then by staging). No allocation.
    fn record(&mut self, op: u64, position: Position) {
        debug_assert!(op >= self.op_first);
        let distance = op - self.op_first;
        if !distance.is_multiple_of(self.stride_ops) {
            return;
        }
        if self.positions.len() == self.entries_max {
            self.halve();
            if !distance.is_multiple_of(self.stride_ops) {
                return;
            }
        }
        debug_assert_eq!(
            distance / self.stride_ops,
            self.positions.len() as u64,
            "ops are recorded in order, each once"
        );
        debug_assert!(self.positions.len() < self.entries_max);
        self.positions.push(position);
    }

    /// Keeps entries 0, 2, 4, … and doubles the stride. No allocation.
    fn halve(&mut self) {
        let kept = self.positions.len().div_ceil(2);
        for index in 0..kept {
            self.positions[index] = self.positions[2 * index];
        }
        self.positions.truncate(kept);
        self.stride_ops *= 2;
    }

    /// Forgets every indexed op before `op`, which must be indexed: `op` becomes `op_first`.
    /// No allocation.
    fn drop_before(&mut self, op: u64) {
        assert!(op >= self.op_first);
        let distance = op - self.op_first;
        assert!(
            distance.is_multiple_of(self.stride_ops),
            "op must be indexed"
        );
        let dropped = usize::try_from(distance / self.stride_ops).expect("index fits memory");
        assert!(dropped < self.positions.len(), "op must be indexed");
        self.positions.copy_within(dropped.., 0);
        self.positions.truncate(self.positions.len() - dropped);
        self.op_first = op;
    }

    /// Forgets every indexed op after `op` (`op >= op_first - 1`), so that recording
    /// `op + 1` next continues the index. No allocation.
    fn truncate_after(&mut self, op: u64) {
        assert!(
            op + 1 >= self.op_first,
            "ops before op_first are not indexed"
        );
        let kept = match op.checked_sub(self.op_first) {
            Some(distance) => usize::try_from(distance / self.stride_ops)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
            None => 0,
        };
        self.positions.truncate(kept);
    }

    /// The last indexed op at or before `op`, and where it starts.
    fn at_or_before(&self, op: u64) -> Option<(u64, Position)> {
        let distance = op.checked_sub(self.op_first)?;
        let last = self.positions.len().checked_sub(1)?;
        let index = usize::try_from(distance / self.stride_ops)
            .unwrap_or(usize::MAX)
            .min(last);
        let op_indexed = self.op_first + index as u64 * self.stride_ops;
        Some((op_indexed, self.positions[index]))
    }

    fn usage(&self) -> PositionIndexUsage {
        PositionIndexUsage {
            entries: self.positions.len(),
            entries_max: self.entries_max,
            stride_ops: self.stride_ops,
            op_first: self.op_first,
        }
    }
}

/// Where op `op` is expected to start, as `read_entry` walks the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpLocation {
    op: u64,
    position: Position,
    /// `position` is just past the previous entry, inside its segment: if op `op` does not
    /// start there, the previous entry was its segment's last and `op` starts the next one.
    may_roll: bool,
    /// Checksum of op `op - 1`, when it was just read and verified (checks the chain).
    checksum_previous: Option<JournalChecksum>,
}

impl OpLocation {
    /// Where the op after this one is expected, given this entry's padded size.
    fn after(
        self,
        padded_bytes: usize,
        checksum: Option<JournalChecksum>,
        segment_bytes: u64,
    ) -> OpLocation {
        let offset = self.position.offset + padded_bytes as u64;
        debug_assert!(offset <= segment_bytes, "entries never span two segments");
        let (position, may_roll) = if offset >= segment_bytes {
            let next = Position {
                segment: self.position.segment + 1,
                offset: 0,
            };
            (next, false)
        } else {
            let here = Position {
                segment: self.position.segment,
                offset,
            };
            (here, true)
        };
        OpLocation {
            op: self.op + 1,
            position,
            may_roll,
            checksum_previous: checksum,
        }
    }

    /// The start of the next segment: where `op` is when it is not at `position`.
    fn rolled(self) -> OpLocation {
        debug_assert!(self.may_roll);
        OpLocation {
            position: Position {
                segment: self.position.segment + 1,
                offset: 0,
            },
            may_roll: false,
            ..self
        }
    }
}

/// Why the bytes at an [`OpLocation`] are not the entry expected there.
#[derive(Clone, Copy, Debug)]
enum HeaderMiss {
    Invalid(EntryError),
    Elsewhere { op: u64, shard: u32 },
    PastSegmentEnd { padded_bytes: usize },
}

impl fmt::Display for HeaderMiss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderMiss::Invalid(error) => write!(f, "{error}"),
            HeaderMiss::Elsewhere { op, shard } => write!(f, "found op {op} of shard {shard}"),
            HeaderMiss::PastSegmentEnd { padded_bytes } => {
                write!(f, "entry of {padded_bytes} bytes runs past the segment end")
            }
        }
    }
}

/// The segment `read_entry` last read, kept open for the next read.
struct SegmentReader {
    segment: u64,
    path: PathBuf,
    file: DmaFile,
}

/// What the spare segment preparer has done ([`SegmentSpare::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpareStats {
    /// Spares zero-filled whole and made durable.
    pub prepared: u64,
    /// Segment roll-overs that renamed a ready spare into place.
    pub switches_prepared: u64,
    /// Segment roll-overs that found none ready and created the segment by `fallocate`
    /// alone (its appends then convert unwritten extents: each `fdatasync` commits the file
    /// system's journal too).
    pub switches_unprepared: u64,
    /// Preparations that failed (the file was removed; tried again later).
    pub failures: u64,
}

/// The next segment, written ahead of use.
///
/// A segment created by `fallocate` alone is made of *unwritten* extents: every append into
/// it converts the blocks it covers to written, a metadata change, so its `fdatasync` must
/// also commit the file system's journal (ext4's jbd2, one per file system, shared by every
/// shard's journal and the snapshots on that disk). On the reference VM that made a 16 KiB
/// append + `fdatasync` cost 170-210 µs alone and 400-440 µs (p99 1.1-3.4 ms) with six
/// journals syncing at once, against 105 µs and 130-230 µs (p99 0.45-1.6 ms) into blocks
/// already written (docs/benchmarks.md, "Journal segments written ahead").
///
/// [`SegmentSpare::run`], a task on the shard's executor, therefore writes the next segment
/// ahead: it creates [`SEGMENT_SPARE_FILE_NAME`], pre-allocates it, overwrites it with zeros
/// ([`SPARE_WRITE_BYTES`] at a time, one write in flight) and `fdatasync`s it, then offers it
/// to the journal, which renames it to the next segment's name at its roll-over (and syncs
/// the directory, as for a created segment). What the spare holds is exactly what a created
/// segment reads as (zeros), so recovery is unchanged; a spare is never part of the journal
/// until renamed, so its writes can never meet an entry. A spare left by a crash is removed
/// at open.
///
/// Pacing: the zeroed length is kept `segment_bytes / SPARE_LEAD_DIVISOR` ahead of what the
/// journal has written into its current segment (so the zeros follow the journal's own write
/// rate), at least [`SPARE_ZERO_MIB_PER_S_MIN`] and at most [`SPARE_ZERO_MIB_PER_S_MAX`].
/// A roll-over that finds no spare ready creates the segment as before.
///
/// Costs: every journal byte is written twice (once as zeros, ahead of time and off the
/// commit path), and one more segment's worth of disk per shard is taken early. The first
/// segment of a new journal is never a spare. The runtime runs the preparer only with
/// `--segment-spare` (off by default): on the 2-vCPU reference VM the background writes
/// (whose own extent conversions go through the same jbd2, and whose CPU the shards share)
/// cost about as much latency as the prepared segments saved.
#[derive(Debug)]
pub struct SegmentSpare {
    path: PathBuf,
    segment_bytes: u64,
    /// The journal's policy: a spare becomes a segment, opened as one.
    fsync: FsyncPolicy,
    /// Bytes the journal has made durable in its current segment (a pacing hint).
    used_bytes: Cell<u64>,
    /// A spare written whole and durable, waiting for the next roll-over.
    ready: RefCell<Option<DmaFile>>,
    /// The journal took the spare and is renaming it: the path is not the preparer's until
    /// the rename is done (a new spare created there first would be renamed instead).
    renaming: Cell<bool>,
    /// Wakes the preparer: a spare was taken, or its rename finished.
    wake: crate::runtime::LocalNotify,
    stopping: Cell<bool>,
    prepared: Cell<u64>,
    switches_prepared: Cell<u64>,
    switches_unprepared: Cell<u64>,
    failures: Cell<u64>,
}

impl SegmentSpare {
    fn new(dir: &Path, segment_bytes: u64, fsync: FsyncPolicy, used_bytes: u64) -> SegmentSpare {
        SegmentSpare {
            path: dir.join(SEGMENT_SPARE_FILE_NAME),
            segment_bytes,
            fsync,
            used_bytes: Cell::new(used_bytes),
            ready: RefCell::new(None),
            renaming: Cell::new(false),
            wake: crate::runtime::LocalNotify::default(),
            stopping: Cell::new(false),
            prepared: Cell::new(0),
            switches_prepared: Cell::new(0),
            switches_unprepared: Cell::new(0),
            failures: Cell::new(0),
        }
    }

    fn count(&self, counter: &Cell<u64>) {
        counter.set(counter.get() + 1);
    }

    /// What the preparer and the roll-overs have done so far.
    pub fn stats(&self) -> SpareStats {
        SpareStats {
            prepared: self.prepared.get(),
            switches_prepared: self.switches_prepared.get(),
            switches_unprepared: self.switches_unprepared.get(),
            failures: self.failures.get(),
        }
    }

    /// Whether a spare is ready for the next roll-over.
    pub fn is_ready(&self) -> bool {
        self.ready.borrow().is_some()
    }

    /// Makes [`SegmentSpare::run`] return within [`SPARE_POLL_MS`] (or one write), leaving a
    /// partly written spare on disk for the next open to remove.
    pub fn stop(&self) {
        self.stopping.set(true);
        self.wake.notify();
    }

    /// The journal's roll-over: takes the ready spare, if any, and keeps the preparer off
    /// its path until [`SegmentSpare::renamed`].
    fn take(&self) -> Option<DmaFile> {
        let file = self.ready.borrow_mut().take()?;
        self.renaming.set(true);
        self.wake.notify();
        Some(file)
    }

    /// The spare [`SegmentSpare::take`] returned is renamed (or the rename failed and the
    /// journal is unusable): the preparer may start the next one.
    fn renamed(&self) {
        self.renaming.set(false);
        self.wake.notify();
    }

    /// Prepares spares until [`SegmentSpare::stop`]: one at a time, the next once the
    /// journal has taken the last. `published` is called with the stats whenever they
    /// change. A failed preparation (a full disk) is logged, its file removed, and tried
    /// again after [`SPARE_RETRY_MS`]; the journal meanwhile creates segments as before.
    pub async fn run(&self, mut published: impl FnMut(SpareStats)) {
        let mut zeros: Option<(Rc<DmaBuffer>, Option<Rc<DmaBuffer>>)> = None;
        let mut last = self.stats();
        published(last);
        while !self.stopping.get() {
            if !self.is_ready() && !self.renaming.get() {
                match self.prepare(&mut zeros).await {
                    Ok(Some(file)) => {
                        *self.ready.borrow_mut() = Some(file);
                        self.count(&self.prepared);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        self.count(&self.failures);
                        tracing::warn!(path = %self.path.display(), %error, "spare segment not prepared");
                        let _ = file_remove(&self.path).await;
                        futures_lite::future::or(self.wake.wait(), sleep_ms(SPARE_RETRY_MS)).await;
                    }
                }
            }
            let stats = self.stats();
            if stats != last {
                last = stats;
                published(stats);
            }
            futures_lite::future::or(self.wake.wait(), sleep_ms(SPARE_POLL_MS)).await;
        }
    }

    /// Writes one spare whole. `None` if stopped first.
    async fn prepare(
        &self,
        zeros: &mut Option<(Rc<DmaBuffer>, Option<Rc<DmaBuffer>>)>,
    ) -> Result<Option<DmaFile>, JournalError> {
        let path = &self.path;
        // Nothing else is at the path: the last spare was renamed away, and a failed one
        // removed (or removed at open).
        debug_assert!(!self.renaming.get());
        let file = segment_open(path, true, self.fsync).await?;
        file.pre_allocate(self.segment_bytes, false)
            .await
            .map_err(|error| io_error(path, error))?;
        // Two buffers for the whole life of the task: a full write, and the segment's
        // remainder when it is not a multiple of one.
        let chunk_bytes =
            SPARE_WRITE_BYTES.min(usize::try_from(self.segment_bytes).unwrap_or(usize::MAX));
        let (full, tail) = &*zeros.get_or_insert_with(|| {
            let zeroed = |bytes: usize| {
                let mut buffer = file.alloc_dma_buffer(bytes);
                buffer.as_bytes_mut().fill(0);
                Rc::new(buffer)
            };
            let tail_bytes = (self.segment_bytes % chunk_bytes as u64) as usize;
            (
                zeroed(chunk_bytes),
                (tail_bytes > 0).then(|| zeroed(tail_bytes)),
            )
        });
        let lead_bytes = self.segment_bytes / SPARE_LEAD_DIVISOR;
        let started = std::time::Instant::now();
        let mut zeroed = 0u64;
        while zeroed < self.segment_bytes {
            if self.stopping.get() {
                return Ok(None);
            }
            let elapsed_us = started.elapsed().as_micros() as u64;
            let idle_allowance =
                elapsed_us.saturating_mul(SPARE_ZERO_MIB_PER_S_MIN << 20) / 1_000_000;
            let allowed = (self.used_bytes.get() + lead_bytes).max(idle_allowance);
            if zeroed >= allowed {
                sleep_ms(SPARE_POLL_MS).await;
                continue;
            }
            let buffer = if self.segment_bytes - zeroed >= full.len() as u64 {
                full
            } else {
                tail.as_ref().expect("a remainder has its buffer")
            };
            let write_started = std::time::Instant::now();
            let written = file
                .write_rc_at(buffer.clone(), zeroed)
                .await
                .map_err(|error| io_error(path, error))?;
            check_written(path, written, buffer.len(), zeroed)?;
            zeroed += written as u64;
            // At most SPARE_ZERO_MIB_PER_S_MAX: this write's share of a second at that rate.
            let write_us_min = written as u64 * 1_000_000 / (SPARE_ZERO_MIB_PER_S_MAX << 20);
            let spent_us = write_started.elapsed().as_micros() as u64;
            if spent_us < write_us_min {
                glommio::timer::sleep(std::time::Duration::from_micros(write_us_min - spent_us))
                    .await;
            }
        }
        file.fdatasync()
            .await
            .map_err(|error| io_error(path, error))?;
        Ok(Some(file))
    }
}

async fn sleep_ms(ms: u64) {
    glommio::timer::sleep(std::time::Duration::from_millis(ms)).await;
}

/// One shard's journal: lives on that shard's executor (not `Send`).
pub struct Journal {
    config: JournalConfig,
    directory: Directory,
    superblock_file: DmaFile,
    /// Reused for every superblock write (fixed size, so `write_rc_at` + `Rc::get_mut` works).
    superblock_buffer: Rc<DmaBuffer>,
    superblock: Superblock,
    /// The segment at `position_durable.segment`, open for reading and writing.
    segment_file: DmaFile,
    /// Its path, kept so the write path never formats one.
    segment_path: PathBuf,
    superblock_path: PathBuf,
    /// End of what has been written (and synced under `Always`).
    position_durable: Position,
    /// End of what has been staged.
    position_staged: Position,
    /// Entries are encoded here; `write_buffer_bytes` long.
    staging: DmaBuffer,
    staged_bytes: usize,
    /// Staged runs, one per segment touched; capacity fixed at open (never grows).
    staged_runs: Vec<StagedRun>,
    /// Staged entries, op `op_durable + 1 + i` at `i`; capacity fixed at open (one per
    /// sector of write buffer, so pushing never reallocates).
    staged_entries: Vec<StagedEntry>,
    /// Where ops start on disk; fixed capacity.
    position_index: PositionIndex,
    /// Where the op after the last one `read_entry` returned starts.
    read_cursor: Option<OpLocation>,
    /// The segment `read_entry` reads, open read-only.
    reader: Option<SegmentReader>,
    /// O_DIRECT reads were refused: read through the page cache.
    reads_buffered: Cell<bool>,
    op_durable: u64,
    view_durable: u64,
    op_staged: u64,
    view_staged: u64,
    checksum_staged: JournalChecksum,
    /// Set while a write is in flight and left set if it fails.
    failed: bool,
    /// [`JournalOptions::records_max`].
    records_max: usize,
    /// Lowest segment index that may still exist on disk (removal goes up from here).
    segment_oldest: u64,
    /// Entry `op` of a checkpoint is read back into this (capacity `entry_bytes_max`,
    /// allocated at open).
    checkpoint_entry: Vec<u8>,
    /// Highest op recovery handed to `replay` (or restored from the checkpoint).
    op_replayed: u64,
    /// Recovering: every superblock written records at least this `op_durable` (the
    /// promise), until the journal reaches it or [`Journal::promise_release`]; 0: none.
    op_promised: u64,
    /// This open created the journal (no superblock existed): no earlier process wrote or
    /// sent anything from it.
    created: bool,
    /// The next segment, zero-filled ahead by [`SegmentSpare::run`] when the runtime runs it.
    spare: Rc<SegmentSpare>,
    /// Released segments (by index, still under their old names) handed back by the
    /// checkpoint follower for reuse ([`Journal::recycled_add`]), oldest first; capacity
    /// [`SEGMENTS_RECYCLED_MAX`], fixed at open.
    recycled: VecDeque<u64>,
    /// Roll-overs onto a recycled segment.
    switches_recycled: u64,
    /// Recycled segments taken out of `recycled` (used, or failed and left for removal).
    recycled_taken: u64,
}

/// What [`Journal::checkpoint`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointDone {
    /// The checkpoint now in the superblock.
    pub checkpoint: Checkpoint,
    /// Snapshot bytes written (unpadded).
    pub snapshot_bytes: u64,
    /// Segments the journal no longer needs (below `segments_below`).
    pub segments_released: u64,
    /// Segment files below this index are no longer part of the journal.
    pub segments_below: u64,
    /// The snapshot file (its op) no retained checkpoint names any more (0: none).
    pub snapshot_stale_op: u64,
    /// Segment files removed here ([`Journal::checkpoint`]; 0 for an install).
    pub segments_removed: u64,
    /// Snapshot files removed here ([`Journal::checkpoint`]; 0 for an install).
    pub snapshots_removed: u64,
    /// The first op [`Journal::read_entry`] still returns.
    pub op_first: u64,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.config.dir)
            .field("shard", &self.config.shard)
            .field("position_durable", &self.position_durable)
            .field("position_staged", &self.position_staged)
            .field("staged_bytes", &self.staged_bytes)
            .field("op_durable", &self.op_durable)
            .field("op_staged", &self.op_staged)
            .field("position_index", &self.position_index.usage())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path, error: impl Into<std::io::Error>) -> JournalError {
    JournalError::Io {
        path: path.to_path_buf(),
        source: error.into(),
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format::segment_file_name(segment))
}

async fn open_read_write(path: &Path, create: bool) -> Result<DmaFile, JournalError> {
    open_read_write_with(path, create, 0).await
}

/// Opens a segment file for reading and appending, `O_DSYNC` under [`FsyncPolicy::Dsync`]
/// (the flag cannot be set on an open file): every segment open goes through here.
async fn segment_open(
    path: &Path,
    create: bool,
    fsync: FsyncPolicy,
) -> Result<DmaFile, JournalError> {
    open_read_write_with(path, create, fsync.segment_open_flags()).await
}

async fn open_read_write_with(
    path: &Path,
    create: bool,
    flags: i32,
) -> Result<DmaFile, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(flags)
        .dma_open(path)
        .await
        .map_err(|error| io_error(path, error))?;
    // Written through io_uring: a later process waits out what is in flight at a crash.
    io_fence::hold(&file).map_err(|error| io_error(path, error))?;
    Ok(file)
}

/// Writes all of `buffer` at `offset`: a short write is an error (the disk is full).
async fn write_all(
    file: &DmaFile,
    path: &Path,
    buffer: DmaBuffer,
    offset: u64,
) -> Result<(), JournalError> {
    let length = buffer.len();
    debug_assert!(length > 0 && length.is_multiple_of(SECTOR_BYTES));
    debug_assert!(offset.is_multiple_of(SECTOR_BYTES as u64));
    let written = file
        .write_at(buffer, offset)
        .await
        .map_err(|error| io_error(path, error))?;
    check_written(path, written, length, offset)
}

/// A write of `length` bytes at `offset` that wrote `written` is whole, or an error.
fn check_written(
    path: &Path,
    written: usize,
    length: usize,
    offset: u64,
) -> Result<(), JournalError> {
    if written != length {
        return Err(io_error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write: {written} of {length} bytes at offset {offset}"),
            ),
        ));
    }
    Ok(())
}

async fn fdatasync(file: &DmaFile, path: &Path) -> Result<(), JournalError> {
    file.fdatasync()
        .await
        .map_err(|error| io_error(path, error))
}

/// Reads `length` bytes at `offset` (both sector aligned) with O_DIRECT; once glommio's
/// poll ring has refused a read (see the module docs), `buffered` is set and this and all
/// later reads go through the page cache instead.
async fn read_aligned(
    file: &DmaFile,
    path: &Path,
    offset: u64,
    length: usize,
    buffered: &Cell<bool>,
) -> Result<ReadResult, JournalError> {
    debug_assert!(
        offset.is_multiple_of(SECTOR_BYTES as u64) && length.is_multiple_of(SECTOR_BYTES)
    );
    if !buffered.get() {
        match file.read_at_aligned(offset, length).await {
            Ok(bytes) => return Ok(bytes),
            Err(error) => {
                let error = std::io::Error::from(error);
                if error.kind() != std::io::ErrorKind::Unsupported {
                    return Err(io_error(path, error));
                }
                tracing::warn!(
                    path = %path.display(),
                    "O_DIRECT read refused (glommio poll ring on a device without poll queues); \
                     recovery reads go through the page cache"
                );
                buffered.set(true);
            }
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .buffered_open(path)
        .await
        .map_err(|error| io_error(path, error))?;
    let bytes = file
        .read_at(offset, length)
        .await
        .map_err(|error| io_error(path, error))?;
    file.close().await.map_err(|error| io_error(path, error))?;
    Ok(bytes)
}

/// Whether the entry header at the start of `bytes` was never written: all zero, or past
/// the end of the file.
fn header_unwritten(bytes: &[u8]) -> bool {
    bytes
        .get(..ENTRY_HEADER_BYTES)
        .is_none_or(|header| header.iter().all(|&byte| byte == 0))
}

/// Creates (or re-sizes) a segment: pre-allocated to `segment_bytes` so appends do not
/// change the file size, reads as zeros past the last entry.
async fn segment_create(
    dir: &Path,
    segment: u64,
    segment_bytes: u64,
    fsync: FsyncPolicy,
) -> Result<DmaFile, JournalError> {
    let path = segment_path(dir, segment);
    let file = segment_open(&path, true, fsync).await?;
    file.pre_allocate(segment_bytes, false)
        .await
        .map_err(|error| io_error(&path, error))?;
    Ok(file)
}

impl Journal {
    /// Renames released segment `old` to `path` (the next segment) and opens it at its full
    /// size. `None` if a step fails (logged): the roll-over then creates the segment. A
    /// released segment is below the checkpoint, so whatever a failure leaves of it is never
    /// read, and the next release removes it.
    async fn segment_recycle(&self, old: u64, path: &Path) -> Option<DmaFile> {
        let old_path = segment_path(&self.config.dir, old);
        let recycled = async {
            glommio::io::rename(&old_path, path)
                .await
                .map_err(|error| io_error(&old_path, std::io::Error::from(error)))?;
            let file = segment_open(path, false, self.config.fsync).await?;
            // Idempotent: a released segment has its full size already.
            file.pre_allocate(self.config.segment_bytes, false)
                .await
                .map_err(|error| io_error(path, error))?;
            Ok::<DmaFile, JournalError>(file)
        }
        .await;
        match recycled {
            Ok(file) => Some(file),
            Err(error) => {
                tracing::warn!(shard = self.config.shard, old, %error, "released segment not reused");
                None
            }
        }
    }

    /// Takes released segment `segment` (below the checkpoint, no longer part of the journal)
    /// for reuse at a later roll-over, if fewer than [`segments_recycled_max`] wait;
    /// returns whether it did. The caller (the checkpoint follower, through the shard) then
    /// leaves the file alone.
    pub fn recycled_add(&mut self, segment: u64) -> bool {
        let room = self.recycled_room();
        if room {
            debug_assert!(
                segment < self.segment_oldest,
                "segment {segment} is not released"
            );
            self.recycled.push_back(segment);
        }
        room
    }

    /// Whether [`Journal::recycled_add`] would take a segment now.
    pub fn recycled_room(&self) -> bool {
        self.recycled.len() < segments_recycled_max(self.config.segment_bytes)
    }

    /// Roll-overs onto a recycled segment since open (or since the open of the journal
    /// this one replaced, [`Journal::count_from`]).
    pub fn switches_recycled(&self) -> u64 {
        self.switches_recycled
    }

    /// Carries `old`'s cumulative counts over to this journal, which replaces it (a state
    /// sync reopens the journal at the synced checkpoint): what the metrics export from
    /// them never goes backwards.
    pub fn count_from(&mut self, old: &Journal) {
        self.switches_recycled += old.switches_recycled;
        let (spare, old_spare) = (&self.spare, &old.spare);
        for (counter, before) in [
            (&spare.prepared, &old_spare.prepared),
            (&spare.switches_prepared, &old_spare.switches_prepared),
            (&spare.switches_unprepared, &old_spare.switches_unprepared),
            (&spare.failures, &old_spare.failures),
        ] {
            counter.set(counter.get() + before.get());
        }
    }

    /// Recycled segments taken for roll-overs since open (used, or not usable and left for
    /// the next release to remove): with those offered, how many still wait.
    pub fn recycled_taken(&self) -> u64 {
        self.recycled_taken
    }

    /// Opens the journal (creating the directory, the superblock pair and segment 0 if
    /// absent) and recovers it: scans the segments in order from the checkpoint, verifying
    /// every entry and the chain, calls `replay` for each valid entry in op order, truncates
    /// a torn tail (zeroing it on disk) and fails with [`JournalError::Corrupt`] on
    /// corruption before the tail. Uses the default [`JournalOptions`].
    ///
    /// A latest checkpoint's snapshot is verified but not restored anywhere: `replay` sees
    /// only the ops after it ([`Recovered::checkpoint_op`]). A caller with state uses
    /// [`Journal::open_checkpointed`].
    pub async fn open(
        config: JournalConfig,
        replay: impl FnMut(&DecodedEntry<'_>),
    ) -> Result<(Journal, Recovered), JournalError> {
        Self::open_with_options(config, JournalOptions::default(), replay).await
    }

    /// [`Journal::open`] with explicit [`JournalOptions`].
    pub async fn open_with_options(
        config: JournalConfig,
        options: JournalOptions,
        replay: impl FnMut(&DecodedEntry<'_>),
    ) -> Result<(Journal, Recovered), JournalError> {
        Self::open_checkpointed(config, options, |_, _| Ok(()), replay).await
    }

    /// [`Journal::open`], restoring the latest checkpoint first: when the superblock names
    /// one, its snapshot file is read and verified (header, chain value, checksum of the
    /// bytes; any failure is [`JournalError::Snapshot`] naming the file) and handed to
    /// `restore` with its header, before `replay` sees the ops after it. An error from
    /// `restore` is [`JournalError::SnapshotRestore`]. Without a checkpoint `restore` is not
    /// called and `replay` sees every op from 1.
    pub async fn open_checkpointed(
        mut config: JournalConfig,
        options: JournalOptions,
        restore: impl FnOnce(&SnapshotMeta, &[u8]) -> Result<(), RestoreError>,
        mut replay: impl FnMut(&DecodedEntry<'_>),
    ) -> Result<(Journal, Recovered), JournalError> {
        config_validate(&config)?;
        // glommio opens the directory with a dirfd that a relative path cannot resolve
        // against (EBADF): every later path derives from this absolute one.
        config.dir =
            std::path::absolute(&config.dir).map_err(|error| io_error(&config.dir, error))?;
        if options.position_index_entries_max < POSITION_INDEX_ENTRIES_MIN {
            return Err(JournalError::Config {
                reason: "position_index_entries_max must be at least POSITION_INDEX_ENTRIES_MIN",
            });
        }
        let dir = config.dir.clone();
        let superblock_absent = !dir.join(SUPERBLOCK_FILE_NAME).exists();
        if !options.create
            && superblock_absent
            && (!dir.exists() || segments_list(&dir)?.is_empty())
        {
            return Err(JournalError::Missing { path: dir });
        }
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|error| io_error(&dir, error))?;
            // Make the new directory's own entry durable.
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)
                    .and_then(|parent| parent.sync_all())
                    .map_err(|error| io_error(parent, error))?;
            }
        }
        let directory = Directory::open(&dir)
            .await
            .map_err(|error| io_error(&dir, error))?;
        let segments = segments_list(&dir)?;
        let segment_oldest = segments.first().copied().unwrap_or(0);
        let (superblock_file, mut superblock, created) = superblock_open(
            &config,
            &directory,
            !segments.is_empty(),
            (options.replacing, options.settings_digest),
        )
        .await?;
        if superblock.segment_bytes != config.segment_bytes {
            return Err(JournalError::Config {
                reason: "segment_bytes differs from the one this journal was created with",
            });
        }
        if let Some(given) = options.settings_digest {
            match superblock.settings_digest {
                // Recorded from the next superblock write on (every write starts from this).
                0 => superblock.settings_digest = given,
                recorded if recorded != given => {
                    return Err(JournalError::SettingsChanged {
                        path: dir.clone(),
                        recorded,
                        given,
                    });
                }
                _ => {}
            }
        }
        let snapshots_removed = snapshots_stale_remove(&dir, &superblock)?;
        // A spare left by an earlier process may be partly written or not durable.
        let spare_path = dir.join(SEGMENT_SPARE_FILE_NAME);
        if file_remove(&spare_path).await? {
            tracing::info!(path = %spare_path.display(), "removed a leftover spare segment file");
        }
        if superblock.checkpoint.op > 0 {
            let (path, meta, file) = snapshot_read(&config, &superblock).await?;
            let bytes = &file[SNAPSHOT_HEADER_BYTES..][..meta.snapshot_bytes as usize];
            restore(&meta, bytes).map_err(|error| JournalError::SnapshotRestore { path, error })?;
        }

        let mut recovery = Recovery::new(&config, &options, &superblock, segments);
        let (segment_file, end) = recovery.run(&mut replay, &superblock_file).await?;
        if end.directory_changed || snapshots_removed > 0 {
            directory
                .sync()
                .await
                .map_err(|error| io_error(&dir, error))?;
        }

        let staging = segment_file.alloc_dma_buffer(config.write_buffer_bytes);
        let superblock_buffer = Rc::new(superblock_file.alloc_dma_buffer(SUPERBLOCK_BYTES));
        let runs_max = config.write_buffer_bytes / SECTOR_BYTES;
        let recovered = Recovered {
            op_last: recovery.op_next - 1,
            checkpoint_op: superblock.checkpoint.op,
            entries: recovery.entries_replayed,
            tail: end.tail,
            recovering: (recovery.op_promised >= recovery.op_next).then_some(recovery.op_promised),
            replacing: superblock.replacing,
        };
        // Recovery raised the superblock's promise before it cut a corrupt entry.
        let superblock = recovery.superblock;
        let op_replayed = superblock.checkpoint.op + recovery.entries_replayed;
        assert!(op_replayed <= recovered.op_last);
        assert!(op_replayed <= recovery.replay_op_max.max(superblock.checkpoint.op));
        let reads_buffered = Cell::new(recovery.reads_buffered.get());
        let position_index = recovery.position_index;
        // Every recovered op from the index's first on was recorded.
        debug_assert_eq!(
            position_index.positions.is_empty(),
            recovered.op_last < position_index.op_first
        );
        assert!(recovered.op_last >= superblock.checkpoint.op);
        let entry_bytes_max = ENTRY_HEADER_BYTES + config.body_bytes_max;
        let spare = Rc::new(SegmentSpare::new(
            &dir,
            config.segment_bytes,
            config.fsync,
            end.position.offset,
        ));
        let journal = Journal {
            segment_path: segment_path(&dir, end.position.segment),
            superblock_path: dir.join(SUPERBLOCK_FILE_NAME),
            directory,
            superblock_file,
            superblock_buffer,
            segment_file,
            position_durable: end.position,
            position_staged: end.position,
            staging,
            staged_bytes: 0,
            staged_runs: Vec::with_capacity(runs_max),
            staged_entries: Vec::with_capacity(runs_max),
            position_index,
            read_cursor: None,
            reader: None,
            reads_buffered,
            op_durable: recovered.op_last,
            view_durable: recovery.view_last.max(superblock.view),
            op_staged: recovered.op_last,
            view_staged: recovery.view_last.max(superblock.view),
            checksum_staged: recovery.checksum_previous,
            superblock,
            config,
            failed: false,
            records_max: options.records_max,
            segment_oldest,
            checkpoint_entry: Vec::with_capacity(entry_bytes_max),
            op_replayed,
            op_promised: recovered.recovering.unwrap_or(0),
            created,
            spare,
            recycled: VecDeque::with_capacity(SEGMENTS_RECYCLED_MAX),
            switches_recycled: 0,
            recycled_taken: 0,
        };
        Ok((journal, recovered))
    }

    /// Stages one batch: encodes header and body into the write buffer. The caller assigns
    /// the op: `meta.op` must be `op_last + 1` (counting staged entries). No I/O, no
    /// allocation.
    pub fn stage(&mut self, meta: EntryMeta, body: &[u8]) -> Result<(), JournalError> {
        let split = body.len().min(meta.records_bytes());
        self.stage_parts(meta, &body[..split], &body[split..])
    }

    /// [`Journal::stage`] of a body in two parts: the records and the request descriptors'
    /// bytes.
    pub fn stage_parts(
        &mut self,
        meta: EntryMeta,
        records: &[u8],
        requests: &[u8],
    ) -> Result<(), JournalError> {
        self.check_usable()?;
        let body_len = records.len() + requests.len();
        if body_len > self.config.body_bytes_max {
            return Err(JournalError::BatchTooLarge {
                entry_bytes: body_len,
                entry_bytes_max: self.config.body_bytes_max,
            });
        }
        if meta.op != self.op_staged + 1 || meta.shard != self.config.shard {
            return Err(JournalError::NotNext {
                op: meta.op,
                op_expected: self.op_staged + 1,
                shard: meta.shard,
                shard_expected: self.config.shard,
            });
        }
        if records.len() != meta.records_bytes() || body_len as u64 != meta.body_bytes() {
            return Err(JournalError::BodySizeMismatch {
                body_bytes: body_len,
                entry_count: meta.entry_count,
                record_bytes: meta.record_bytes,
            });
        }
        let entry_bytes_padded = format::entry_bytes_padded(body_len);
        let (position, start) = self.slot_reserve(entry_bytes_padded)?;
        let slot = &mut self.staging.as_bytes_mut()[start..start + entry_bytes_padded];
        // Writes the padding as zeros too: stale buffer contents never reach the disk.
        let (encoded_bytes, checksum) =
            format::encode_entry_parts(slot, &meta, records, requests, self.checksum_staged);
        assert_eq!(encoded_bytes, entry_bytes_padded);
        let staged = StagedEntry {
            staging_start: start,
            entry_bytes: ENTRY_HEADER_BYTES + body_len,
        };
        self.staged_append(position, staged, &meta, checksum);
        Ok(())
    }

    /// Stages an entry encoded by another replica's journal (the bytes
    /// [`Journal::staged_entry`] returned there: header + body, unpadded), after verifying
    /// every checksum, that it is this shard's next op, and that it chains to
    /// [`Journal::checksum_staged`]. The bytes are placed exactly as [`Journal::stage`] places
    /// an entry (zero padding, segment roll-over), so both journals write identical bytes.
    /// Returns the entry's checksum. On an error nothing is staged and the journal stays
    /// usable. No I/O, no allocation.
    pub fn stage_encoded(&mut self, entry: &[u8]) -> Result<JournalChecksum, JournalError> {
        self.check_usable()?;
        let op_expected = self.op_staged + 1;
        let decoded = format::decode_entry(entry, self.config.body_bytes_max)
            .map_err(|error| JournalError::EntryInvalid { op_expected, error })?;
        let entry_bytes = ENTRY_HEADER_BYTES + decoded.body.len();
        if entry.len() != entry_bytes {
            return Err(JournalError::EntryLengthMismatch {
                bytes: entry.len(),
                entry_bytes,
            });
        }
        let meta = decoded.meta;
        if meta.entry_count as usize > self.records_max {
            return Err(JournalError::RecordsOverLimit {
                shard: self.config.shard,
                op: meta.op,
                records: meta.entry_count,
                max: self.records_max,
            });
        }
        if meta.op != op_expected || meta.shard != self.config.shard {
            return Err(JournalError::NotNext {
                op: meta.op,
                op_expected,
                shard: meta.shard,
                shard_expected: self.config.shard,
            });
        }
        if decoded.checksum_previous != self.checksum_staged {
            return Err(JournalError::ChainMismatch {
                op: meta.op,
                checksum_previous_expected: self.checksum_staged,
                checksum_previous_found: decoded.checksum_previous,
            });
        }
        let checksum = decoded.checksum;
        debug_assert_eq!(
            decoded.padded_bytes,
            format::entry_bytes_padded(decoded.body.len())
        );
        let (position, start) = self.slot_reserve(decoded.padded_bytes)?;
        let slot = &mut self.staging.as_bytes_mut()[start..start + decoded.padded_bytes];
        slot[..entry_bytes].copy_from_slice(entry);
        // The padding `encode_entry` writes: zeros, so the leader's and this file agree.
        slot[entry_bytes..].fill(0);
        let staged = StagedEntry {
            staging_start: start,
            entry_bytes,
        };
        self.staged_append(position, staged, &meta, checksum);
        Ok(checksum)
    }

    /// Finds room for an entry of `entry_bytes_padded` bytes: its file position (an entry
    /// never spans two segments: roll when it would cross the end) and its start in the
    /// staging buffer.
    fn slot_reserve(&self, entry_bytes_padded: usize) -> Result<(Position, usize), JournalError> {
        if self.staged_bytes + entry_bytes_padded > self.config.write_buffer_bytes {
            return Err(JournalError::BufferFull {
                staged_bytes: self.staged_bytes,
                entry_bytes: entry_bytes_padded,
            });
        }
        let mut position = self.position_staged;
        if position.offset + entry_bytes_padded as u64 > self.config.segment_bytes {
            position = Position {
                segment: position.segment + 1,
                offset: 0,
            };
        }
        Ok((position, self.staged_bytes))
    }

    /// Accounts for an entry just written into the staging buffer at `staged.staging_start`,
    /// to go to `position`.
    fn staged_append(
        &mut self,
        position: Position,
        staged: StagedEntry,
        meta: &EntryMeta,
        checksum: JournalChecksum,
    ) {
        let start = staged.staging_start;
        let entry_bytes_padded = staged.entry_bytes.next_multiple_of(SECTOR_BYTES);
        let end = start + entry_bytes_padded;
        debug_assert_eq!(start, self.staged_bytes);
        debug_assert_eq!(meta.op, self.op_staged + 1);
        match self.staged_runs.last_mut() {
            Some(run) if run.segment == position.segment => {
                debug_assert_eq!(
                    run.offset + (run.staging_end - run.staging_start) as u64,
                    position.offset
                );
                run.staging_end = end;
            }
            _ => {
                // Capacity is one run per sector of write buffer: pushing never reallocates.
                assert!(self.staged_runs.len() < self.staged_runs.capacity());
                self.staged_runs.push(StagedRun {
                    staging_start: start,
                    staging_end: end,
                    segment: position.segment,
                    offset: position.offset,
                });
            }
        }
        // Every entry takes at least a sector: one slot per sector never reallocates.
        assert!(self.staged_entries.len() < self.staged_entries.capacity());
        self.staged_entries.push(staged);
        self.position_index.record(meta.op, position);
        self.staged_bytes = end;
        self.position_staged = Position {
            segment: position.segment,
            offset: position.offset + entry_bytes_padded as u64,
        };
        self.op_staged = meta.op;
        self.view_staged = self.view_staged.max(meta.view);
        self.checksum_staged = checksum;
    }

    /// The encoded bytes (header + body, no padding) of `op`, staged and not yet committed;
    /// `None` for any other op, or after a failed commit. What a leader sends followers,
    /// who pass it to [`Journal::stage_encoded`].
    pub fn staged_entry(&self, op: u64) -> Option<&[u8]> {
        if self.failed || op <= self.op_durable || op > self.op_staged {
            return None;
        }
        let index = usize::try_from(op - self.op_durable - 1).ok()?;
        let staged = self.staged_entries.get(index)?;
        let bytes = &self.staging.as_bytes()
            [staged.staging_start..staged.staging_start + staged.entry_bytes];
        debug_assert_eq!(
            format::decode_entry_header(bytes, self.config.body_bytes_max).map(|h| h.op),
            Ok(op)
        );
        Some(bytes)
    }

    /// Highest op staged (equal to [`Journal::op_durable`] when nothing is staged).
    pub fn op_staged(&self) -> u64 {
        self.op_staged
    }

    /// The chain head: checksum of the last staged entry; after open, of the last recovered
    /// entry ([`percore_engine::journal::JOURNAL_CHAIN_ROOT`] when the journal is empty). The next entry, staged or
    /// encoded elsewhere, must chain to it.
    pub fn checksum_staged(&self) -> JournalChecksum {
        self.checksum_staged
    }

    /// First op this journal holds and [`Journal::read_entry`] can return (the op after the
    /// checkpoint).
    pub fn op_first(&self) -> u64 {
        self.position_index.op_first
    }

    /// Largest entry (header + body, bytes) `read_entry` returns: the capacity its `out`
    /// buffer grows to.
    pub fn entry_bytes_max(&self) -> usize {
        ENTRY_HEADER_BYTES + self.config.body_bytes_max
    }

    /// How full the position index is; its memory is fixed at open.
    pub fn position_index_usage(&self) -> PositionIndexUsage {
        self.position_index.usage()
    }

    /// Bytes staged and not yet written.
    pub fn staged_bytes(&self) -> usize {
        self.staged_bytes
    }

    /// Capacity of the staging buffer: `staged_bytes() + entry_bytes_padded(body)` must not
    /// exceed it for `stage` to succeed.
    pub fn write_buffer_bytes(&self) -> usize {
        self.config.write_buffer_bytes
    }

    /// The configuration the journal was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.config
    }

    /// Highest op written (and durable under [`FsyncPolicy::Always`] and
    /// [`FsyncPolicy::Dsync`]).
    pub fn op_durable(&self) -> u64 {
        self.op_durable
    }

    /// Group commit: writes everything staged, one O_DIRECT write per segment touched (one,
    /// unless an entry rolls over to a new segment), then one `fdatasync` per segment
    /// written under [`FsyncPolicy::Always`] (none under [`FsyncPolicy::Dsync`]: the
    /// writes were durable when they completed). Returns the highest op now durable. After an
    /// error, or if this future is dropped before it finishes, the journal refuses further
    /// use ([`JournalError::Failed`]): what reached the disk is unknown until recovery.
    pub async fn commit(&mut self) -> Result<u64, JournalError> {
        self.check_usable()?;
        if self.staged_bytes == 0 {
            return Ok(self.op_durable);
        }
        self.failed = true;
        if self.staged_runs.len() == 1 {
            self.commit_one_run().await?;
        } else {
            self.commit_runs().await?;
        }
        // Under Dsync the segment is O_DSYNC: each write above was durable on completion.
        if self.config.fsync == FsyncPolicy::Always {
            fdatasync(&self.segment_file, &self.segment_path).await?;
        }
        self.failed = false;

        assert_eq!(self.position_durable, self.position_staged);
        self.staged_bytes = 0;
        self.staged_runs.clear();
        self.staged_entries.clear();
        self.op_durable = self.op_staged;
        self.view_durable = self.view_staged;
        self.spare.used_bytes.set(self.position_durable.offset);
        if self.op_durable >= self.op_promised {
            // The promise holds again: the superblock's op_durable is at or below the head.
            self.op_promised = 0;
        }
        Ok(self.op_durable)
    }

    /// The next segment's spare, for the runtime to run its preparer
    /// ([`SegmentSpare::run`]) beside the shard; without it every segment is created at its
    /// roll-over.
    pub fn segment_spare(&self) -> Rc<SegmentSpare> {
        self.spare.clone()
    }

    /// The `op_durable` every superblock written keeps while the replica recovers lost
    /// entries ([`Recovered::recovering`]); 0 when there is none.
    pub fn op_promised(&self) -> u64 {
        self.op_promised
    }

    /// The replica left recovering without the journal reaching the promise (it installed
    /// a newer view's log whole, or no peer held the rest: `docs/protocol.md` 8): writes a
    /// superblock whose `op_durable` is the journal's head, and clears the
    /// [`Superblock::replacing`] mark of a replaced replica that rebuilt. Nothing when there
    /// is neither.
    pub async fn promise_release(&mut self) -> Result<(), JournalError> {
        self.check_usable()?;
        if self.op_promised == 0 && !self.superblock.replacing {
            return Ok(());
        }
        self.op_promised = 0;
        self.superblock.replacing = false;
        self.superblock_store(self.superblock).await
    }

    /// The superblock is marked [`Superblock::replacing`]: the replica has not finished
    /// rebuilding after it lost its disk.
    pub fn replacing(&self) -> bool {
        self.superblock.replacing
    }

    /// The common case: one contiguous write straight from the staging buffer (no copy);
    /// the staging buffer is replaced by a fresh one (one allocation per group commit).
    async fn commit_one_run(&mut self) -> Result<(), JournalError> {
        let run = self.staged_runs[0];
        debug_assert_eq!((run.staging_start, run.staging_end), (0, self.staged_bytes));
        self.segment_switch(run.segment).await?;
        let fresh = self
            .segment_file
            .alloc_dma_buffer(self.config.write_buffer_bytes);
        let mut filled = std::mem::replace(&mut self.staging, fresh);
        filled.trim_to_size(self.staged_bytes);
        write_all(&self.segment_file, &self.segment_path, filled, run.offset).await?;
        self.position_durable = Position {
            segment: run.segment,
            offset: run.offset + self.staged_bytes as u64,
        };
        Ok(())
    }

    /// The roll-over case (rare: once per segment): each run is copied into its own buffer
    /// and written in order; a segment is synced before the next one is created.
    async fn commit_runs(&mut self) -> Result<(), JournalError> {
        for index in 0..self.staged_runs.len() {
            let run = self.staged_runs[index];
            self.segment_switch(run.segment).await?;
            let length = run.staging_end - run.staging_start;
            let mut buffer = self.segment_file.alloc_dma_buffer(length);
            buffer
                .as_bytes_mut()
                .copy_from_slice(&self.staging.as_bytes()[run.staging_start..run.staging_end]);
            write_all(&self.segment_file, &self.segment_path, buffer, run.offset).await?;
            self.position_durable = Position {
                segment: run.segment,
                offset: run.offset + length as u64,
            };
        }
        Ok(())
    }

    /// Makes `segment` the open segment, creating it (and syncing the one before and the
    /// directory) if it is the next one.
    async fn segment_switch(&mut self, segment: u64) -> Result<(), JournalError> {
        let current = self.position_durable.segment;
        if segment == current {
            return Ok(());
        }
        assert_eq!(segment, current + 1, "segments are written in order");
        let dir = self.config.dir.clone();
        if self.config.fsync.is_durable() {
            // Entries in the old segment must be durable before any in the new one, so that
            // recovery never sees a later segment past a torn one.
            fdatasync(&self.segment_file, &segment_path(&dir, current)).await?;
        }
        let path = segment_path(&dir, segment);
        let recycled = match self.recycled.pop_front() {
            Some(old) => {
                self.recycled_taken += 1;
                self.segment_recycle(old, &path).await
            }
            None => None,
        };
        let file = if let Some(file) = recycled {
            // Written blocks (a released segment's entries): appends overwrite them and their
            // fdatasync has no extent metadata to commit. The bytes after the new entries are
            // older entries, which recovery reads as the segment's end (module docs).
            self.switches_recycled += 1;
            file
        } else if let Some(file) = self.spare.take() {
            // Every byte of it is written (zeros) and durable: appends overwrite allocated,
            // initialized blocks, so their fdatasync has no extent metadata to commit.
            let renamed = file.rename(&path).await;
            self.spare.renamed();
            renamed.map_err(|error| io_error(&path, error))?;
            self.spare.count(&self.spare.switches_prepared);
            file
        } else {
            self.spare.count(&self.spare.switches_unprepared);
            segment_create(&dir, segment, self.config.segment_bytes, self.config.fsync).await?
        };
        self.spare.used_bytes.set(0);
        if self.config.fsync.is_durable() {
            fdatasync(&file, &path).await?;
            self.directory
                .sync()
                .await
                .map_err(|error| io_error(&dir, error))?;
        }
        let old = std::mem::replace(&mut self.segment_file, file);
        let old_path = std::mem::replace(&mut self.segment_path, segment_path(&dir, segment));
        old.close()
            .await
            .map_err(|error| io_error(&old_path, error))?;
        self.position_durable = Position { segment, offset: 0 };
        Ok(())
    }

    /// Writes the superblock (alternating copy) with `op_durable` and the view of the last
    /// durable entry, checkpoint fields, `log_view` and `commit_max` unchanged (views never
    /// go back), then `fdatasync`s it.
    pub async fn write_superblock(&mut self) -> Result<(), JournalError> {
        self.check_usable()?;
        self.superblock_store(self.superblock).await
    }

    /// Writes and `fdatasync`s a superblock with these views and `commit_max`, the current
    /// `op_durable`, checkpoint fields unchanged. The superblock's `view` is the larger of
    /// `view` and the view of the last durable entry. [`Journal::views`] returns them.
    ///
    /// # Panics
    /// On a caller bug, which would persist a promise the replica already made otherwise:
    /// `log_view > view`, or `view`, `log_view` or `commit_max` below the last written.
    pub async fn write_views(
        &mut self,
        view: u64,
        log_view: u64,
        commit_max: u64,
    ) -> Result<(), JournalError> {
        self.check_usable()?;
        let last = self.superblock;
        assert!(log_view <= view, "log_view {log_view} above view {view}");
        assert!(view >= last.view, "view {view} below {}", last.view);
        assert!(
            log_view >= last.log_view,
            "log_view {log_view} below {}",
            last.log_view
        );
        assert!(
            commit_max >= last.commit_max,
            "commit_max {commit_max} below {}",
            last.commit_max
        );
        let superblock = Superblock {
            view,
            log_view,
            commit_max,
            ..last
        };
        self.superblock_store(superblock).await?;
        debug_assert_eq!(
            self.views(),
            (view.max(self.view_durable), log_view, commit_max)
        );
        Ok(())
    }

    /// `(view, log_view, commit_max)` as last written (or read at open; `(0, 0, 0)` for a
    /// fresh journal).
    pub fn views(&self) -> (u64, u64, u64) {
        let superblock = &self.superblock;
        (superblock.view, superblock.log_view, superblock.commit_max)
    }

    /// Highest op recovery replayed into the state machine (or restored from the checkpoint):
    /// the journal's head, or less under [`JournalOptions::replay_committed_only`]. Fixed at
    /// open; ops above it are the caller's to apply once known committed.
    pub fn op_replayed(&self) -> u64 {
        self.op_replayed
    }

    /// Whether this open created the journal (there was no superblock): no earlier process
    /// ran from it, so none can have sent entries it lost. A replicated leader uses it to
    /// tell a first start from a restart (`percore_engine::replica::Replica::new`).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Writes `superblock` with the next sequence, `op_durable` and the durable view into
    /// the slot that sequence belongs to, `fdatasync`s it, and makes it the current one.
    async fn superblock_store(&mut self, superblock: Superblock) -> Result<(), JournalError> {
        self.superblock_store_at(superblock, self.op_durable).await
    }

    /// [`Journal::superblock_store`] with an explicit `op_durable` (truncation lowers it
    /// before the journal shrinks). Views never go back: `view` is at least the durable
    /// entries' view and the last written one.
    async fn superblock_store_at(
        &mut self,
        superblock: Superblock,
        op_durable: u64,
    ) -> Result<(), JournalError> {
        let superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            // A recovering replica keeps its promise across restarts (protocol.md 8).
            op_durable: op_durable.max(self.op_promised),
            view: self.view_durable.max(superblock.view),
            // Only `promise_release` clears the mark, and nothing sets it again.
            replacing: self.superblock.replacing,
            ..superblock
        };
        assert!(superblock.checkpoint.op >= self.superblock.checkpoint.op);
        assert!(
            superblock.view >= self.superblock.view
                && superblock.log_view >= self.superblock.log_view
                && superblock.commit_max >= self.superblock.commit_max,
            "views and commit_max never go back"
        );

        // glommio drops its clone when the write completes, so this is unique again; if
        // not (it never should be), take a fresh buffer rather than wait.
        if Rc::get_mut(&mut self.superblock_buffer).is_none() {
            self.superblock_buffer =
                Rc::new(self.superblock_file.alloc_dma_buffer(SUPERBLOCK_BYTES));
        }
        let buffer = Rc::get_mut(&mut self.superblock_buffer).expect("unique");
        let bytes: &mut [u8; SUPERBLOCK_BYTES] = buffer
            .as_bytes_mut()
            .try_into()
            .expect("superblock buffer is SUPERBLOCK_BYTES long");
        format::encode_superblock(&superblock, bytes);

        let path = &self.superblock_path;
        let offset = (superblock.sequence % SUPERBLOCK_COPIES) * SUPERBLOCK_BYTES as u64;
        self.failed = true;
        let written = self
            .superblock_file
            .write_rc_at(Rc::clone(&self.superblock_buffer), offset)
            .await
            .map_err(|error| io_error(path, error))?;
        if written != SUPERBLOCK_BYTES {
            return Err(io_error(path, std::io::ErrorKind::WriteZero));
        }
        fdatasync(&self.superblock_file, path).await?;
        self.failed = false;
        self.superblock = superblock;
        Ok(())
    }

    /// The superblock as last written (or read at open).
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// State sync: makes the checkpoint of `meta` (a snapshot fetched from a peer;
    /// `snapshot` is its bytes after the header, verified by the caller, and `meta.op` is
    /// above everything durable here) the start of this journal, which then holds nothing
    /// after it. In order: writes the snapshot file; creates the next segment, empty; writes
    /// the superblock (both checkpoints at `meta.op`, positioned at the start of that
    /// segment; `op_durable` and `commit_max` at least `meta.op`), which is the commit
    /// point: a crash before it recovers the old journal, after it the new one; then removes
    /// the older segments and snapshots. Nothing may be staged.
    ///
    /// The journal is unusable afterwards ([`JournalError::Failed`]): the caller opens the
    /// directory again ([`Journal::open_checkpointed`]), which recovers to `meta.op`.
    pub async fn install_synced_checkpoint(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: &[u8],
    ) -> Result<(), JournalError> {
        self.check_usable()?;
        assert!(self.staged_entries.is_empty(), "commit before a sync");
        if meta.op <= self.op_durable || meta.cluster_id != self.config.cluster_id {
            return Err(JournalError::CheckpointOp {
                op: meta.op,
                checkpoint_op: self.superblock.checkpoint.op,
                op_durable: self.op_durable,
            });
        }
        self.snapshot_write(meta, snapshot).await?;
        let segment = self.position_durable.segment + 1;
        let file = segment_create(
            &self.config.dir,
            segment,
            self.config.segment_bytes,
            self.config.fsync,
        )
        .await?;
        fdatasync(&file, &segment_path(&self.config.dir, segment)).await?;
        let _ = file.close().await;
        self.directory
            .sync()
            .await
            .map_err(|error| io_error(&self.config.dir, error))?;
        let checkpoint = Checkpoint {
            op: meta.op,
            segment,
            offset: 0,
            checksum: meta.checkpoint_checksum,
        };
        let superblock = Superblock {
            checkpoint,
            checkpoint_previous: checkpoint,
            snapshot_checksum: meta.snapshot_checksum,
            commit_max: self.superblock.commit_max.max(meta.op),
            ..self.superblock
        };
        self.superblock_store_at(superblock, meta.op).await?;
        // Past the commit point: from here on this object no longer describes the journal.
        self.failed = true;
        for old in self.segment_oldest..segment {
            file_remove(&segment_path(&self.config.dir, old)).await?;
        }
        snapshots_stale_remove(&self.config.dir, &self.superblock)?;
        Ok(())
    }

    /// Removes snapshot files no retained checkpoint names (one the checkpoint follower
    /// wrote but the shard did not install before stopping) and temporary snapshot files.
    /// Blocking directory listing: for shutdown. Returns the files removed.
    pub fn remove_stale_snapshots(&self) -> Result<u64, JournalError> {
        snapshots_stale_remove(&self.config.dir, &self.superblock)
    }

    /// Op of the latest checkpoint (0: none).
    pub fn checkpoint_op(&self) -> u64 {
        self.superblock.checkpoint.op
    }

    /// Takes a checkpoint at `op`: `snapshot` is the state machine's snapshot after applying
    /// `op` (durable, after the latest checkpoint) and `digest` its digest. In order:
    /// reads entry `op` back (its checksum and where the next entry goes), writes
    /// `snapshot-<op>.state` (temporary name, `fdatasync`, rename, directory sync), writes the
    /// superblock, then removes what no retained checkpoint needs: segments holding only ops
    /// at or below the previous checkpoint and below `retain_from_op` (the lowest op a peer
    /// may still need: pass 0 or 1 to keep everything), and the snapshot before the previous
    /// one. A crash at any point leaves a journal that recovers from the old or the new
    /// checkpoint. Allocates only the snapshot writer's buffers (not a hot path).
    pub async fn checkpoint(
        &mut self,
        op: u64,
        snapshot: &[u8],
        digest: Digest256,
        retain_from_op: u64,
    ) -> Result<CheckpointDone, JournalError> {
        self.checkpoint_writing(op, snapshot, digest, retain_from_op, true)
            .await
    }

    /// [`Journal::checkpoint`], but without removing files: as after
    /// [`Journal::checkpoint_install`], the journal forgets the segments below
    /// [`CheckpointDone::segments_below`] and the snapshot of
    /// [`CheckpointDone::snapshot_stale_op`], and the caller removes the files
    /// ([`remove_released`]) where the removal holds nothing up (files left behind by a
    /// crash are removed by a later checkpoint).
    pub async fn checkpoint_keeping_files(
        &mut self,
        op: u64,
        snapshot: &[u8],
        digest: Digest256,
        retain_from_op: u64,
    ) -> Result<CheckpointDone, JournalError> {
        self.checkpoint_writing(op, snapshot, digest, retain_from_op, false)
            .await
    }

    async fn checkpoint_writing(
        &mut self,
        op: u64,
        snapshot: &[u8],
        digest: Digest256,
        retain_from_op: u64,
        remove_files: bool,
    ) -> Result<CheckpointDone, JournalError> {
        self.check_usable()?;
        if op <= self.superblock.checkpoint.op || op > self.op_durable {
            return Err(JournalError::CheckpointOp {
                op,
                checkpoint_op: self.superblock.checkpoint.op,
                op_durable: self.op_durable,
            });
        }
        let checkpoint = self.checkpoint_locate(op).await?;
        let meta = SnapshotMeta {
            cluster_id: self.config.cluster_id,
            shard: self.config.shard,
            op,
            snapshot_bytes: snapshot.len() as u64,
            checkpoint_checksum: checkpoint.checksum,
            snapshot_checksum: format::journal_checksum(snapshot),
            digest,
        };
        self.snapshot_write(&meta, snapshot).await?;
        self.checkpoint_record(checkpoint, &meta, retain_from_op, remove_files)
            .await
    }

    /// Installs a checkpoint whose snapshot file another thread has already written
    /// durably under its final name (the checkpoint follower, [`crate::checkpoint`]), which
    /// also read entry `meta.op` and says where the next entry starts (`position_after`,
    /// segment and file offset; the entry's checksum is `meta.checkpoint_checksum`): checks
    /// the position against what this journal holds, then writes the superblock and
    /// *releases* what no retained checkpoint needs,
    /// as [`Journal::checkpoint`] does after its own file write, but without unlinking: the
    /// journal forgets the segments below [`CheckpointDone::segments_below`] and the
    /// snapshot of [`CheckpointDone::snapshot_stale_op`], and the caller removes the files
    /// off this thread (unlinking a large pre-allocated file takes milliseconds; files left
    /// behind by a crash are removed at the next open or checkpoint).
    pub async fn checkpoint_install(
        &mut self,
        meta: &SnapshotMeta,
        position_after: (u64, u64),
        retain_from_op: u64,
    ) -> Result<CheckpointDone, JournalError> {
        self.check_usable()?;
        let op = meta.op;
        if op <= self.superblock.checkpoint.op || op > self.op_durable {
            return Err(JournalError::CheckpointOp {
                op,
                checkpoint_op: self.superblock.checkpoint.op,
                op_durable: self.op_durable,
            });
        }
        let (segment, offset) = position_after;
        let durable = self.position_durable;
        if segment < self.segment_oldest
            || (segment, offset) > (durable.segment, durable.offset)
            || !offset.is_multiple_of(SECTOR_BYTES as u64)
        {
            return Err(JournalError::CheckpointOp {
                op,
                checkpoint_op: self.superblock.checkpoint.op,
                op_durable: self.op_durable,
            });
        }
        let checkpoint = Checkpoint {
            op,
            segment,
            offset,
            checksum: meta.checkpoint_checksum,
        };
        self.checkpoint_record(checkpoint, meta, retain_from_op, false)
            .await
    }

    /// The end of a checkpoint, once its snapshot file is durable: the superblock, then the
    /// removals.
    async fn checkpoint_record(
        &mut self,
        checkpoint: Checkpoint,
        meta: &SnapshotMeta,
        retain_from_op: u64,
        remove_files: bool,
    ) -> Result<CheckpointDone, JournalError> {
        // The snapshot no checkpoint names once this one is recorded: the previous one's,
        // unless it is the latest's too (a journal that a state sync started at a peer's
        // checkpoint holds it as both), which becomes the new previous one.
        let snapshot_stale_op =
            if self.superblock.checkpoint_previous.op == self.superblock.checkpoint.op {
                0
            } else {
                self.superblock.checkpoint_previous.op
            };
        let superblock = Superblock {
            checkpoint_previous: self.superblock.checkpoint,
            checkpoint,
            snapshot_checksum: meta.snapshot_checksum,
            ..self.superblock
        };
        self.superblock_store(superblock).await?;

        let segment_first = self.segment_oldest;
        let segments_below = self.segments_release(retain_from_op);
        let mut segments_removed = 0;
        let mut snapshots_removed = 0;
        if remove_files {
            for segment in segment_first..segments_below {
                let path = segment_path(&self.config.dir, segment);
                segments_removed += u64::from(file_remove(&path).await?);
            }
            if snapshot_stale_op > 0 {
                let path = self
                    .config
                    .dir
                    .join(format::snapshot_file_name(snapshot_stale_op));
                snapshots_removed += u64::from(file_remove(&path).await?);
            }
        }
        debug_assert!(self.position_index.op_first <= self.superblock.checkpoint_previous.op + 1);
        Ok(CheckpointDone {
            checkpoint,
            snapshot_bytes: meta.snapshot_bytes,
            segments_released: segments_below - segment_first,
            segments_below,
            snapshot_stale_op,
            segments_removed,
            snapshots_removed,
            op_first: self.position_index.op_first,
        })
    }

    /// Removes every entry after `op` (a divergent suffix, `docs/protocol.md` 7.4) so that
    /// none can come back at recovery, and returns the checksum of entry `op` (the chain value
    /// the next entry, `op + 1`, must continue; [`percore_engine::journal::JOURNAL_CHAIN_ROOT`] for op 0). Nothing
    /// may be staged: commit first. `op` equal to [`Journal::op_durable`] removes nothing.
    ///
    /// In order, so that a crash at any point leaves a journal that recovers to either a
    /// prefix of the old one or the truncated one: first, if the superblock's `op_durable`
    /// is above `op`, a superblock with `op_durable = op` (views unchanged); then, from the
    /// last down, every segment after the one holding the end of entry `op`, each removal
    /// followed by a directory sync; then that segment is cut at the end of entry `op`
    /// (sector aligned: entries are padded) and pre-allocated back, so the rest reads as
    /// zeros, and `fdatasync`ed. Afterwards `read_entry(op)` works, `read_entry(op + 1)` is
    /// [`JournalError::OpNotReadable`], and `stage`/`stage_encoded` continue at `op + 1`.
    ///
    /// Errors: [`JournalError::TruncateBelowCheckpoint`] when `op` is below the latest
    /// checkpoint (its snapshot has applied those ops); [`JournalError::OpNotReadable`] when
    /// it is above `op_durable` (the journal does not hold it); I/O errors leave the journal
    /// [`JournalError::Failed`] (reopen to recover).
    ///
    /// # Panics
    /// On a caller bug: entries are staged.
    pub async fn truncate_after(&mut self, op: u64) -> Result<JournalChecksum, JournalError> {
        self.check_usable()?;
        assert_eq!(self.staged_bytes, 0, "commit before truncating");
        assert_eq!(self.op_staged, self.op_durable);
        let checkpoint_op = self.superblock.checkpoint.op;
        if op < checkpoint_op {
            return Err(JournalError::TruncateBelowCheckpoint { op, checkpoint_op });
        }
        if op > self.op_durable {
            return Err(JournalError::OpNotReadable {
                op,
                op_first: self.position_index.op_first,
                op_durable: self.op_durable,
            });
        }
        if op == self.op_durable {
            self.superblock_lower(op).await?;
            return Ok(self.checksum_staged);
        }
        debug_assert!(op + 1 >= self.position_index.op_first);
        // Where entry `op + 1` goes, and the chain value there. Entry `op` is read back and
        // verified unless it is the checkpoint's (whose entry may be in a removed segment).
        let end = if op == checkpoint_op {
            self.superblock.checkpoint
        } else {
            self.checkpoint_locate(op).await?
        };
        // An entry that fills its segment ends at `segment_bytes` (a follower's reader
        // gives the checkpoint position so): op + 1 starts the next segment, which exists,
        // as ops after `op` are durable.
        let end = if end.offset == self.config.segment_bytes {
            Checkpoint {
                segment: end.segment + 1,
                offset: 0,
                ..end
            }
        } else {
            end
        };
        assert!(end.segment <= self.position_durable.segment);
        assert!(end.segment >= self.segment_oldest && end.offset < self.config.segment_bytes);

        self.superblock_lower(op).await?;
        self.failed = true;
        if let Some(reader) = self.reader.take() {
            reader
                .file
                .close()
                .await
                .map_err(|error| io_error(&reader.path, error))?;
        }
        self.read_cursor = None;
        // Bounded: one turn per segment after `end.segment`.
        while self.position_durable.segment > end.segment {
            self.segment_last_remove().await?;
        }
        self.segment_cut(end.offset).await?;
        self.failed = false;

        self.position_durable = Position {
            segment: end.segment,
            offset: end.offset,
        };
        self.position_staged = self.position_durable;
        self.op_durable = op;
        self.op_staged = op;
        self.checksum_staged = end.checksum;
        self.position_index.truncate_after(op);
        debug_assert!(
            self.position_index.positions.is_empty() == (op < self.position_index.op_first)
        );
        Ok(end.checksum)
    }

    /// Writes a superblock with `op_durable` lowered to `op` if it claims more (views and
    /// checkpoints unchanged), so that recovery never expects ops the journal no longer has.
    async fn superblock_lower(&mut self, op: u64) -> Result<(), JournalError> {
        if self.superblock.op_durable <= op {
            return Ok(());
        }
        assert!(op >= self.superblock.checkpoint.op);
        self.superblock_store_at(self.superblock, op).await
    }

    /// Removes the last segment (the open one, above entry the truncation keeps) and makes
    /// the one before it the open segment; syncs the directory so removals persist from the
    /// last down (a crash leaves a prefix of the journal, never a hole).
    async fn segment_last_remove(&mut self) -> Result<(), JournalError> {
        let segment = self.position_durable.segment;
        assert!(segment > self.segment_oldest);
        let dir = self.config.dir.clone();
        let previous_path = segment_path(&dir, segment - 1);
        let previous = segment_open(&previous_path, false, self.config.fsync).await?;
        let last = std::mem::replace(&mut self.segment_file, previous);
        let last_path = std::mem::replace(&mut self.segment_path, previous_path);
        last.close()
            .await
            .map_err(|error| io_error(&last_path, error))?;
        glommio::io::remove(&last_path)
            .await
            .map_err(|error| io_error(&last_path, error))?;
        self.directory
            .sync()
            .await
            .map_err(|error| io_error(&dir, error))?;
        // Its end is unknown here and set by the caller; only the segment matters.
        self.position_durable = Position {
            segment: segment - 1,
            offset: self.config.segment_bytes,
        };
        Ok(())
    }

    /// Cuts the open segment at `offset` (sector aligned) and pre-allocates it back, so
    /// everything after `offset` reads as zeros, then `fdatasync`s it.
    async fn segment_cut(&mut self, offset: u64) -> Result<(), JournalError> {
        assert!(offset.is_multiple_of(SECTOR_BYTES as u64));
        let (file, path) = (&self.segment_file, &self.segment_path);
        file.truncate(offset)
            .await
            .map_err(|error| io_error(path, error))?;
        file.pre_allocate(self.config.segment_bytes, false)
            .await
            .map_err(|error| io_error(path, error))?;
        fdatasync(file, path).await
    }

    /// The checkpoint at durable op `op`: reads entry `op` back (verified) for its checksum
    /// and the position after it.
    async fn checkpoint_locate(&mut self, op: u64) -> Result<Checkpoint, JournalError> {
        debug_assert!(op >= self.position_index.op_first && op <= self.op_durable);
        let location = self.locate(op).await?;
        let mut entry = std::mem::take(&mut self.checkpoint_entry);
        entry.clear();
        let read = self.entry_read(location, &mut entry).await;
        let header = read.map(|()| {
            format::decode_entry_header(&entry, self.config.body_bytes_max)
                .expect("entry_read verified it")
        });
        self.checkpoint_entry = entry;
        let header = header?;
        assert_eq!(header.op, op);
        let after = self
            .read_cursor
            .expect("entry_read moves the cursor past the entry");
        debug_assert_eq!(after.op, op + 1);
        Ok(Checkpoint {
            op,
            segment: after.position.segment,
            offset: after.position.offset,
            checksum: header.checksum_header,
        })
    }

    /// Writes the snapshot file of `meta` durably under its final name: header, bytes, zero
    /// padding to a sector (so the file needs no truncation), through a `DmaStreamWriter`
    /// into a temporary file, `fdatasync`, rename, directory sync.
    async fn snapshot_write(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: &[u8],
    ) -> Result<(), JournalError> {
        static ZEROS: [u8; SECTOR_BYTES] = [0; SECTOR_BYTES];
        let name = format::snapshot_file_name(meta.op);
        let path = self.config.dir.join(&name);
        let path_temporary = self
            .config
            .dir
            .join(format!("{name}{SNAPSHOT_TEMPORARY_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&path_temporary)
            .await
            .map_err(|error| io_error(&path_temporary, error))?;
        io_fence::hold(&file).map_err(|error| io_error(&path_temporary, error))?;
        let mut writer = DmaStreamWriterBuilder::new(file)
            .with_buffer_size(SNAPSHOT_WRITE_BUFFER_BYTES)
            .with_write_behind(SNAPSHOT_WRITE_BEHIND)
            .build();
        let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
        format::encode_snapshot_header(meta, &mut header);
        let padding = snapshot.len().next_multiple_of(SECTOR_BYTES) - snapshot.len();
        let written = async {
            writer.write_all(&header).await?;
            writer.write_all(snapshot).await?;
            writer.write_all(&ZEROS[..padding]).await?;
            writer.sync().await.map_err(std::io::Error::from)?;
            writer.close().await
        }
        .await;
        written.map_err(|error| io_error(&path_temporary, error))?;
        glommio::io::rename(&path_temporary, &path)
            .await
            .map_err(|error| io_error(&path, error))?;
        self.directory
            .sync()
            .await
            .map_err(|error| io_error(&self.config.dir, error))
    }

    /// Forgets the segments before the oldest one a retained checkpoint or a peer needs,
    /// and moves `op_first` up to match. Keeps everything from the indexed op at or before
    /// `min(previous checkpoint + 1, retain_from_op)`, and the previous checkpoint's segment
    /// (recovery starts there). Returns the first segment kept: the files below it may be
    /// removed.
    fn segments_release(&mut self, retain_from_op: u64) -> u64 {
        let previous = self.superblock.checkpoint_previous;
        let bound_op = (previous.op + 1)
            .min(retain_from_op)
            .max(self.position_index.op_first);
        let Some((op_keep, position_keep)) = self.position_index.at_or_before(bound_op) else {
            return self.segment_oldest;
        };
        let segment_keep = position_keep.segment.min(previous.segment);
        assert!(segment_keep <= self.position_durable.segment);
        self.position_index.drop_before(op_keep);
        self.segment_oldest = self.segment_oldest.max(segment_keep);
        self.segment_oldest
    }

    /// Reads durable op `op` (any op in `op_first()..=op_durable()`) back from disk into
    /// `out` (cleared first): header + body, no padding, verified with
    /// [`format::decode_entry`] (every checksum), and against the chain when the previous op
    /// was the last one read. `out` grows at most once, to [`Journal::entry_bytes_max`].
    ///
    /// The op is found from the position index (at most `stride` entry headers read forward
    /// from an indexed op, [`LOCATE_READ_BYTES`] at a time) or, for the op after the last one
    /// read, straight from a cursor: consecutive reads cost one read each (two for an entry
    /// larger than a sector). Bytes that fail verification are
    /// [`JournalError::Corrupt`], and `out` is left empty: unverified bytes are never
    /// returned.
    pub async fn read_entry(&mut self, op: u64, out: &mut Vec<u8>) -> Result<(), JournalError> {
        out.clear();
        self.check_usable()?;
        let op_first = self.position_index.op_first;
        if op < op_first || op > self.op_durable {
            return Err(JournalError::OpNotReadable {
                op,
                op_first,
                op_durable: self.op_durable,
            });
        }
        let location = self.locate(op).await?;
        let entry_bytes_max = self.entry_bytes_max();
        if out.capacity() < entry_bytes_max {
            out.reserve_exact(entry_bytes_max);
        }
        let result = self.entry_read(location, out).await;
        if result.is_err() {
            out.clear();
        }
        result
    }

    /// Where op `op` (readable) starts: from the cursor if it is at or after the nearest
    /// indexed op, else from that op, walking headers forward.
    async fn locate(&mut self, op: u64) -> Result<OpLocation, JournalError> {
        let (op_indexed, position) = self
            .position_index
            .at_or_before(op)
            .expect("every op from op_first to op_staged is indexed or after an indexed one");
        let mut start = OpLocation {
            op: op_indexed,
            position,
            may_roll: false,
            checksum_previous: None,
        };
        if let Some(cursor) = self.read_cursor
            && cursor.op <= op
            && cursor.op >= op_indexed
        {
            start = cursor;
        }
        debug_assert!(op - start.op < self.position_index.stride_ops);
        self.walk_to(start, op).await
    }

    /// Steps over entry headers from `location` until op `op`, one read of
    /// [`LOCATE_READ_BYTES`] per run of entries.
    async fn walk_to(
        &mut self,
        mut location: OpLocation,
        op: u64,
    ) -> Result<OpLocation, JournalError> {
        let segment_bytes = self.config.segment_bytes;
        // Bounded: every turn steps over at least one entry, and `op - location.op` remain.
        while location.op < op {
            let (chunk, mut header) = self.header_read(&mut location, LOCATE_READ_BYTES).await?;
            let mut relative = 0usize;
            loop {
                let padded_bytes = format::entry_bytes_padded(header.body_bytes as usize);
                location = location.after(padded_bytes, None, segment_bytes);
                relative += padded_bytes;
                if location.op == op || !location.may_roll {
                    break;
                }
                match chunk
                    .get(relative..)
                    .map(|rest| self.header_check(rest, &location))
                {
                    Some(Ok(next)) => header = next,
                    // Past the chunk, or a roll-over: the next read settles it.
                    _ => break,
                }
            }
        }
        Ok(location)
    }

    /// Reads the entry at `location` (its op) into `out`: the first sector, then the rest
    /// of the body if it is longer; verifies it; moves the cursor past it.
    async fn entry_read(
        &mut self,
        mut location: OpLocation,
        out: &mut Vec<u8>,
    ) -> Result<(), JournalError> {
        let (head, header) = self.header_read(&mut location, SECTOR_BYTES).await?;
        let entry_bytes = ENTRY_HEADER_BYTES + header.body_bytes as usize;
        let head_bytes = entry_bytes.min(SECTOR_BYTES);
        let Some(head) = head.get(..head_bytes) else {
            let error = format!("short read: {} bytes of {head_bytes}", head.len());
            return Err(self.read_corrupt(location, error));
        };
        out.extend_from_slice(head);
        if entry_bytes > head_bytes {
            let rest_bytes = entry_bytes - head_bytes;
            let rest_position = Position {
                segment: location.position.segment,
                offset: location.position.offset + SECTOR_BYTES as u64,
            };
            let rest_read = rest_bytes.next_multiple_of(SECTOR_BYTES);
            let rest = self.segment_read(rest_position, rest_read).await?;
            let Some(rest) = rest.get(..rest_bytes) else {
                let error = format!("short read: {} bytes of {rest_bytes}", rest.len());
                return Err(self.read_corrupt(location, error));
            };
            out.extend_from_slice(rest);
        }
        let entry = match format::decode_entry(out, self.config.body_bytes_max) {
            Ok(entry) => entry,
            Err(error) => return Err(self.read_corrupt(location, error.to_string())),
        };
        if entry.meta.op != location.op || entry.meta.shard != self.config.shard {
            let error = format!("found op {} of shard {}", entry.meta.op, entry.meta.shard);
            return Err(self.read_corrupt(location, error));
        }
        if let Some(checksum_previous) = location.checksum_previous
            && entry.checksum_previous != checksum_previous
        {
            let error = format!("hash chain broken: op {} does not chain", location.op);
            return Err(self.read_corrupt(location, error));
        }
        debug_assert_eq!(out.len(), entry_bytes);
        let next = location.after(
            entry.padded_bytes,
            Some(entry.checksum),
            self.config.segment_bytes,
        );
        self.read_cursor = Some(next);
        Ok(())
    }

    /// Reads `read_bytes` at `location` and checks that op `location.op` of this shard
    /// starts there. If the location may roll and holds zeros (the unwritten rest of a
    /// segment: the writer rolls over instead of splitting an entry) or anything else (the
    /// stale rest of a reused segment), tries the start of the next segment and moves
    /// `location` there. Returns the bytes read, header first, and
    /// the header.
    async fn header_read(
        &mut self,
        location: &mut OpLocation,
        read_bytes: usize,
    ) -> Result<(ReadResult, EntryHeader), JournalError> {
        // Bounded: at most two turns (here, then the start of the next segment).
        loop {
            if location.position.segment > self.position_durable.segment {
                let error = "past the last segment".to_string();
                return Err(self.read_corrupt(*location, error));
            }
            let chunk = self.segment_read(location.position, read_bytes).await?;
            match self.header_check(&chunk, location) {
                Ok(header) => return Ok((chunk, header)),
                Err(_) if location.may_roll && header_unwritten(&chunk) => {
                    *location = location.rolled();
                }
                // A reused segment holds stale bytes after its last entry, not zeros (engine
                // journal docs, "Segment boundaries"): the op may start the next segment.
                // Only if it is there; else the miss here stands.
                Err(miss) if location.may_roll => {
                    let rolled = location.rolled();
                    if rolled.position.segment <= self.position_durable.segment {
                        let next = self.segment_read(rolled.position, read_bytes).await?;
                        if let Ok(header) = self.header_check(&next, &rolled) {
                            *location = rolled;
                            return Ok((next, header));
                        }
                    }
                    return Err(self.read_corrupt(*location, miss.to_string()));
                }
                Err(miss) => return Err(self.read_corrupt(*location, miss.to_string())),
            }
        }
    }

    /// The header at the start of `bytes` if it is op `location.op` of this shard and its
    /// entry fits the segment from `location`.
    fn header_check(&self, bytes: &[u8], location: &OpLocation) -> Result<EntryHeader, HeaderMiss> {
        let header = format::decode_entry_header(bytes, self.config.body_bytes_max)
            .map_err(HeaderMiss::Invalid)?;
        if header.op != location.op || header.shard != self.config.shard {
            return Err(HeaderMiss::Elsewhere {
                op: header.op,
                shard: header.shard,
            });
        }
        let padded_bytes = format::entry_bytes_padded(header.body_bytes as usize);
        if location.position.offset + padded_bytes as u64 > self.config.segment_bytes {
            return Err(HeaderMiss::PastSegmentEnd { padded_bytes });
        }
        Ok(header)
    }

    /// Reads up to `length` bytes (a multiple of `SECTOR_BYTES`) at `position`, never past
    /// the segment's end, opening that segment for reading if it is not open yet.
    async fn segment_read(
        &mut self,
        position: Position,
        length: usize,
    ) -> Result<ReadResult, JournalError> {
        debug_assert!(position.offset < self.config.segment_bytes);
        let length = (self.config.segment_bytes - position.offset).min(length as u64) as usize;
        if self
            .reader
            .as_ref()
            .is_none_or(|reader| reader.segment != position.segment)
        {
            if let Some(old) = self.reader.take() {
                old.file
                    .close()
                    .await
                    .map_err(|error| io_error(&old.path, error))?;
            }
            let path = segment_path(&self.config.dir, position.segment);
            let file = OpenOptions::new()
                .read(true)
                .dma_open(&path)
                .await
                .map_err(|error| io_error(&path, error))?;
            self.reader = Some(SegmentReader {
                segment: position.segment,
                path,
                file,
            });
        }
        let reader = self.reader.as_ref().expect("opened above");
        read_aligned(
            &reader.file,
            &reader.path,
            position.offset,
            length,
            &self.reads_buffered,
        )
        .await
    }

    /// Verification of a durable entry failed: it must be repaired, never returned.
    fn read_corrupt(&self, location: OpLocation, error: String) -> JournalError {
        JournalError::Corrupt {
            shard: self.config.shard,
            op: location.op,
            segment: location.position.segment,
            offset: location.position.offset,
            error,
        }
    }

    /// Closes the files (dropping the journal also closes them, on the next I/O cycle).
    /// Staged entries not committed are discarded.
    pub async fn close(self) -> Result<(), JournalError> {
        if let Some(reader) = self.reader {
            reader
                .file
                .close()
                .await
                .map_err(|error| io_error(&reader.path, error))?;
        }
        self.segment_file
            .close()
            .await
            .map_err(|error| io_error(&self.segment_path, error))?;
        self.superblock_file
            .close()
            .await
            .map_err(|error| io_error(&self.superblock_path, error))?;
        self.directory
            .close()
            .await
            .map_err(|error| io_error(&self.config.dir, error))
    }

    fn check_usable(&self) -> Result<(), JournalError> {
        if self.failed {
            return Err(JournalError::Failed {
                shard: self.config.shard,
            });
        }
        Ok(())
    }
}

/// Removes the files of journal directory `dir` that a checkpoint released
/// ([`Journal::checkpoint_keeping_files`]): the segment files numbered `segments` and the
/// snapshot of op `snapshot_stale_op` (0: none). Files already gone are skipped. Returns
/// the files removed.
pub async fn remove_released(
    dir: &Path,
    segments: std::ops::Range<u64>,
    snapshot_stale_op: u64,
) -> Result<u64, JournalError> {
    let mut removed = 0;
    for segment in segments {
        removed += u64::from(file_remove(&segment_path(dir, segment)).await?);
    }
    if snapshot_stale_op > 0 {
        let path = dir.join(format::snapshot_file_name(snapshot_stale_op));
        removed += u64::from(file_remove(&path).await?);
    }
    Ok(removed)
}

/// Removes `path`; returns whether it existed.
async fn file_remove(path: &Path) -> Result<bool, JournalError> {
    match glommio::io::remove(path).await {
        Ok(()) => Ok(true),
        Err(error) => {
            let error = std::io::Error::from(error);
            if error.kind() == std::io::ErrorKind::NotFound {
                Ok(false)
            } else {
                Err(io_error(path, error))
            }
        }
    }
}

/// Removes, at open, snapshot files no retained checkpoint names (left by a crash between
/// writing a snapshot and the superblock, or before removing an old one) and temporary
/// snapshot files. Open-time directory listing with `std::fs`. Returns the files removed.
fn snapshots_stale_remove(dir: &Path, superblock: &Superblock) -> Result<u64, JournalError> {
    let retained = [superblock.checkpoint.op, superblock.checkpoint_previous.op];
    let mut removed = 0;
    let entries = std::fs::read_dir(dir).map_err(|error| io_error(dir, error))?;
    for entry in entries {
        let entry = entry.map_err(|error| io_error(dir, error))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let stale = match format::parse_snapshot_name(&name) {
            Some(op) => !retained.contains(&op),
            None => name
                .strip_suffix(SNAPSHOT_TEMPORARY_SUFFIX)
                .and_then(format::parse_snapshot_name)
                .is_some(),
        };
        if stale {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|error| io_error(&path, error))?;
            tracing::info!(path = %path.display(), "removed a stale snapshot file");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Reads the latest checkpoint's snapshot file whole and verifies it against the
/// superblock. Returns its path, header and the file's bytes (header first). Allocates the
/// file's size once (open time), bounded by the file's actual size.
async fn snapshot_read(
    config: &JournalConfig,
    superblock: &Superblock,
) -> Result<(PathBuf, SnapshotMeta, Vec<u8>), JournalError> {
    let path = config
        .dir
        .join(format::snapshot_file_name(superblock.checkpoint.op));
    let invalid = |error| JournalError::Snapshot {
        path: path.clone(),
        error,
    };
    let file = OpenOptions::new()
        .read(true)
        .dma_open(&path)
        .await
        .map_err(|error| io_error(&path, error))?;
    let file_bytes = file
        .file_size()
        .await
        .map_err(|error| io_error(&path, error))?;
    let buffered = Cell::new(false);
    let head_bytes = (SNAPSHOT_HEADER_BYTES as u64).min(file_bytes) as usize;
    let head = read_aligned(&file, &path, 0, SNAPSHOT_HEADER_BYTES, &buffered).await?;
    let meta =
        format::decode_snapshot_header(&head[..head_bytes.min(head.len())]).map_err(&invalid)?;
    if meta.file_bytes() > file_bytes {
        return Err(invalid(SnapshotError::Truncated {
            bytes: file_bytes,
            needed: meta.file_bytes(),
        }));
    }
    let total = usize::try_from(meta.file_bytes()).map_err(|_| {
        invalid(SnapshotError::Truncated {
            bytes: file_bytes,
            needed: meta.file_bytes(),
        })
    })?;
    let mut bytes = Vec::with_capacity(total);
    // Bounded: every turn reads at least a sector or stops.
    while bytes.len() < total {
        let want = (total - bytes.len()).min(RECOVERY_READ_BYTES);
        let chunk = read_aligned(&file, &path, bytes.len() as u64, want, &buffered).await?;
        if chunk.is_empty() {
            break;
        }
        bytes.extend_from_slice(&chunk[..chunk.len().min(want)]);
    }
    file.close().await.map_err(|error| io_error(&path, error))?;
    let (meta, _) = format::verify_snapshot(&bytes, superblock).map_err(&invalid)?;
    Ok((path, meta, bytes))
}

fn config_validate(config: &JournalConfig) -> Result<(), JournalError> {
    let sector = SECTOR_BYTES as u64;
    if config.segment_bytes == 0 || !config.segment_bytes.is_multiple_of(sector) {
        return Err(JournalError::Config {
            reason: "segment_bytes must be a positive multiple of SECTOR_BYTES",
        });
    }
    if config.write_buffer_bytes == 0 || !config.write_buffer_bytes.is_multiple_of(SECTOR_BYTES) {
        return Err(JournalError::Config {
            reason: "write_buffer_bytes must be a positive multiple of SECTOR_BYTES",
        });
    }
    if config.body_bytes_max == 0 {
        return Err(JournalError::Config {
            reason: "body_bytes_max must be positive",
        });
    }
    let entry_bytes_max = format::entry_bytes_padded(config.body_bytes_max);
    let limit = config
        .write_buffer_bytes
        .min(usize::try_from(config.segment_bytes).unwrap_or(usize::MAX));
    if entry_bytes_max > limit {
        return Err(JournalError::BatchTooLarge {
            entry_bytes: entry_bytes_max,
            entry_bytes_max: limit,
        });
    }
    Ok(())
}

/// Segment indexes present in `dir`, ascending.
fn segments_list(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut segments = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|error| io_error(dir, error))?;
    for entry in entries {
        let entry = entry.map_err(|error| io_error(dir, error))?;
        if let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(format::parse_segment_name)
        {
            segments.push(index);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

/// Opens the superblock file, creating it (written under a temporary name, then renamed,
/// so a crash never leaves a half-written one) when the journal is new.
async fn superblock_open(
    config: &JournalConfig,
    directory: &Directory,
    segments_exist: bool,
    (replacing, settings_digest): (bool, Option<u64>),
) -> Result<(DmaFile, Superblock, bool), JournalError> {
    let dir = &config.dir;
    let path = dir.join(SUPERBLOCK_FILE_NAME);
    let copies_bytes = SUPERBLOCK_BYTES * SUPERBLOCK_COPIES as usize;
    if !path.exists() {
        if segments_exist {
            return Err(JournalError::SuperblockMissing { path: dir.clone() });
        }
        let superblock = Superblock {
            cluster_id: config.cluster_id,
            shard: config.shard,
            sequence: 0,
            view: 0,
            log_view: 0,
            commit_max: 0,
            op_durable: 0,
            checkpoint: Checkpoint::ROOT,
            snapshot_checksum: 0,
            checkpoint_previous: Checkpoint::ROOT,
            segment_bytes: config.segment_bytes,
            replacing,
            settings_digest: settings_digest.unwrap_or(0),
        };
        superblock_create(dir, &superblock)?;
        directory
            .sync()
            .await
            .map_err(|error| io_error(dir, error))?;
        let file = open_read_write(&path, false).await?;
        let superblock = Superblock {
            sequence: SUPERBLOCK_COPIES - 1,
            ..superblock
        };
        return Ok((file, superblock, true));
    }

    let file = open_read_write(&path, false).await?;
    let copies = read_aligned(&file, &path, 0, copies_bytes, &Cell::new(false)).await?;
    let (copy0, copy1) = if copies.len() >= copies_bytes {
        copies.split_at(SUPERBLOCK_BYTES)
    } else {
        (&copies[..], &[][..])
    };
    let superblock =
        format::superblock_latest(copy0, copy1).map_err(|error| JournalError::Superblock {
            path: path.clone(),
            error,
        })?;
    if superblock.cluster_id != config.cluster_id || superblock.shard != config.shard {
        return Err(JournalError::ClusterMismatch {
            path,
            cluster_id_expected: config.cluster_id,
            cluster_id_found: superblock.cluster_id,
            shard_expected: config.shard,
            shard_found: superblock.shard,
        });
    }
    Ok((file, superblock, false))
}

/// Writes a new superblock pair under a temporary name and renames it into place, so a
/// crash never leaves a half-written one. Plain `std::fs`: a one-time 8 KiB write, and it
/// makes the first DMA open on the device see data (see the module docs).
fn superblock_create(dir: &Path, superblock: &Superblock) -> Result<(), JournalError> {
    let mut copies = [0u8; SUPERBLOCK_BYTES * SUPERBLOCK_COPIES as usize];
    // Slot `s % 2` holds sequence `s`: slot 0 gets sequence 0, slot 1 sequence 1.
    for (slot, copy) in copies.chunks_exact_mut(SUPERBLOCK_BYTES).enumerate() {
        let copy: &mut [u8; SUPERBLOCK_BYTES] = copy.try_into().expect("chunk size");
        let superblock = Superblock {
            sequence: slot as u64,
            ..*superblock
        };
        format::encode_superblock(&superblock, copy);
    }
    let path_new = dir.join(SUPERBLOCK_FILE_NAME_NEW);
    let mut file = std::fs::File::create(&path_new).map_err(|error| io_error(&path_new, error))?;
    file.write_all(&copies)
        .and_then(|()| file.sync_all())
        .map_err(|error| io_error(&path_new, error))?;
    let path = dir.join(SUPERBLOCK_FILE_NAME);
    std::fs::rename(&path_new, &path).map_err(|error| io_error(&path, error))
}

/// Where recovery left the journal.
#[derive(Debug)]
struct RecoveryEnd {
    position: Position,
    tail: Tail,
    /// A segment file was created or removed: the directory needs a sync.
    directory_changed: bool,
}

/// How one segment's scan ended.
enum SegmentEnd {
    Clean {
        offset: u64,
    },
    Torn {
        offset: u64,
    },
    /// Valid history lies after `offset` (only with `repair_from_peers`).
    Corrupt {
        offset: u64,
        op_expected: u64,
        error: JournalScanError,
    },
}

/// Recovery state carried across chunks and segments.
struct Recovery<'a> {
    config: &'a JournalConfig,
    /// Ops up to this one were made durable; a torn entry at or below it is corruption.
    op_durable_floor: u64,
    segments: Vec<u64>,
    checkpoint_segment: u64,
    checkpoint_offset: u64,
    op_next: u64,
    checksum_previous: JournalChecksum,
    view_last: u64,
    /// The latest checkpoint: ops up to it are verified and indexed, not replayed, and its
    /// entry must have the checkpoint's checksum.
    checkpoint: Checkpoint,
    /// Set when the entry at the checkpoint op does not have the checkpoint's checksum.
    checkpoint_mismatch: Option<(u64, JournalChecksum)>,
    /// [`JournalOptions::records_max`].
    records_max: usize,
    /// The first entry above the checkpoint holding more than `records_max` records:
    /// `(op, records)`. Recovery refuses the journal ([`JournalError::RecordsOverLimit`]).
    records_over: Option<(u64, u32)>,
    /// Ops above this one are verified and indexed, not replayed
    /// ([`JournalOptions::replay_committed_only`]).
    replay_op_max: u64,
    entries_replayed: u64,
    read_bytes: usize,
    entry_bytes_max: usize,
    /// O_DIRECT reads were refused: read through the page cache.
    reads_buffered: Cell<bool>,
    /// Filled with every entry replayed; handed to the journal.
    position_index: PositionIndex,
    /// [`JournalOptions::repair_from_peers`].
    repair_from_peers: bool,
    /// Ops up to here were durable (and may have been acknowledged): the superblock's
    /// `op_durable` under `Always`, raised past a corrupt entry to the last valid one after it.
    op_promised: u64,
    /// The superblock as last written (recovery raises its `op_durable` before cutting).
    superblock: Superblock,
}

impl<'a> Recovery<'a> {
    fn new(
        config: &'a JournalConfig,
        options: &JournalOptions,
        superblock: &Superblock,
        segments: Vec<u64>,
    ) -> Self {
        // Scanning starts at the previous checkpoint. Its segment is gone only if this is an
        // older superblock copy (the newest one failed verification) from before segments
        // were removed: then start at the latest checkpoint, whose ops are all still there.
        let previous = superblock.checkpoint_previous;
        let start = if previous == superblock.checkpoint || segments.contains(&previous.segment) {
            previous
        } else {
            tracing::warn!(
                shard = config.shard,
                segment = previous.segment,
                "segment of the previous checkpoint is gone; recovering from the latest"
            );
            superblock.checkpoint
        };
        let entry_bytes_max = format::entry_bytes_padded(config.body_bytes_max);
        // A chunk must hold one largest entry, or a straddling entry could never be read whole.
        let read_bytes = RECOVERY_READ_BYTES.max(2 * entry_bytes_max);
        let op_durable_floor = match config.fsync {
            FsyncPolicy::Always | FsyncPolicy::Dsync => superblock.op_durable,
            // Without fdatasync a power loss may lose ops the superblock already counts.
            FsyncPolicy::Never => 0,
        };
        let replay_op_max = if options.replay_committed_only {
            superblock.commit_max.min(superblock.op_durable)
        } else {
            u64::MAX
        };
        Recovery {
            config,
            op_durable_floor,
            segments,
            checkpoint_segment: start.segment,
            checkpoint_offset: start.offset,
            op_next: start.op + 1,
            checksum_previous: start.checksum,
            view_last: 0,
            checkpoint: superblock.checkpoint,
            checkpoint_mismatch: None,
            records_max: options.records_max,
            records_over: None,
            replay_op_max,
            entries_replayed: 0,
            read_bytes,
            entry_bytes_max,
            reads_buffered: Cell::new(false),
            position_index: PositionIndex::new(start.op + 1, options.position_index_entries_max),
            repair_from_peers: options.repair_from_peers,
            op_promised: op_durable_floor,
            superblock: *superblock,
        }
    }

    fn corrupt(&self, segment: u64, offset: u64, error: String) -> JournalError {
        JournalError::Corrupt {
            shard: self.config.shard,
            op: self.op_next,
            segment,
            offset,
            error,
        }
    }

    /// Scans every segment from the checkpoint; returns the open last segment and the end.
    async fn run(
        &mut self,
        replay: &mut impl FnMut(&DecodedEntry<'_>),
        superblock_file: &DmaFile,
    ) -> Result<(DmaFile, RecoveryEnd), JournalError> {
        let dir = self.config.dir.clone();
        let segment_bytes = self.config.segment_bytes;
        let first = self.checkpoint_segment;
        let segments: Vec<u64> = self
            .segments
            .iter()
            .copied()
            .filter(|&s| s >= first)
            .collect();
        if segments.is_empty() {
            self.check_durable_floor(first, self.checkpoint_offset)?;
            let file = segment_create(&dir, first, segment_bytes, self.config.fsync).await?;
            fdatasync(&file, &segment_path(&dir, first)).await?;
            let end = RecoveryEnd {
                position: Position {
                    segment: first,
                    offset: self.checkpoint_offset,
                },
                tail: Tail::Clean,
                directory_changed: true,
            };
            return Ok((file, end));
        }
        for (index, &segment) in segments.iter().enumerate() {
            if segment != first + index as u64 {
                return Err(self.corrupt(first + index as u64, 0, "segment file missing".into()));
            }
        }

        let last = *segments.last().expect("not empty");
        let mut segment = first;
        loop {
            let path = segment_path(&dir, segment);
            let file = segment_open(&path, false, self.config.fsync).await?;
            let offset_start = if segment == first {
                self.checkpoint_offset
            } else {
                0
            };
            let end = self
                .scan_segment(&file, segment, offset_start, replay)
                .await?;
            match end {
                SegmentEnd::Clean { offset } if segment == last => {
                    self.check_durable_floor(segment, offset)?;
                    // Idempotent: restores the full size if a crash cut pre-allocation short.
                    file.pre_allocate(segment_bytes, false)
                        .await
                        .map_err(|error| io_error(&path, error))?;
                    let position = Position { segment, offset };
                    let end = RecoveryEnd {
                        position,
                        tail: Tail::Clean,
                        directory_changed: false,
                    };
                    return Ok((file, end));
                }
                SegmentEnd::Clean { .. } => {
                    file.close().await.map_err(|error| io_error(&path, error))?;
                    segment += 1;
                }
                // A reused segment ends before its stale bytes: the boundary, if the next
                // segment carries on (engine journal docs, "Segment boundaries").
                SegmentEnd::Torn { .. }
                    if segment != last && self.segment_continues(segment + 1).await? =>
                {
                    file.close().await.map_err(|error| io_error(&path, error))?;
                    segment += 1;
                }
                SegmentEnd::Torn { offset } => {
                    self.check_durable_floor(segment, offset)?;
                    match self.segments_after_torn_remove(segment, offset, last).await {
                        Ok(()) => {}
                        // A later segment holds data: valid history after the end.
                        Err(JournalError::Corrupt { .. }) if self.repair_from_peers => {
                            let cut = (segment, offset, self.op_next);
                            let error = JournalScanError::Entry(EntryError::BadMagic);
                            return self
                                .corrupt_cut(file, cut, error, last, superblock_file)
                                .await;
                        }
                        Err(error) => return Err(error),
                    }
                    self.tail_truncate(&file, &path, offset).await?;
                    let end = RecoveryEnd {
                        position: Position { segment, offset },
                        tail: Tail::Torn { offset },
                        directory_changed: segment != last,
                    };
                    return Ok((file, end));
                }
                SegmentEnd::Corrupt {
                    offset,
                    op_expected,
                    error,
                } => {
                    let cut = (segment, offset, op_expected);
                    return self
                        .corrupt_cut(file, cut, error, last, superblock_file)
                        .await;
                }
            }
        }
    }

    /// Entries up to the superblock's `op_durable` were acknowledged: the journal must not
    /// end (cleanly or torn) before them.
    fn check_durable_floor(&self, segment: u64, offset: u64) -> Result<(), JournalError> {
        if self.op_next <= self.checkpoint.op {
            let error = format!(
                "journal ends before the checkpoint op {} recorded in the superblock",
                self.checkpoint.op
            );
            return Err(self.corrupt(segment, offset, error));
        }
        if self.op_next <= self.op_durable_floor && !self.repair_from_peers {
            let error = format!(
                "journal ends before op_durable {} recorded in the superblock",
                self.op_durable_floor
            );
            return Err(self.corrupt(segment, offset, error));
        }
        Ok(())
    }

    /// Opens `segment` and reads its first chunk (`None`: the file is empty).
    async fn segment_head(
        &self,
        segment: u64,
    ) -> Result<(DmaFile, Option<ReadResult>), JournalError> {
        let path = segment_path(&self.config.dir, segment);
        let file = segment_open(&path, false, self.config.fsync).await?;
        let file_bytes = file
            .file_size()
            .await
            .map_err(|error| io_error(&path, error))?;
        let head = if file_bytes == 0 {
            None
        } else {
            Some(self.chunk_read(&file, &path, 0, file_bytes).await?)
        };
        Ok((file, head))
    }

    /// Whether `segment` starts with the entry that continues what recovery has scanned.
    async fn segment_continues(&self, segment: u64) -> Result<bool, JournalError> {
        let (file, head) = self.segment_head(segment).await?;
        let _ = file.close().await;
        if let Some(head) = &head {
            self.over_limit_refuse(segment, 0, head)?;
        }
        Ok(head.is_some_and(|head| {
            format::entry_continues(
                &head,
                self.op_next,
                self.checksum_previous,
                self.config.body_bytes_max,
            )
        }))
    }

    /// Reads up to `read_bytes` at `offset` (sector aligned), never past `file_bytes`.
    async fn chunk_read(
        &self,
        file: &DmaFile,
        path: &Path,
        offset: u64,
        file_bytes: u64,
    ) -> Result<ReadResult, JournalError> {
        let want = (file_bytes - offset).min(self.read_bytes as u64) as usize;
        let length = want.next_multiple_of(SECTOR_BYTES);
        read_aligned(file, path, offset, length, &self.reads_buffered).await
    }

    /// Refuses a journal whose scan stopped at `at` (segment `segment`; `bytes` from there)
    /// on an authentic entry of this history, the next op or later, that is only too large
    /// for this node's limit ([`JournalError::OverLimit`]). The look-ahead that tells a torn
    /// write from history judges entries by the same limit, so without this a node
    /// restarted with smaller batch limits read every later entry as garbage and cut them.
    fn over_limit_refuse(&self, segment: u64, at: u64, bytes: &[u8]) -> Result<(), JournalError> {
        let Ok(header) = format::decode_entry_header(bytes, format::ENTRY_BODY_BYTES_MAX_LIMIT)
        else {
            return Ok(());
        };
        if header.shard == self.config.shard
            && header.op >= self.op_next
            && header.body_bytes as usize > self.config.body_bytes_max
        {
            return Err(JournalError::OverLimit {
                shard: self.config.shard,
                op: header.op,
                segment,
                offset: at,
                body_bytes: header.body_bytes,
                max: self.config.body_bytes_max,
            });
        }
        Ok(())
    }

    /// Scans one segment in chunks from `offset`, replaying valid entries, and finds where
    /// it ends. `scan` judges a region; the segment is judged whole by carrying on past a
    /// chunk that ends inside an entry and by checking what lies after the end.
    async fn scan_segment(
        &mut self,
        file: &DmaFile,
        segment: u64,
        mut offset: u64,
        replay: &mut impl FnMut(&DecodedEntry<'_>),
    ) -> Result<SegmentEnd, JournalError> {
        let path = segment_path(&self.config.dir, segment);
        let mut file_bytes = file
            .file_size()
            .await
            .map_err(|error| io_error(&path, error))?;
        // Bounded: every turn advances `offset` (a chunk holds at least two largest entries).
        loop {
            if offset >= file_bytes {
                return Ok(SegmentEnd::Clean { offset });
            }
            let chunk = self.chunk_read(file, &path, offset, file_bytes).await?;
            if chunk.is_empty() {
                return Ok(SegmentEnd::Clean { offset });
            }
            let chunk_end = offset + chunk.len() as u64;
            if chunk_end < file_bytes && chunk.len() < self.read_bytes {
                file_bytes = chunk_end; // A short read: the file ends here.
            }
            let view_last = &mut self.view_last;
            let position_index = &mut self.position_index;
            let checkpoint = self.checkpoint;
            let checkpoint_mismatch = &mut self.checkpoint_mismatch;
            let (records_max, records_over) = (self.records_max, &mut self.records_over);
            let entries_replayed = &mut self.entries_replayed;
            let replay_op_max = self.replay_op_max;
            let outcome: ScanOutcome = format::scan(
                &chunk,
                offset,
                self.op_next,
                self.checksum_previous,
                self.config.body_bytes_max,
                |entry, entry_offset| {
                    *view_last = entry.meta.view;
                    let position = Position {
                        segment,
                        offset: entry_offset,
                    };
                    position_index.record(entry.meta.op, position);
                    if entry.meta.op == checkpoint.op && entry.checksum != checkpoint.checksum {
                        checkpoint_mismatch.get_or_insert((entry_offset, entry.checksum));
                    }
                    // Ops above the checkpoint are applied, now or once committed: an entry
                    // the state machine cannot apply stops replay, and recovery refuses it.
                    if entry.meta.op > checkpoint.op
                        && entry.meta.entry_count as usize > records_max
                    {
                        records_over.get_or_insert((entry.meta.op, entry.meta.entry_count));
                    }
                    // Ops up to the checkpoint are in its snapshot; a mismatch stops replay.
                    if entry.meta.op > checkpoint.op
                        && entry.meta.op <= replay_op_max
                        && checkpoint_mismatch.is_none()
                        && records_over.is_none()
                    {
                        *entries_replayed += 1;
                        replay(entry);
                    }
                },
            );
            if let Some((op, records)) = self.records_over {
                return Err(JournalError::RecordsOverLimit {
                    shard: self.config.shard,
                    op,
                    records,
                    max: self.records_max,
                });
            }
            if let Some((entry_offset, found)) = self.checkpoint_mismatch {
                let error = format!(
                    "entry of checkpoint op {} has checksum {found:#x}, the superblock records {:#x}",
                    checkpoint.op, checkpoint.checksum
                );
                return Err(JournalError::Corrupt {
                    shard: self.config.shard,
                    op: checkpoint.op,
                    segment,
                    offset: entry_offset,
                    error,
                });
            }
            if outcome.entries > 0 {
                self.op_next = outcome.op_last + 1;
                self.checksum_previous = outcome.checksum_last;
            }
            if let Tail::Torn { offset: at } | Tail::Corrupt { offset: at, .. } = outcome.tail {
                self.over_limit_refuse(segment, at, &chunk[(at - offset) as usize..])?;
            }
            let (stop, torn) = match outcome.tail {
                Tail::Clean => (outcome.end_offset, false),
                Tail::Torn { offset } => (offset, true),
                Tail::Corrupt {
                    offset,
                    op_expected,
                    error,
                } if self.repair_from_peers => {
                    return Ok(SegmentEnd::Corrupt {
                        offset,
                        op_expected,
                        error,
                    });
                }
                Tail::Corrupt {
                    offset,
                    op_expected,
                    error,
                } => {
                    return Err(JournalError::Corrupt {
                        shard: self.config.shard,
                        op: op_expected,
                        segment,
                        offset,
                        error: error.to_string(),
                    });
                }
            };
            let cut_short =
                chunk_end < file_bytes && ((chunk_end - stop) as usize) < self.entry_bytes_max;
            if stop == chunk_end || cut_short {
                debug_assert!(stop > offset);
                offset = stop;
                continue;
            }
            let garbage_later = match self
                .check_after_end(file, segment, stop, chunk_end, file_bytes)
                .await
            {
                Ok(garbage) => garbage,
                Err(JournalError::Corrupt { .. }) if self.repair_from_peers => {
                    return Ok(SegmentEnd::Corrupt {
                        offset: stop,
                        op_expected: self.op_next,
                        error: JournalScanError::Entry(EntryError::BadMagic),
                    });
                }
                Err(error) => return Err(error),
            };
            return Ok(if torn || garbage_later {
                SegmentEnd::Torn { offset: stop }
            } else {
                SegmentEnd::Clean { offset: stop }
            });
        }
    }

    /// The journal ends at `end` in this segment; `scan` has judged the bytes up to
    /// `checked_end`. Reads the rest of the segment: a valid later entry (op at or above
    /// the next expected one) is corruption at `end`; returns whether non-zero bytes were
    /// found (a torn tail). Chunks overlap by one largest entry less a sector, so an entry
    /// that straddles a chunk boundary is seen whole in the next chunk.
    async fn check_after_end(
        &self,
        file: &DmaFile,
        segment: u64,
        end: u64,
        mut checked_end: u64,
        file_bytes: u64,
    ) -> Result<bool, JournalError> {
        let path = segment_path(&self.config.dir, segment);
        let overlap = (self.entry_bytes_max - SECTOR_BYTES) as u64;
        let mut garbage = false;
        // Bounded: each turn advances `checked_end` by at least one largest entry.
        while checked_end < file_bytes {
            let start = checked_end.saturating_sub(overlap).max(end);
            let chunk = self.chunk_read(file, &path, start, file_bytes).await?;
            if chunk.is_empty() {
                break;
            }
            let outcome = format::scan(
                &chunk,
                start,
                self.op_next,
                self.checksum_previous,
                self.config.body_bytes_max,
                |_, _| {},
            );
            match outcome.tail {
                _ if outcome.entries > 0 => {
                    let error = format!("valid entry at offset {start} after the end");
                    return Err(self.corrupt(segment, end, error));
                }
                Tail::Corrupt { offset, .. } => {
                    let error = format!("valid later entry near offset {offset} after the end");
                    return Err(self.corrupt(segment, end, error));
                }
                Tail::Torn { .. } => garbage = true,
                Tail::Clean => {}
            }
            checked_end = start + chunk.len() as u64;
        }
        Ok(garbage)
    }

    /// A torn segment must be the last one with entries: later segments may only be
    /// leftovers of a roll-over with no entry of this journal's later history at their
    /// start (empty, possible under `Never`; or a reused segment holding only its older
    /// entries, if the process stopped between the roll-over and the first write); they
    /// are removed.
    async fn segments_after_torn_remove(
        &self,
        segment: u64,
        offset: u64,
        last: u64,
    ) -> Result<(), JournalError> {
        for later in segment + 1..=last {
            let path = segment_path(&self.config.dir, later);
            let (file, head) = self.segment_head(later).await?;
            if let Some(head) = &head {
                self.over_limit_refuse(later, 0, head)?;
            }
            let later_history = head.as_ref().and_then(|head| {
                format::op_max_after(
                    head,
                    self.config.shard,
                    self.op_next,
                    self.config.body_bytes_max,
                )
            });
            if let Some(op) = later_history {
                let error = format!("torn entry followed by segment {later} that holds op {op}");
                return Err(self.corrupt(segment, offset, error));
            }
            file.remove()
                .await
                .map_err(|error| io_error(&path, error))?;
            file.close().await.map_err(|error| io_error(&path, error))?;
        }
        Ok(())
    }

    /// A corrupt entry at `cut = (segment, offset, op_expected)` with valid history after
    /// it (`docs/protocol.md` 8): records the promise (the superblock's `op_durable`,
    /// raised to the last valid op found after the hole) durably first, then cuts the
    /// journal there as a view-change truncation does (later segments removed from the
    /// last down, each removal synced; the segment cut and pre-allocated back, so nothing
    /// after the hole can come back). The replica then repairs from its peers. A hole at or
    /// below the latest checkpoint is refused: the checkpoint's entry must stay.
    async fn corrupt_cut(
        &mut self,
        file: DmaFile,
        cut: (u64, u64, u64),
        error: JournalScanError,
        last: u64,
        superblock_file: &DmaFile,
    ) -> Result<(DmaFile, RecoveryEnd), JournalError> {
        let (segment, offset, op_expected) = cut;
        debug_assert_eq!(op_expected, self.op_next);
        if op_expected <= self.checkpoint.op {
            let error = format!("{error}, at or below the latest checkpoint");
            return Err(self.corrupt(segment, offset, error));
        }
        let op_after = self
            .op_max_after(segment, offset, last, op_expected)
            .await?;
        self.op_promised = self.op_promised.max(op_after.unwrap_or(op_expected));
        tracing::warn!(
            shard = self.config.shard,
            op = op_expected,
            segment,
            offset,
            %error,
            op_promised = self.op_promised,
            "journal entry corrupt with valid entries after it: cutting the journal there; \
             the replica recovers the lost entries from its peers"
        );
        if self.op_promised > self.superblock.op_durable {
            self.promise_store(superblock_file).await?;
        }
        let dir = self.config.dir.clone();
        // Bounded: one turn per segment after the corrupt one, the last first, so that a
        // crash leaves a prefix of the segments (never a missing one in the middle).
        for later in (segment + 1..=last).rev() {
            // Already gone if the torn-tail path removed it as an empty leftover.
            if !file_remove(&segment_path(&dir, later)).await? {
                continue;
            }
            std::fs::File::open(&dir)
                .and_then(|directory| directory.sync_all())
                .map_err(|error| io_error(&dir, error))?;
        }
        let path = segment_path(&dir, segment);
        self.tail_truncate(&file, &path, offset).await?;
        let end = RecoveryEnd {
            position: Position { segment, offset },
            tail: Tail::Corrupt {
                offset,
                op_expected,
                error,
            },
            directory_changed: segment != last,
        };
        Ok((file, end))
    }

    /// The highest op of a valid entry at or after `offset` of `segment`, or in a later
    /// segment up to `last` (`format::op_max_after` over chunks that overlap by one largest
    /// entry, so an entry straddling two chunks is seen whole).
    async fn op_max_after(
        &self,
        segment: u64,
        offset: u64,
        last: u64,
        op_min: u64,
    ) -> Result<Option<u64>, JournalError> {
        let overlap = (self.entry_bytes_max - SECTOR_BYTES) as u64;
        let mut found = None;
        for index in segment..=last {
            let path = segment_path(&self.config.dir, index);
            let file = segment_open(&path, false, self.config.fsync).await?;
            let file_bytes = file
                .file_size()
                .await
                .map_err(|error| io_error(&path, error))?;
            let mut start = if index == segment { offset } else { 0 };
            // Bounded: each turn advances `start` by at least one sector.
            while start < file_bytes {
                let chunk = self.chunk_read(&file, &path, start, file_bytes).await?;
                if chunk.is_empty() {
                    break;
                }
                let op_max = format::op_max_after(
                    &chunk,
                    self.config.shard,
                    op_min,
                    self.config.body_bytes_max,
                );
                found = found.max(op_max);
                let chunk_end = start + chunk.len() as u64;
                if chunk_end >= file_bytes {
                    break;
                }
                start = chunk_end
                    .saturating_sub(overlap)
                    .max(start + SECTOR_BYTES as u64);
            }
            file.close().await.map_err(|error| io_error(&path, error))?;
        }
        Ok(found)
    }

    /// Writes the next superblock copy with `op_durable` raised to the promise, and syncs
    /// it: the promise must survive a crash during the cut that follows.
    async fn promise_store(&mut self, superblock_file: &DmaFile) -> Result<(), JournalError> {
        let superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            op_durable: self.op_promised,
            ..self.superblock
        };
        let path = self.config.dir.join(SUPERBLOCK_FILE_NAME);
        let mut buffer = superblock_file.alloc_dma_buffer(SUPERBLOCK_BYTES);
        let bytes: &mut [u8; SUPERBLOCK_BYTES] = buffer
            .as_bytes_mut()
            .try_into()
            .expect("superblock buffer is SUPERBLOCK_BYTES long");
        format::encode_superblock(&superblock, bytes);
        let offset = (superblock.sequence % SUPERBLOCK_COPIES) * SUPERBLOCK_BYTES as u64;
        write_all(superblock_file, &path, buffer, offset).await?;
        fdatasync(superblock_file, &path).await?;
        self.superblock = superblock;
        Ok(())
    }

    /// Truncates the torn tail: cuts the file at `offset` and pre-allocates it back to
    /// `segment_bytes`, so everything after `offset` reads as zero (no data written), then
    /// `fdatasync`s the new size.
    async fn tail_truncate(
        &self,
        file: &DmaFile,
        path: &Path,
        offset: u64,
    ) -> Result<(), JournalError> {
        file.truncate(offset)
            .await
            .map_err(|error| io_error(path, error))?;
        file.pre_allocate(self.config.segment_bytes, false)
            .await
            .map_err(|error| io_error(path, error))?;
        fdatasync(file, path).await
    }
}
