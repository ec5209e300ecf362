//! The journal's on-disk format and its recovery scanner, over byte slices (sans-IO).
//!
//! This module owns the layout of a journal entry (one sealed batch), of the per-shard
//! superblock and of segment file names, and the rules that decide, on restart, where a
//! journal ends: cleanly, at a torn last write (truncate), or at corruption (never skipped).
//! The `shards` crate moves the bytes (glommio DMA files, `O_DIRECT`). This module must never
//! do I/O, read a clock or allocate on the scan path, and must never panic on bytes read from
//! disk: every problem is a typed error.
//!
//! # Entry layout (little-endian, 128-byte header, body follows, zero padding to a sector)
//! | offset | field | |
//! |---|---|---|
//! | 0 | `magic: u64` | [`ENTRY_MAGIC`] (`b"PCJOURNL"`) |
//! | 8 | `version: u16` | [`JOURNAL_VERSION`] |
//! | 10 | `operation: u16` | the state machine's operation code of every record |
//! | 12 | `shard: u32` | shard (replication group) the entry belongs to |
//! | 16 | `entry_count: u32` | records in the body |
//! | 20 | `record_bytes: u32` | size of one record |
//! | 24 | `body_bytes: u32` | `entry_count * record_bytes + request_count * 32` |
//! | 28 | `request_count: u32` | client request descriptors after the records (was reserved, zero) |
//! | 32 | `view: u64` | view the leader assigned the op in |
//! | 40 | `op: u64` | op number, 1, 2, 3, … consecutive per shard |
//! | 48 | `checksum_body: u128` | [`journal_checksum`] of the body |
//! | 64 | `checksum_previous: u128` | the previous entry's `checksum_header` (the chain) |
//! | 80 | `checksum_header: u128` | [`journal_checksum`] of the header with this field zero |
//! | 96 | `reserved_b: [u8; 32]` | zero |
//!
//! An entry occupies [`entry_bytes_padded`] bytes: header and body rounded up to
//! [`SECTOR_BYTES`], so every entry starts at a sector-aligned file offset and one `O_DIRECT`
//! write holds whole entries. The padding is not checksummed and not checked: it carries no
//! data, and the scanner never reads it as part of an entry.
//!
//! An entry's *checksum* (what the next entry chains to) is its `checksum_header`. It covers
//! `checksum_body` and `checksum_previous`, so one 128-bit value commits to the entry and, by
//! induction, to the whole history before it. The chain starts at [`JOURNAL_CHAIN_ROOT`] (0):
//! op 1's `checksum_previous` is 0. A scan that starts mid-journal (at a checkpoint) is given
//! the chain value there (the superblock's `checkpoint_checksum`).
//!
//! # Checksum: BLAKE3 truncated to 128 bits (chosen by measurement)
//! Measured by `journal_checksum_throughput` in `engine/tests/journal_format.rs`
//! (`cargo test --release -p percore-engine --test journal_format -- --ignored --nocapture`),
//! one core of the development VM (AMD EPYC, AVX2 and AVX-512; 2 shared, noisy cores),
//! 128 KiB buffers (a 1,000-record batch is 125 KiB), release build, 7 rounds of 200 ms per
//! candidate per run; the ranges are over three runs:
//!
//! | candidate | GB/s (median round, 3 runs) | µs per 128 KiB |
//! |---|---|---|
//! | CRC-32C, 32 bits (SSE4.2 `crc32` instruction) | 18.1 – 27.6 | 4.7 – 7.2 |
//! | 4 × CRC-32C, seeds 0..3 (a "128-bit" combination) | 4.8 – 6.9 | 19.0 – 27.3 |
//! | BLAKE3, unkeyed, truncated to 128 bits | 4.5 – 6.6 | 19.9 – 29.1 |
//! | BLAKE3, keyed, truncated to 128 bits | 4.4 – 6.6 | 19.8 – 29.8 |
//!
//! Against the disk, one 128 KiB batch costs about 45 µs of sequential write at 2.5–3 GB/s
//! and about 300 µs of `fdatasync` (150 µs per 64 KiB): BLAKE3's 20–29 µs is under a tenth of
//! the durable append, paid once by the leader and once by each follower (which must verify
//! anyway), so the faster CRC buys almost nothing end to end. Recovery verifies at ~6 GB/s,
//! faster than the disk reads the journal back.
//!
//! What it buys is weak: the chain must *identify* a history (two replicas compare chain
//! values to decide they hold the same log; a scan trusts an entry whose `checksum_previous`
//! matches). With 32 bits, the birthday bound reaches 50% at about 77,000 distinct entries,
//! and a journal holds billions (4·10^9 entries is 11 hours at 10^5 batches/s), so chain
//! values of different histories *will* coincide; and each damaged entry passes its check
//! with probability 2^-32. CRCs are also affine: for a given length, CRC-32C with another
//! seed differs by a constant, so "4 × CRC-32C" detects exactly what one CRC-32C detects, at
//! BLAKE3's cost. With 128 bits of BLAKE3 a collision needs ~2^64 entries and a damaged entry
//! passes with probability 2^-128.
//! Keying gives nothing here (no adversary holds the disk; keys would need managing), so the
//! unkeyed hash is used, and the superblock uses the same function. Rerun the measurement
//! when the target machine changes; the choice lives only in [`journal_checksum`].
//!
//! # Recovery: where a journal ends
//! [`scan`] walks entries from a sector-aligned start, verifying each entry on its own
//! (magic, version, header checksum, reserved bytes, sizes, body checksum), then against the
//! journal: op continuity (`op_next`, +1, …) and the chain. The first position `P` that does
//! not continue the journal ends the scan, and is classified by what lies after it:
//!
//! * **Clean**: every byte from `P` to the end of the region is zero (never written), or `P`
//!   is the end of the region.
//! * **Corrupt**: some sector-aligned position `Q ≥ P` holds an entry that verifies on its own
//!   with `op ≥ op_expected` (the op `P` should have held). Later valid history exists, so the
//!   entry at `P` was damaged or lost *inside* the journal: it must be repaired (from peers),
//!   never skipped or truncated silently. An entry at `P` itself that verifies but breaks
//!   op continuity or the chain (`OpGap` with a higher op, `ChainBroken`) is such evidence too.
//! * **Torn**: otherwise: non-zero bytes that hold no valid later entry. This is the torn last
//!   write; truncate at `P`.
//!
//! In every case `end_offset` is `P`: where valid history ends and the next append goes.
//!
//! Limits of the rule, which the writer (`shards`) must respect:
//!
//! * Stale bytes that verify as entries with `op < op_expected` (from a recycled segment file)
//!   count as garbage, so they end a journal as Torn. Stale entries with a *higher* op, e.g.
//!   left behind when a view change truncates the log and shorter entries are appended over
//!   it, would be indistinguishable from real later history. So whenever the journal is
//!   truncated (a torn tail, or a view change), the writer must make the bytes after the new
//!   end read as zero (`ftruncate` the segment and `fdatasync`) before appending.
//! * A write tears at sector granularity: any subset of its sectors may be old. If several
//!   entries are in flight at once (one group-commit write, or pipelined writes), a later one
//!   can land while an earlier one tears, and bytes alone cannot tell that from corruption:
//!   it is reported as Corrupt. It is safe to truncate at such a Corrupt position only if no
//!   entry at or after it was ever acknowledged as durable (e.g. `op_expected` is above the
//!   superblock's `op_durable` and above every op acknowledged since); otherwise repair it.
//! * Damage to the *last* entry (a bit flip, a lost write) has no later history after it, so
//!   it reads as Torn. Truncating is then safe only if that entry was never acknowledged
//!   durable: after the scan, the caller must check `op_last` against the superblock's
//!   `op_durable` (and the protocol's commit number) and repair from peers if it is below.
//! * Scan whole segments. A region that ends inside an entry ends Torn there (the entry is not
//!   all there), which is right for a file but not for an arbitrary prefix of one.
//!
//! # Segment boundaries
//! A journal is a sequence of segment files; an entry never spans two, and the writer syncs
//! a segment before it writes the next one. A segment *reused* after a checkpoint released
//! it still holds its old entries (all with ops below the checkpoint), so the part after
//! the new entries is stale bytes, not zeros: [`scan`] ends such a segment Torn. The writer
//! reads that end as the segment's boundary, not a torn write, exactly when the next
//! segment starts with the entry that continues the journal ([`entry_continues`]: op
//! `op_expected`, chained to the last entry). Had an entry been lost at the end, the next
//! segment's first entry would chain to the lost one, not to the last one scanned.
//! * The look-ahead decodes at every later sector: a scan costs O(region) even when it stops
//!   early, which is bounded by the segment size.
//!
//! # Superblock layout (little-endian, one 4,096-byte copy; two copies kept)
//! | offset | field | |
//! |---|---|---|
//! | 0 | `magic: u64` | [`SUPERBLOCK_MAGIC`] (`b"PCSUPERB"`) |
//! | 8 | `version: u16` | [`SUPERBLOCK_VERSION`] |
//! | 10 | `flags: u8` | bit 0: [`Superblock::replacing`]; other bits zero |
//! | 11 | `reserved_a: u8` | zero |
//! | 12 | `shard: u32` | |
//! | 16 | `sequence: u64` | +1 per write; copy slot = `sequence % 2` |
//! | 24 | `view: u64` | |
//! | 32 | `op_durable: u64` | `≥ checkpoint_op` |
//! | 40 | `checkpoint_op: u64` | latest checkpoint (0: none) |
//! | 48 | `checkpoint_segment: u64` | where entry `checkpoint_op + 1` goes |
//! | 56 | `checkpoint_offset: u64` | sector aligned, `≤ segment_bytes` |
//! | 64 | `segment_bytes: u64` | nonzero multiple of [`SECTOR_BYTES`] |
//! | 72 | `checkpoint_previous_op: u64` | the checkpoint before (`≤ checkpoint_op`) |
//! | 80 | `cluster_id: u128` | |
//! | 96 | `checkpoint_checksum: u128` | chain value at the checkpoint (checksum of its entry) |
//! | 112 | `snapshot_checksum: u128` | [`journal_checksum`] of the snapshot bytes (0: none) |
//! | 128 | `checkpoint_previous_segment: u64` | where entry `checkpoint_previous_op + 1` goes |
//! | 136 | `checkpoint_previous_offset: u64` | sector aligned, `≤ segment_bytes` |
//! | 144 | `checkpoint_previous_checksum: u128` | chain value at the previous checkpoint |
//! | 160 | `log_view: u64` | view of the last log installed (`≤ view`; view change) |
//! | 168 | `commit_max: u64` | highest op known committed when written |
//! | 176 | `settings_digest: u64` | the settings that decide results, as written under (0: not recorded) |
//! | 184 | `reserved_b: u64` | zero |
//! | 192 | `checksum: u128` | [`journal_checksum`] of all 4,096 bytes with this field zero |
//! | 208 | zero | to 4,096 |
//!
//! Copies are written alternately (sequence `s` into slot `s % 2`), so a torn superblock write
//! destroys at most the newer copy; [`superblock_latest`] falls back to the older one.
//! Version 2 added the snapshot checksum and the previous checkpoint; version 3 turned the
//! reserved bytes at 160 into `log_view` and `commit_max` (what a view change and recovery
//! need: `docs/protocol.md` 6.4, 7.4, 8); version 4 added `settings_digest`, so that a node
//! restarted with other settings that decide results (a replay would then reach another
//! state than the one acknowledged) is refused by name. Older superblocks are refused
//! ([`SuperblockError::UnsupportedVersion`]): there is no migration, since no deployment holds
//! older data that must be kept (a version-2 copy would also decode, its reserved bytes being
//! zero, but as a claim of `log_view = commit_max = 0` that nobody made).
//!
//! # Checkpoints
//! A checkpoint at op `C` is a snapshot of the state machine after applying `C`, in a file
//! `snapshot-<C, 20 digits>.state`: a [`SNAPSHOT_HEADER_BYTES`] header (layout below), then
//! the snapshot bytes, zero padded to a sector. Recovery restores the latest checkpoint's
//! snapshot and replays the journal from entry `C + 1`, which must chain to
//! `checkpoint_checksum`. The journal is *scanned* (verified and indexed, not replayed) from
//! the previous checkpoint, so that the entries between the two stay readable for peers.
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | `magic: u64` | [`SNAPSHOT_MAGIC`] (`b"PCSNAPSH"`) |
//! | 8 | `version: u16` | [`SNAPSHOT_FILE_VERSION`] |
//! | 10 | `reserved_a: [u8; 2]` | zero |
//! | 12 | `shard: u32` | |
//! | 16 | `op: u64` | the checkpoint op (≥ 1) |
//! | 24 | `snapshot_bytes: u64` | bytes of snapshot after the header (unpadded) |
//! | 32 | `cluster_id: u128` | |
//! | 48 | `checkpoint_checksum: u128` | checksum of entry `op` |
//! | 64 | `snapshot_checksum: u128` | [`journal_checksum`] of the snapshot bytes |
//! | 80 | `digest: [u8; 32]` | the state machine's `digest()` at `op` |
//! | 112 | `checksum: u128` | [`journal_checksum`] of all 4,096 header bytes with this field zero |
//! | 128 | zero | to 4,096 |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use bytemuck::{Pod, Zeroable};

use crate::limits::BATCH_ENTRIES_MAX_LIMIT;
use crate::record::RECORD_BYTES;
use crate::session::{REQUEST_DESCRIPTOR_BYTES, RequestDescriptor};

/// Unit of `O_DIRECT` I/O: every journal write is a multiple of this at an aligned offset.
pub const SECTOR_BYTES: usize = 4096;
/// Size of [`EntryHeader`] (bytes); the body follows immediately.
pub const ENTRY_HEADER_BYTES: usize = 128;
/// Default size of one segment file (bytes).
pub const SEGMENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Size of one superblock copy (bytes).
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Largest body a configuration may produce: a batch of the largest size (bytes).
pub const ENTRY_BODY_BYTES_MAX_LIMIT: usize = BATCH_ENTRIES_MAX_LIMIT * RECORD_BYTES;

/// First eight bytes of every entry.
pub const ENTRY_MAGIC: u64 = u64::from_le_bytes(*b"PCJOURNL");
/// Entry format version this code writes and reads.
pub const JOURNAL_VERSION: u16 = 1;
/// First eight bytes of every superblock copy (distinct from [`ENTRY_MAGIC`]).
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"PCSUPERB");
/// Superblock format version this code writes and reads (2: checkpoints with snapshots;
/// 3: `log_view` and `commit_max`).
pub const SUPERBLOCK_VERSION: u16 = 4;
/// First eight bytes of every snapshot file.
pub const SNAPSHOT_MAGIC: u64 = u64::from_le_bytes(*b"PCSNAPSH");
/// Snapshot file format version this code writes and reads.
pub const SNAPSHOT_FILE_VERSION: u16 = 1;
/// Size of a snapshot file's header (bytes); the snapshot bytes follow, sector aligned.
pub const SNAPSHOT_HEADER_BYTES: usize = 4096;
/// The chain value before op 1: op 1's `checksum_previous`.
pub const JOURNAL_CHAIN_ROOT: JournalChecksum = 0;

const _: () = assert!(size_of::<EntryHeader>() == ENTRY_HEADER_BYTES);
const _: () = assert!(size_of::<SuperblockHeader>() <= SUPERBLOCK_BYTES);
const _: () = assert!(SUPERBLOCK_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(size_of::<SnapshotFileHeader>() <= SNAPSHOT_HEADER_BYTES);
const _: () = assert!(SNAPSHOT_HEADER_BYTES.is_multiple_of(SECTOR_BYTES));
const _: () = assert!(SEGMENT_BYTES_DEFAULT.is_multiple_of(SECTOR_BYTES as u64));
const _: () = assert!(ENTRY_HEADER_BYTES <= SECTOR_BYTES);
// The largest entry fits a default segment, and its body size fits the u32 field.
const _: () =
    assert!(entry_bytes_padded(ENTRY_BODY_BYTES_MAX_LIMIT) as u64 <= SEGMENT_BYTES_DEFAULT);
const _: () = assert!(ENTRY_BODY_BYTES_MAX_LIMIT <= u32::MAX as usize);
// The layout is the in-memory layout of a `Pod`; only little-endian hosts read it as written.
const _: () = assert!(cfg!(target_endian = "little"));

/// The checksum of entries, superblocks and the hash chain.
pub type JournalChecksum = u128;

/// BLAKE3 of `bytes`, truncated to its first 128 bits (little-endian). See the module
/// documentation for the measurement behind the choice.
pub fn journal_checksum(bytes: &[u8]) -> JournalChecksum {
    let hash = blake3::hash(bytes);
    let mut truncated = [0u8; 16];
    truncated.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_le_bytes(truncated)
}

/// The fields of an entry that describe the batch (everything but checksums and sizes the
/// format derives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Shard (replication group) the entry belongs to.
    pub shard: u32,
    /// View the op was assigned in.
    pub view: u64,
    /// Op number (≥ 1).
    pub op: u64,
    /// Operation code of every record in the body.
    pub operation: u16,
    /// Records in the body.
    pub entry_count: u32,
    /// Size of one record (bytes).
    pub record_bytes: u32,
    /// Client request descriptors after the records ([`crate::session`]); 0 for internal
    /// traffic and requests that do not fit one batch.
    pub request_count: u32,
}

impl EntryMeta {
    /// Bytes of body: the records, then the request descriptors.
    pub const fn body_bytes(&self) -> u64 {
        self.entry_count as u64 * self.record_bytes as u64
            + self.request_count as u64 * REQUEST_DESCRIPTOR_BYTES as u64
    }

    /// Bytes of records at the start of the body.
    pub const fn records_bytes(&self) -> usize {
        self.entry_count as usize * self.record_bytes as usize
    }
}

/// The largest body of an entry of at most `entries_max` records of `record_bytes`: the
/// records and, at most one per record, their request descriptors.
pub const fn entry_body_bytes_max(entries_max: usize, record_bytes: usize) -> usize {
    entries_max * (record_bytes + REQUEST_DESCRIPTOR_BYTES)
}

/// The entry header as it lies on disk. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct EntryHeader {
    /// [`ENTRY_MAGIC`].
    pub magic: u64,
    /// [`JOURNAL_VERSION`].
    pub version: u16,
    /// Operation code of every record.
    pub operation: u16,
    /// Shard the entry belongs to.
    pub shard: u32,
    /// Records in the body.
    pub entry_count: u32,
    /// Size of one record (bytes).
    pub record_bytes: u32,
    /// Bytes of body after the header: `entry_count * record_bytes + request_count *
    /// REQUEST_DESCRIPTOR_BYTES`.
    pub body_bytes: u32,
    /// Client request descriptors after the records (zero in entries written before
    /// sessions: the field was reserved and zero).
    pub request_count: u32,
    /// View the op was assigned in.
    pub view: u64,
    /// Op number.
    pub op: u64,
    /// [`journal_checksum`] of the body.
    pub checksum_body: u128,
    /// The previous entry's `checksum_header`.
    pub checksum_previous: u128,
    /// [`journal_checksum`] of this header with this field zero.
    pub checksum_header: u128,
    /// Must be zero.
    pub reserved_b: [u8; 32],
}

/// The checksum of `header` with its `checksum_header` field taken as zero.
pub fn entry_header_checksum(header: &EntryHeader) -> JournalChecksum {
    let unsealed = EntryHeader {
        checksum_header: 0,
        ..*header
    };
    journal_checksum(bytemuck::bytes_of(&unsealed))
}

/// Bytes an entry occupies on disk: header + body rounded up to [`SECTOR_BYTES`].
pub const fn entry_bytes_padded(body_bytes: usize) -> usize {
    (ENTRY_HEADER_BYTES + body_bytes).next_multiple_of(SECTOR_BYTES)
}

/// Writes header + body + zero padding into `buf`, chaining to `checksum_previous` (the
/// previous entry's checksum, [`JOURNAL_CHAIN_ROOT`] for op 1). Returns the bytes written
/// (the padded length) and this entry's checksum, which the next entry chains to.
///
/// # Panics
/// On a caller bug: `body.len() != entry_count * record_bytes`, a body over `u32::MAX`
/// bytes, `op == 0`, or `buf` shorter than [`entry_bytes_padded`].
pub fn encode_entry(
    buf: &mut [u8],
    meta: &EntryMeta,
    body: &[u8],
    checksum_previous: JournalChecksum,
) -> (usize, JournalChecksum) {
    let split = body.len().min(meta.records_bytes());
    encode_entry_parts(buf, meta, &body[..split], &body[split..], checksum_previous)
}

/// [`encode_entry`] with the body in its two parts: the records and the request
/// descriptors' bytes (a leader keeps them in separate buffers).
///
/// # Panics
/// As [`encode_entry`].
pub fn encode_entry_parts(
    buf: &mut [u8],
    meta: &EntryMeta,
    records: &[u8],
    requests: &[u8],
    checksum_previous: JournalChecksum,
) -> (usize, JournalChecksum) {
    assert_eq!(
        records.len(),
        meta.records_bytes(),
        "records must be entry_count * record_bytes"
    );
    assert_eq!(
        (records.len() + requests.len()) as u64,
        meta.body_bytes(),
        "body must be entry_count * record_bytes + request_count * REQUEST_DESCRIPTOR_BYTES"
    );
    let body_len = records.len() + requests.len();
    let body_bytes = u32::try_from(body_len).expect("body must fit the u32 body_bytes field");
    assert!(meta.op >= 1, "op numbers start at 1");
    let padded_bytes = entry_bytes_padded(body_len);
    assert!(
        buf.len() >= padded_bytes,
        "buffer shorter than the padded entry"
    );
    let body_end = ENTRY_HEADER_BYTES + body_len;
    let records_end = ENTRY_HEADER_BYTES + records.len();
    buf[ENTRY_HEADER_BYTES..records_end].copy_from_slice(records);
    buf[records_end..body_end].copy_from_slice(requests);
    buf[body_end..padded_bytes].fill(0);
    let body = &buf[ENTRY_HEADER_BYTES..body_end];

    let mut header = EntryHeader {
        magic: ENTRY_MAGIC,
        version: JOURNAL_VERSION,
        operation: meta.operation,
        shard: meta.shard,
        entry_count: meta.entry_count,
        record_bytes: meta.record_bytes,
        body_bytes,
        request_count: meta.request_count,
        view: meta.view,
        op: meta.op,
        checksum_body: journal_checksum(body),
        checksum_previous,
        checksum_header: 0,
        reserved_b: [0; 32],
    };
    header.checksum_header = entry_header_checksum(&header);
    buf[..ENTRY_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
    debug_assert!(decode_entry(&buf[..padded_bytes], body_len).is_ok());
    (padded_bytes, header.checksum_header)
}

/// One entry that passed every check of [`decode_entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedEntry<'a> {
    /// What the batch is.
    pub meta: EntryMeta,
    /// The records (`meta.records_bytes()`), then the request descriptors.
    pub body: &'a [u8],
    /// This entry's checksum (its `checksum_header`): what the next entry chains to.
    pub checksum: JournalChecksum,
    /// The previous entry's checksum, as this entry records it.
    pub checksum_previous: JournalChecksum,
    /// Bytes the entry occupies on disk ([`entry_bytes_padded`]).
    pub padded_bytes: usize,
}

impl<'a> DecodedEntry<'a> {
    /// The records.
    pub fn records(&self) -> &'a [u8] {
        &self.body[..self.meta.records_bytes()]
    }

    /// The request descriptors' bytes (unaligned; see [`request_descriptors`]).
    pub fn requests(&self) -> &'a [u8] {
        &self.body[self.meta.records_bytes()..]
    }
}

/// Copies the descriptors in `bytes` (a whole number of them, any alignment) into `out`;
/// returns how many. `None` if `bytes` is not a whole number of descriptors or `out` is
/// too short.
pub fn request_descriptors(bytes: &[u8], out: &mut [RequestDescriptor]) -> Option<usize> {
    if !bytes.len().is_multiple_of(REQUEST_DESCRIPTOR_BYTES) {
        return None;
    }
    let count = bytes.len() / REQUEST_DESCRIPTOR_BYTES;
    let out = out.get_mut(..count)?;
    bytemuck::cast_slice_mut::<RequestDescriptor, u8>(out).copy_from_slice(bytes);
    Some(count)
}

/// Why bytes are not a valid entry.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryError {
    /// Fewer bytes than the header or the body needs.
    #[error("entry truncated: {bytes} bytes, {needed} needed")]
    Truncated {
        /// Bytes given.
        bytes: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The bytes do not start with [`ENTRY_MAGIC`] (for example, an unwritten zero sector).
    #[error("bad entry magic")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported journal version {version}")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// The header checksum does not match: the header is corrupt or torn.
    #[error("entry header checksum mismatch")]
    HeaderChecksum,
    /// Reserved header bytes are not zero.
    #[error("entry reserved bytes are not zero")]
    ReservedNotZero,
    /// Op 0 is never written.
    #[error("entry op 0 is invalid")]
    OpZero,
    /// `body_bytes` is not `entry_count * record_bytes`.
    #[error(
        "entry sizes disagree: {entry_count} records of {record_bytes} bytes in {body_bytes} bytes"
    )]
    SizeInvalid {
        /// Records announced.
        entry_count: u32,
        /// Record size announced.
        record_bytes: u32,
        /// Body size announced.
        body_bytes: u32,
    },
    /// The body is larger than the reader accepts.
    #[error("entry body of {body_bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Body size announced.
        body_bytes: u32,
        /// The reader's limit.
        max: usize,
    },
    /// The body checksum does not match: the body is corrupt or torn.
    #[error("entry body checksum mismatch")]
    BodyChecksum,
}

/// Decodes and verifies the entry header at the start of `bytes` without its body: magic,
/// version and the header checksum first (nothing else in the header is trusted before it),
/// then reserved bytes, op and sizes against `body_bytes_max`. Needs only
/// [`ENTRY_HEADER_BYTES`]; the body checksum is *not* checked, so use this only to find
/// where entries lie (their size and op), and [`decode_entry`] before trusting a body.
/// Never panics.
pub fn decode_entry_header(bytes: &[u8], body_bytes_max: usize) -> Result<EntryHeader, EntryError> {
    let Some(header_bytes) = bytes.get(..ENTRY_HEADER_BYTES) else {
        return Err(EntryError::Truncated {
            bytes: bytes.len(),
            needed: ENTRY_HEADER_BYTES,
        });
    };
    // Copy out: the caller's buffer need not be aligned for the header's u128 fields.
    let header: EntryHeader = bytemuck::pod_read_unaligned(header_bytes);
    if header.magic != ENTRY_MAGIC {
        return Err(EntryError::BadMagic);
    }
    if header.version != JOURNAL_VERSION {
        return Err(EntryError::UnsupportedVersion {
            version: header.version,
        });
    }
    if header.checksum_header != entry_header_checksum(&header) {
        return Err(EntryError::HeaderChecksum);
    }
    if header.reserved_b != [0; 32] {
        return Err(EntryError::ReservedNotZero);
    }
    if header.op == 0 {
        return Err(EntryError::OpZero);
    }
    // Checked: the fields are any u32s a writer (or a peer) sealed; a product that
    // overflows is as invalid as one that does not add up.
    let body_bytes_implied = u64::from(header.entry_count)
        .checked_mul(u64::from(header.record_bytes))
        .and_then(|records| {
            u64::from(header.request_count)
                .checked_mul(REQUEST_DESCRIPTOR_BYTES as u64)
                .and_then(|requests| records.checked_add(requests))
        });
    if body_bytes_implied != Some(u64::from(header.body_bytes)) {
        return Err(EntryError::SizeInvalid {
            entry_count: header.entry_count,
            record_bytes: header.record_bytes,
            body_bytes: header.body_bytes,
        });
    }
    if header.body_bytes as usize > body_bytes_max {
        return Err(EntryError::TooLarge {
            body_bytes: header.body_bytes,
            max: body_bytes_max,
        });
    }
    Ok(header)
}

/// Decodes and verifies one entry at the start of `bytes` (which may hold more: padding,
/// further entries): every check of [`decode_entry_header`], then the body checksum.
/// Needs header + body, not the padding. Never panics.
pub fn decode_entry(bytes: &[u8], body_bytes_max: usize) -> Result<DecodedEntry<'_>, EntryError> {
    let header = decode_entry_header(bytes, body_bytes_max)?;
    let body_bytes = header.body_bytes as usize;
    let body_end = ENTRY_HEADER_BYTES + body_bytes;
    let Some(body) = bytes.get(ENTRY_HEADER_BYTES..body_end) else {
        return Err(EntryError::Truncated {
            bytes: bytes.len(),
            needed: body_end,
        });
    };
    if journal_checksum(body) != header.checksum_body {
        return Err(EntryError::BodyChecksum);
    }
    Ok(DecodedEntry {
        meta: EntryMeta {
            shard: header.shard,
            view: header.view,
            op: header.op,
            operation: header.operation,
            entry_count: header.entry_count,
            record_bytes: header.record_bytes,
            request_count: header.request_count,
        },
        body,
        checksum: header.checksum_header,
        checksum_previous: header.checksum_previous,
        padded_bytes: entry_bytes_padded(body_bytes),
    })
}

/// Why a scan stopped at a position.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalScanError {
    /// The bytes there are not a valid entry (or the region ends inside its padding).
    #[error("invalid entry: {0}")]
    Entry(#[from] EntryError),
    /// A valid entry whose op is not the one expected.
    #[error("op {found} where op {expected} was expected")]
    OpGap {
        /// Op expected.
        expected: u64,
        /// Op found.
        found: u64,
    },
    /// A valid entry with the expected op whose `checksum_previous` is not the previous
    /// entry's checksum: it belongs to another history.
    #[error("hash chain broken at op {op}")]
    ChainBroken {
        /// Op of the entry that does not chain.
        op: u64,
    },
}

/// How a scanned region ends. See the module documentation for the rule and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Clean: everything from `end_offset` to the end of the region is zero (unwritten), or
    /// `end_offset` is the end of the region.
    Clean,
    /// A torn last write: a position that does not continue the journal, with nothing valid
    /// after it. Truncate at `offset` (make the rest read as zero) before appending.
    Torn {
        /// File offset of the torn entry (equals `end_offset`).
        offset: u64,
    },
    /// A bad entry followed by later valid data: corruption inside the journal. Never skip it.
    Corrupt {
        /// File offset of the bad entry (equals `end_offset`).
        offset: u64,
        /// The op that should be at `offset`.
        op_expected: u64,
        /// What is wrong there.
        error: JournalScanError,
    },
}

/// The result of [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Valid entries delivered to `on_entry`.
    pub entries: u64,
    /// File offset just past the last valid entry's padding: where the next append goes
    /// (sector aligned; `base_offset` if there were none).
    pub end_offset: u64,
    /// Op of the last valid entry (`op_next - 1` if there were none).
    pub op_last: u64,
    /// Checksum of the last valid entry (`checksum_previous` if there were none).
    pub checksum_last: JournalChecksum,
    /// How the region ends after the last valid entry.
    pub tail: Tail,
}

/// Scans `bytes` (one segment's contents; `base_offset` is its file offset, sector aligned),
/// expecting the first entry to be `op_next` chaining to `checksum_previous`. Calls
/// `on_entry(&entry, file_offset)` for every valid entry, in order, then classifies the end of
/// the region as [`Tail::Clean`], [`Tail::Torn`] or [`Tail::Corrupt`] (see the module docs).
/// Never panics on the bytes; does not allocate.
///
/// # Panics
/// On a caller bug: `base_offset` not sector aligned, or `op_next == 0`.
pub fn scan(
    bytes: &[u8],
    base_offset: u64,
    op_next: u64,
    checksum_previous: JournalChecksum,
    body_bytes_max: usize,
    mut on_entry: impl FnMut(&DecodedEntry<'_>, u64),
) -> ScanOutcome {
    assert!(base_offset.is_multiple_of(SECTOR_BYTES as u64));
    assert!(op_next >= 1, "op numbers start at 1");
    let mut offset = 0usize;
    let mut entries = 0u64;
    let mut checksum_last = checksum_previous;
    // Bounded: every turn either returns or advances `offset` by at least one sector.
    let tail = loop {
        let Some(rest) = bytes.get(offset..).filter(|rest| !rest.is_empty()) else {
            break Tail::Clean;
        };
        let op_expected = op_next + entries;
        match entry_continuing(rest, op_expected, checksum_last, body_bytes_max) {
            Ok(entry) => {
                debug_assert!(entry.padded_bytes >= SECTOR_BYTES);
                on_entry(&entry, base_offset + offset as u64);
                entries += 1;
                checksum_last = entry.checksum;
                offset += entry.padded_bytes;
            }
            Err(error) => {
                break tail_classify(
                    bytes,
                    offset,
                    base_offset,
                    op_expected,
                    error,
                    body_bytes_max,
                );
            }
        }
    };
    debug_assert!(offset.is_multiple_of(SECTOR_BYTES) || offset >= bytes.len());
    ScanOutcome {
        entries,
        end_offset: base_offset + offset as u64,
        op_last: op_next + entries - 1,
        checksum_last,
        tail,
    }
}

/// Whether the entry at the start of `bytes` is valid, wholly present, and continues the
/// journal at `op_expected` after `checksum_previous`: what the writer (`shards`) checks at
/// the start of the next segment when one ends before its last byte (module docs, "Segment
/// boundaries").
pub fn entry_continues(
    bytes: &[u8],
    op_expected: u64,
    checksum_previous: JournalChecksum,
    body_bytes_max: usize,
) -> bool {
    entry_continuing(bytes, op_expected, checksum_previous, body_bytes_max).is_ok()
}

/// The entry at the start of `bytes` if it is valid, wholly present (padding included), and
/// continues the journal at `op_expected` after `checksum_previous`.
fn entry_continuing(
    bytes: &[u8],
    op_expected: u64,
    checksum_previous: JournalChecksum,
    body_bytes_max: usize,
) -> Result<DecodedEntry<'_>, JournalScanError> {
    let entry = entry_whole(bytes, body_bytes_max)?;
    if entry.meta.op != op_expected {
        return Err(JournalScanError::OpGap {
            expected: op_expected,
            found: entry.meta.op,
        });
    }
    if entry.checksum_previous != checksum_previous {
        return Err(JournalScanError::ChainBroken { op: entry.meta.op });
    }
    Ok(entry)
}

/// [`decode_entry`], also requiring the padding to be within `bytes`: an entry is written as
/// one padded unit, so one whose padding is missing was not wholly written.
fn entry_whole(bytes: &[u8], body_bytes_max: usize) -> Result<DecodedEntry<'_>, EntryError> {
    let entry = decode_entry(bytes, body_bytes_max)?;
    if entry.padded_bytes > bytes.len() {
        return Err(EntryError::Truncated {
            bytes: bytes.len(),
            needed: entry.padded_bytes,
        });
    }
    Ok(entry)
}

/// Classifies the end of the journal at `offset` (relative to `bytes`), where `error` stopped
/// the scan: Clean, Torn or Corrupt, by the rule in the module documentation.
fn tail_classify(
    bytes: &[u8],
    offset: usize,
    base_offset: u64,
    op_expected: u64,
    error: JournalScanError,
    body_bytes_max: usize,
) -> Tail {
    let rest = &bytes[offset..];
    if bytes_all_zero(rest) {
        return Tail::Clean;
    }
    // Bounded by the region: one decode attempt per sector. Any entry the format admits
    // counts as history, even one over this reader's limit: entries written under larger
    // batch limits are history, not garbage to cut (the runtime refuses them by name).
    let history_bytes_max = body_bytes_max.max(ENTRY_BODY_BYTES_MAX_LIMIT);
    let later_history = rest.chunks(SECTOR_BYTES).enumerate().any(|(sector, _)| {
        entry_whole(&rest[sector * SECTOR_BYTES..], history_bytes_max)
            .is_ok_and(|entry| entry.meta.op >= op_expected)
    });
    let offset = base_offset + offset as u64;
    if later_history {
        Tail::Corrupt {
            offset,
            op_expected,
            error,
        }
    } else {
        Tail::Torn { offset }
    }
}

/// The highest op of an entry that verifies on its own (as [`scan`]'s look-ahead checks,
/// and of shard `shard`) starting at any sector of `bytes` with `op >= op_min`; `None` if
/// there is none. Recovery calls it on what lies after a [`Tail::Corrupt`] position: the
/// entries there were made durable once, so this replica may have acknowledged every op up
/// to the result (`docs/protocol.md` 8). One decode attempt per sector; never panics.
pub fn op_max_after(bytes: &[u8], shard: u32, op_min: u64, body_bytes_max: usize) -> Option<u64> {
    // Bounded by the region: one decode attempt per sector.
    (0..bytes.len().div_ceil(SECTOR_BYTES))
        .filter_map(|sector| entry_whole(&bytes[sector * SECTOR_BYTES..], body_bytes_max).ok())
        .filter(|entry| entry.meta.shard == shard && entry.meta.op >= op_min)
        .map(|entry| entry.meta.op)
        .max()
}

/// Whether every byte is zero (vectorizable: no early exit inside a sector).
fn bytes_all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(SECTOR_BYTES)
        .all(|sector| sector.iter().fold(0u8, |acc, &byte| acc | byte) == 0)
}

/// The per-shard superblock: where recovery starts and what has been made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The cluster this shard's journal belongs to.
    pub cluster_id: u128,
    /// The shard (replication group).
    pub shard: u32,
    /// Increments with each write; copy slot = `sequence % 2`.
    pub sequence: u64,
    /// Highest view this replica has taken part in.
    pub view: u64,
    /// View of the last log this replica installed whole (`≤ view`): with `op_durable`, the
    /// replica's voting log (`docs/protocol.md` 6.4).
    pub log_view: u64,
    /// Highest op known committed when this copy was written (may exceed `op_durable`:
    /// a replica can learn of commits before it holds the entries).
    pub commit_max: u64,
    /// Highest op known durable in the journal when this copy was written.
    pub op_durable: u64,
    /// The latest checkpoint: its op, where the entry after it goes, its chain value.
    pub checkpoint: Checkpoint,
    /// [`journal_checksum`] of the latest checkpoint's snapshot bytes (0 when
    /// `checkpoint.op` is 0: no snapshot).
    pub snapshot_checksum: JournalChecksum,
    /// The checkpoint before the latest (equal to it, or op 0, until there are two).
    /// Recovery scans the journal from here, so the ops after it stay readable.
    pub checkpoint_previous: Checkpoint,
    /// Size of every segment file (bytes).
    pub segment_bytes: u64,
    /// The replica lost its disk and was formatted again to take its own place
    /// (`percore format --replace`): it may have acknowledged ops and voted in views it no
    /// longer knows of, and must rebuild from its peers before it votes
    /// (`docs/protocol.md` 8). Cleared once it has. A binary from before this flag refuses
    /// the superblock (`reserved` bits not zero) instead of ignoring it.
    pub replacing: bool,
    /// Digest of the settings that decide results (the shard count and the state machine's
    /// own: for a `percore node` the ledger's limits and the session table's width) under
    /// which this journal was written; the node computes it (`percore_shards::config::
    /// SettingsDigest`) and refuses to open a journal written under another. 0: not
    /// recorded (a journal of a program that does not check it).
    pub settings_digest: u64,
}

/// [`Superblock::replacing`] in the superblock's `flags` byte.
const SUPERBLOCK_FLAG_REPLACING: u8 = 1;

/// A point in the journal: op `op` is the last op before it, and entry `op + 1` goes at
/// (`segment`, `offset`) or, if it did not fit there, at the start of the next segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Op of the checkpoint (0: the start of the journal).
    pub op: u64,
    /// Segment index holding the position after entry `op`.
    pub segment: u64,
    /// File offset of that position in its segment (sector aligned).
    pub offset: u64,
    /// Chain value there: the checksum of entry `op` ([`JOURNAL_CHAIN_ROOT`] for op 0).
    pub checksum: JournalChecksum,
}

impl Checkpoint {
    /// The start of an empty journal.
    pub const ROOT: Checkpoint = Checkpoint {
        op: 0,
        segment: 0,
        offset: 0,
        checksum: JOURNAL_CHAIN_ROOT,
    };

    fn position(&self) -> (u64, u64) {
        (self.segment, self.offset)
    }
}

/// The superblock as it lies on disk. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct SuperblockHeader {
    magic: u64,
    version: u16,
    flags: u8,
    reserved_a: u8,
    shard: u32,
    sequence: u64,
    view: u64,
    op_durable: u64,
    checkpoint_op: u64,
    checkpoint_segment: u64,
    checkpoint_offset: u64,
    segment_bytes: u64,
    checkpoint_previous_op: u64,
    cluster_id: u128,
    checkpoint_checksum: u128,
    snapshot_checksum: u128,
    checkpoint_previous_segment: u64,
    checkpoint_previous_offset: u64,
    checkpoint_previous_checksum: u128,
    log_view: u64,
    commit_max: u64,
    settings_digest: u64,
    reserved_b: u64,
    checksum: u128,
}

const SUPERBLOCK_HEADER_BYTES: usize = size_of::<SuperblockHeader>();
const SUPERBLOCK_CHECKSUM_OFFSET: usize = SUPERBLOCK_HEADER_BYTES - size_of::<u128>();
const _: () = assert!(SUPERBLOCK_HEADER_BYTES == 208);

/// Why bytes are not a valid superblock copy, or no copy is.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockError {
    /// Fewer than [`SUPERBLOCK_BYTES`] bytes.
    #[error("superblock truncated: {bytes} bytes, {SUPERBLOCK_BYTES} needed")]
    Truncated {
        /// Bytes given.
        bytes: usize,
    },
    /// The copy does not start with [`SUPERBLOCK_MAGIC`] (for example, never written).
    #[error("bad superblock magic")]
    BadMagic,
    /// A format version this code does not read (version 1, from before checkpoints, is
    /// refused: no migration).
    #[error("unsupported superblock version {version} (this build reads {SUPERBLOCK_VERSION})")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// The checksum does not match: the copy is corrupt or torn.
    #[error("superblock checksum mismatch")]
    Checksum,
    /// Reserved bytes are not zero.
    #[error("superblock reserved bytes are not zero")]
    ReservedNotZero,
    /// `segment_bytes` or a checkpoint offset is not sector aligned, or an offset lies past
    /// the segment.
    #[error(
        "superblock geometry invalid: segment_bytes {segment_bytes}, checkpoint_offset {checkpoint_offset}"
    )]
    GeometryInvalid {
        /// Segment size found.
        segment_bytes: u64,
        /// Checkpoint offset found (the first one that is invalid).
        checkpoint_offset: u64,
    },
    /// The checkpoints contradict each other or `op_durable`: the previous one is after the
    /// latest, the latest is above `op_durable`, or a snapshot checksum is present without a
    /// checkpoint (or missing with one).
    #[error(
        "superblock checkpoints invalid: previous op {checkpoint_previous_op}, \
         latest op {checkpoint_op}, op_durable {op_durable}"
    )]
    CheckpointInvalid {
        /// The previous checkpoint's op.
        checkpoint_previous_op: u64,
        /// The latest checkpoint's op.
        checkpoint_op: u64,
        /// `op_durable` found.
        op_durable: u64,
    },
    /// `log_view` is above `view`: a replica installs logs only of views it has joined.
    #[error("superblock views invalid: log_view {log_view} above view {view}")]
    ViewsInvalid {
        /// `view` found.
        view: u64,
        /// `log_view` found.
        log_view: u64,
    },
    /// A valid copy in the wrong slot (sequence `s` belongs in slot `s % 2`): a misdirected
    /// write.
    #[error("superblock sequence {sequence} found in slot {slot}")]
    WrongSlot {
        /// Slot read.
        slot: u8,
        /// Sequence found.
        sequence: u64,
    },
    /// Both copies are valid but name different clusters or shards.
    #[error("superblock copies disagree on cluster or shard")]
    CopiesDisagree,
    /// Neither copy is valid.
    #[error("no valid superblock copy (slot 0: {slot0}; slot 1: {slot1})")]
    NoValidCopy {
        /// Why slot 0 is invalid.
        slot0: SuperblockCopyError,
        /// Why slot 1 is invalid.
        slot1: SuperblockCopyError,
    },
}

/// Why one superblock copy is invalid: a [`SuperblockError`] other than the two-copy ones,
/// flattened so that [`SuperblockError::NoValidCopy`] can name both without recursion.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
#[error("{0}")]
pub struct SuperblockCopyError(pub SuperblockCopyReason);

/// See [`SuperblockCopyError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperblockCopyReason {
    /// [`SuperblockError::Truncated`].
    Truncated,
    /// [`SuperblockError::BadMagic`].
    BadMagic,
    /// [`SuperblockError::UnsupportedVersion`].
    UnsupportedVersion(u16),
    /// [`SuperblockError::Checksum`].
    Checksum,
    /// Any other: reserved bytes, geometry, checkpoints, views, slot.
    Invalid,
}

impl std::fmt::Display for SuperblockCopyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperblockCopyReason::Truncated => write!(f, "truncated"),
            SuperblockCopyReason::BadMagic => write!(f, "bad magic"),
            SuperblockCopyReason::UnsupportedVersion(version) => {
                write!(f, "unsupported version {version}")
            }
            SuperblockCopyReason::Checksum => write!(f, "checksum mismatch"),
            SuperblockCopyReason::Invalid => write!(f, "invalid fields"),
        }
    }
}

impl From<SuperblockError> for SuperblockCopyError {
    fn from(error: SuperblockError) -> Self {
        SuperblockCopyError(match error {
            SuperblockError::Truncated { .. } => SuperblockCopyReason::Truncated,
            SuperblockError::BadMagic => SuperblockCopyReason::BadMagic,
            SuperblockError::UnsupportedVersion { version } => {
                SuperblockCopyReason::UnsupportedVersion(version)
            }
            SuperblockError::Checksum => SuperblockCopyReason::Checksum,
            _ => SuperblockCopyReason::Invalid,
        })
    }
}

fn superblock_geometry_valid(segment_bytes: u64, checkpoint_offset: u64) -> bool {
    let sector = SECTOR_BYTES as u64;
    segment_bytes > 0
        && segment_bytes.is_multiple_of(sector)
        && checkpoint_offset.is_multiple_of(sector)
        && checkpoint_offset <= segment_bytes
}

/// Whether the checkpoints are ordered and consistent with `op_durable` and the snapshot.
fn superblock_checkpoints_valid(superblock: &Superblock) -> bool {
    let latest = &superblock.checkpoint;
    let previous = &superblock.checkpoint_previous;
    previous.op <= latest.op
        && previous.position() <= latest.position()
        && latest.op <= superblock.op_durable
        && (latest.op == 0) == (superblock.snapshot_checksum == 0)
        && (previous.op != latest.op || previous == latest)
}

/// Writes one superblock copy (header, zeros, checksum over all of it) into `buf`.
///
/// # Panics
/// On a caller bug: `segment_bytes` zero or not sector aligned, a checkpoint offset not
/// sector aligned or past the segment, or checkpoints out of order.
pub fn encode_superblock(superblock: &Superblock, buf: &mut [u8; SUPERBLOCK_BYTES]) {
    assert!(
        superblock_geometry_valid(superblock.segment_bytes, superblock.checkpoint.offset)
            && superblock_geometry_valid(
                superblock.segment_bytes,
                superblock.checkpoint_previous.offset
            ),
        "superblock geometry invalid"
    );
    assert!(
        superblock_checkpoints_valid(superblock),
        "superblock checkpoints invalid"
    );
    assert!(
        superblock.log_view <= superblock.view,
        "superblock log_view above view"
    );
    let header = SuperblockHeader {
        magic: SUPERBLOCK_MAGIC,
        version: SUPERBLOCK_VERSION,
        flags: if superblock.replacing {
            SUPERBLOCK_FLAG_REPLACING
        } else {
            0
        },
        reserved_a: 0,
        shard: superblock.shard,
        sequence: superblock.sequence,
        view: superblock.view,
        op_durable: superblock.op_durable,
        checkpoint_op: superblock.checkpoint.op,
        checkpoint_segment: superblock.checkpoint.segment,
        checkpoint_offset: superblock.checkpoint.offset,
        segment_bytes: superblock.segment_bytes,
        checkpoint_previous_op: superblock.checkpoint_previous.op,
        cluster_id: superblock.cluster_id,
        checkpoint_checksum: superblock.checkpoint.checksum,
        snapshot_checksum: superblock.snapshot_checksum,
        checkpoint_previous_segment: superblock.checkpoint_previous.segment,
        checkpoint_previous_offset: superblock.checkpoint_previous.offset,
        checkpoint_previous_checksum: superblock.checkpoint_previous.checksum,
        log_view: superblock.log_view,
        commit_max: superblock.commit_max,
        settings_digest: superblock.settings_digest,
        reserved_b: 0,
        checksum: 0,
    };
    buf.fill(0);
    buf[..SUPERBLOCK_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
    let checksum = journal_checksum(buf);
    buf[SUPERBLOCK_CHECKSUM_OFFSET..SUPERBLOCK_HEADER_BYTES]
        .copy_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(decode_superblock(buf), Ok(*superblock));
}

/// Decodes and verifies one superblock copy at the start of `buf`. Never panics.
pub fn decode_superblock(buf: &[u8]) -> Result<Superblock, SuperblockError> {
    let Some(copy) = buf.first_chunk::<SUPERBLOCK_BYTES>() else {
        return Err(SuperblockError::Truncated { bytes: buf.len() });
    };
    let header: SuperblockHeader = bytemuck::pod_read_unaligned(&copy[..SUPERBLOCK_HEADER_BYTES]);
    if header.magic != SUPERBLOCK_MAGIC {
        return Err(SuperblockError::BadMagic);
    }
    if header.version != SUPERBLOCK_VERSION {
        return Err(SuperblockError::UnsupportedVersion {
            version: header.version,
        });
    }
    let mut unsealed = *copy;
    unsealed[SUPERBLOCK_CHECKSUM_OFFSET..SUPERBLOCK_HEADER_BYTES].fill(0);
    if journal_checksum(&unsealed) != header.checksum {
        return Err(SuperblockError::Checksum);
    }
    if header.reserved_a != 0
        || header.reserved_b != 0
        || header.flags & !SUPERBLOCK_FLAG_REPLACING != 0
        || !bytes_all_zero(&copy[SUPERBLOCK_HEADER_BYTES..])
    {
        return Err(SuperblockError::ReservedNotZero);
    }
    for checkpoint_offset in [header.checkpoint_offset, header.checkpoint_previous_offset] {
        if !superblock_geometry_valid(header.segment_bytes, checkpoint_offset) {
            return Err(SuperblockError::GeometryInvalid {
                segment_bytes: header.segment_bytes,
                checkpoint_offset,
            });
        }
    }
    let superblock = Superblock {
        cluster_id: header.cluster_id,
        shard: header.shard,
        sequence: header.sequence,
        view: header.view,
        log_view: header.log_view,
        commit_max: header.commit_max,
        op_durable: header.op_durable,
        checkpoint: Checkpoint {
            op: header.checkpoint_op,
            segment: header.checkpoint_segment,
            offset: header.checkpoint_offset,
            checksum: header.checkpoint_checksum,
        },
        snapshot_checksum: header.snapshot_checksum,
        checkpoint_previous: Checkpoint {
            op: header.checkpoint_previous_op,
            segment: header.checkpoint_previous_segment,
            offset: header.checkpoint_previous_offset,
            checksum: header.checkpoint_previous_checksum,
        },
        segment_bytes: header.segment_bytes,
        replacing: header.flags & SUPERBLOCK_FLAG_REPLACING != 0,
        settings_digest: header.settings_digest,
    };
    if !superblock_checkpoints_valid(&superblock) {
        return Err(SuperblockError::CheckpointInvalid {
            checkpoint_previous_op: header.checkpoint_previous_op,
            checkpoint_op: header.checkpoint_op,
            op_durable: header.op_durable,
        });
    }
    if superblock.log_view > superblock.view {
        return Err(SuperblockError::ViewsInvalid {
            view: superblock.view,
            log_view: superblock.log_view,
        });
    }
    Ok(superblock)
}

/// [`decode_superblock`] of the copy in `slot`, which must hold an even (slot 0) or odd
/// (slot 1) sequence.
fn decode_superblock_in_slot(buf: &[u8], slot: u8) -> Result<Superblock, SuperblockError> {
    let superblock = decode_superblock(buf)?;
    if superblock.sequence % 2 != u64::from(slot) {
        return Err(SuperblockError::WrongSlot {
            slot,
            sequence: superblock.sequence,
        });
    }
    Ok(superblock)
}

/// The valid copy with the highest sequence (`copy0` is slot 0, `copy1` slot 1). Err only if
/// neither copy is valid, or both are valid but disagree on cluster or shard. The next write
/// goes to slot `(sequence + 1) % 2` with `sequence + 1`.
pub fn superblock_latest(copy0: &[u8], copy1: &[u8]) -> Result<Superblock, SuperblockError> {
    match (
        decode_superblock_in_slot(copy0, 0),
        decode_superblock_in_slot(copy1, 1),
    ) {
        (Ok(superblock0), Ok(superblock1)) => {
            if superblock0.cluster_id != superblock1.cluster_id
                || superblock0.shard != superblock1.shard
            {
                return Err(SuperblockError::CopiesDisagree);
            }
            // Different parities, so never equal.
            debug_assert_ne!(superblock0.sequence, superblock1.sequence);
            if superblock0.sequence > superblock1.sequence {
                Ok(superblock0)
            } else {
                Ok(superblock1)
            }
        }
        (Ok(superblock), Err(_)) | (Err(_), Ok(superblock)) => Ok(superblock),
        (Err(error0), Err(error1)) => Err(SuperblockError::NoValidCopy {
            slot0: error0.into(),
            slot1: error1.into(),
        }),
    }
}

const SEGMENT_NAME_PREFIX: &str = "segment-";
const SEGMENT_NAME_SUFFIX: &str = ".journal";
const SEGMENT_NAME_DIGITS_MIN: usize = 8;

/// File name of segment `index`: `segment-{index:08}.journal`.
pub fn segment_file_name(index: u64) -> String {
    format!("{SEGMENT_NAME_PREFIX}{index:08}{SEGMENT_NAME_SUFFIX}")
}

/// The index of a segment file name, or `None` if `name` is not exactly what
/// [`segment_file_name`] writes for some index (so stray files are never taken as segments).
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_NAME_PREFIX)?
        .strip_suffix(SEGMENT_NAME_SUFFIX)?;
    if digits.len() < SEGMENT_NAME_DIGITS_MIN || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Canonical only: zero padding to 8 digits, no further leading zeros.
    if digits.len() > SEGMENT_NAME_DIGITS_MIN && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

const SNAPSHOT_NAME_PREFIX: &str = "snapshot-";
const SNAPSHOT_NAME_SUFFIX: &str = ".state";
const SNAPSHOT_NAME_DIGITS: usize = 20;

/// File name of the snapshot of checkpoint `op`: `snapshot-{op:020}.state` (sorts by op).
pub fn snapshot_file_name(op: u64) -> String {
    format!("{SNAPSHOT_NAME_PREFIX}{op:020}{SNAPSHOT_NAME_SUFFIX}")
}

/// The op of a snapshot file name, or `None` if `name` is not exactly what
/// [`snapshot_file_name`] writes (temporary files included).
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SNAPSHOT_NAME_PREFIX)?
        .strip_suffix(SNAPSHOT_NAME_SUFFIX)?;
    if digits.len() != SNAPSHOT_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a snapshot file's header says. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The cluster.
    pub cluster_id: u128,
    /// The shard.
    pub shard: u32,
    /// The checkpoint op: the state after applying it.
    pub op: u64,
    /// Snapshot bytes after the header (unpadded).
    pub snapshot_bytes: u64,
    /// Checksum of entry `op` (the chain value at the checkpoint).
    pub checkpoint_checksum: JournalChecksum,
    /// [`journal_checksum`] of the snapshot bytes.
    pub snapshot_checksum: JournalChecksum,
    /// The state machine's digest at `op`.
    pub digest: [u8; 32],
}

impl SnapshotMeta {
    /// Bytes of the whole file: header, then the snapshot padded to a sector.
    pub fn file_bytes(&self) -> u64 {
        SNAPSHOT_HEADER_BYTES as u64 + self.snapshot_bytes.next_multiple_of(SECTOR_BYTES as u64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
struct SnapshotFileHeader {
    magic: u64,
    version: u16,
    reserved_a: [u8; 2],
    shard: u32,
    op: u64,
    snapshot_bytes: u64,
    cluster_id: u128,
    checkpoint_checksum: u128,
    snapshot_checksum: u128,
    digest: [u8; 32],
    checksum: u128,
}

const SNAPSHOT_FILE_HEADER_BYTES: usize = size_of::<SnapshotFileHeader>();
const SNAPSHOT_CHECKSUM_OFFSET: usize = SNAPSHOT_FILE_HEADER_BYTES - size_of::<u128>();
const _: () = assert!(SNAPSHOT_FILE_HEADER_BYTES == 128);

/// Why a snapshot file is not the checkpoint's snapshot.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// Fewer bytes than the header, or than the header says the file holds.
    #[error("snapshot file truncated: {bytes} bytes, {needed} needed")]
    Truncated {
        /// Bytes present.
        bytes: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// The file does not start with [`SNAPSHOT_MAGIC`].
    #[error("bad snapshot magic")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported snapshot file version {version}")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// The header checksum does not match.
    #[error("snapshot header checksum mismatch")]
    HeaderChecksum,
    /// Reserved header bytes are not zero.
    #[error("snapshot header reserved bytes are not zero")]
    ReservedNotZero,
    /// The snapshot bytes do not match their checksum.
    #[error("snapshot bytes checksum mismatch")]
    BodyChecksum,
    /// A valid snapshot of another checkpoint, shard or cluster than the superblock names.
    #[error(
        "snapshot is of op {op_found} (checksum {checkpoint_checksum_found:#x}), \
         the superblock's checkpoint is op {op_expected} (checksum {checkpoint_checksum_expected:#x})"
    )]
    NotTheCheckpoint {
        /// Op in the file.
        op_found: u64,
        /// Op the superblock names.
        op_expected: u64,
        /// Chain value in the file.
        checkpoint_checksum_found: JournalChecksum,
        /// Chain value the superblock names.
        checkpoint_checksum_expected: JournalChecksum,
    },
}

/// Writes a snapshot file header into `buf` (all [`SNAPSHOT_HEADER_BYTES`] of it).
///
/// # Panics
/// On a caller bug: `meta.op == 0`.
pub fn encode_snapshot_header(meta: &SnapshotMeta, buf: &mut [u8; SNAPSHOT_HEADER_BYTES]) {
    assert!(meta.op >= 1, "a checkpoint is taken after an op");
    let header = SnapshotFileHeader {
        magic: SNAPSHOT_MAGIC,
        version: SNAPSHOT_FILE_VERSION,
        reserved_a: [0; 2],
        shard: meta.shard,
        op: meta.op,
        snapshot_bytes: meta.snapshot_bytes,
        cluster_id: meta.cluster_id,
        checkpoint_checksum: meta.checkpoint_checksum,
        snapshot_checksum: meta.snapshot_checksum,
        digest: meta.digest,
        checksum: 0,
    };
    buf.fill(0);
    buf[..SNAPSHOT_FILE_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
    let checksum = journal_checksum(buf);
    buf[SNAPSHOT_CHECKSUM_OFFSET..SNAPSHOT_FILE_HEADER_BYTES]
        .copy_from_slice(&checksum.to_le_bytes());
    debug_assert_eq!(decode_snapshot_header(buf), Ok(*meta));
}

/// Decodes and verifies a snapshot file header (the first [`SNAPSHOT_HEADER_BYTES`] of
/// `bytes`). Does not look at the snapshot bytes: see [`verify_snapshot`]. Never panics.
pub fn decode_snapshot_header(bytes: &[u8]) -> Result<SnapshotMeta, SnapshotError> {
    let Some(copy) = bytes.first_chunk::<SNAPSHOT_HEADER_BYTES>() else {
        return Err(SnapshotError::Truncated {
            bytes: bytes.len() as u64,
            needed: SNAPSHOT_HEADER_BYTES as u64,
        });
    };
    let header: SnapshotFileHeader =
        bytemuck::pod_read_unaligned(&copy[..SNAPSHOT_FILE_HEADER_BYTES]);
    if header.magic != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if header.version != SNAPSHOT_FILE_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            version: header.version,
        });
    }
    let mut unsealed = *copy;
    unsealed[SNAPSHOT_CHECKSUM_OFFSET..SNAPSHOT_FILE_HEADER_BYTES].fill(0);
    if journal_checksum(&unsealed) != header.checksum {
        return Err(SnapshotError::HeaderChecksum);
    }
    if header.reserved_a != [0; 2] || !bytes_all_zero(&copy[SNAPSHOT_FILE_HEADER_BYTES..]) {
        return Err(SnapshotError::ReservedNotZero);
    }
    Ok(SnapshotMeta {
        cluster_id: header.cluster_id,
        shard: header.shard,
        op: header.op,
        snapshot_bytes: header.snapshot_bytes,
        checkpoint_checksum: header.checkpoint_checksum,
        snapshot_checksum: header.snapshot_checksum,
        digest: header.digest,
    })
}

/// Verifies a whole snapshot file's bytes against the superblock's checkpoint: the header,
/// that it is that checkpoint's (cluster, shard, op, chain value, snapshot checksum), and
/// the snapshot bytes' checksum. Returns the header and the snapshot bytes (unpadded).
/// Never panics.
pub fn verify_snapshot<'a>(
    file: &'a [u8],
    superblock: &Superblock,
) -> Result<(SnapshotMeta, &'a [u8]), SnapshotError> {
    let meta = decode_snapshot_header(file)?;
    let checkpoint = &superblock.checkpoint;
    if meta.op != checkpoint.op
        || meta.checkpoint_checksum != checkpoint.checksum
        || meta.snapshot_checksum != superblock.snapshot_checksum
        || meta.shard != superblock.shard
        || meta.cluster_id != superblock.cluster_id
    {
        return Err(SnapshotError::NotTheCheckpoint {
            op_found: meta.op,
            op_expected: checkpoint.op,
            checkpoint_checksum_found: meta.checkpoint_checksum,
            checkpoint_checksum_expected: checkpoint.checksum,
        });
    }
    let body_end = (SNAPSHOT_HEADER_BYTES as u64).saturating_add(meta.snapshot_bytes);
    let Some(body) = usize::try_from(body_end)
        .ok()
        .and_then(|end| file.get(SNAPSHOT_HEADER_BYTES..end))
    else {
        return Err(SnapshotError::Truncated {
            bytes: file.len() as u64,
            needed: body_end,
        });
    };
    if journal_checksum(body) != meta.snapshot_checksum {
        return Err(SnapshotError::BodyChecksum);
    }
    Ok((meta, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(op: u64, entry_count: u32) -> EntryMeta {
        EntryMeta {
            shard: 3,
            view: 7,
            op,
            operation: 2,
            entry_count,
            record_bytes: RECORD_BYTES as u32,
            request_count: 0,
        }
    }

    fn body(entry_count: u32, seed: u8) -> Vec<u8> {
        (0..entry_count as usize * RECORD_BYTES)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn header_layout_matches_the_table() {
        assert_eq!(std::mem::offset_of!(EntryHeader, body_bytes), 24);
        assert_eq!(std::mem::offset_of!(EntryHeader, view), 32);
        assert_eq!(std::mem::offset_of!(EntryHeader, op), 40);
        assert_eq!(std::mem::offset_of!(EntryHeader, checksum_body), 48);
        assert_eq!(std::mem::offset_of!(EntryHeader, checksum_previous), 64);
        assert_eq!(std::mem::offset_of!(EntryHeader, checksum_header), 80);
        assert_eq!(std::mem::offset_of!(EntryHeader, reserved_b), 96);
        assert_eq!(std::mem::offset_of!(SuperblockHeader, cluster_id), 80);
        assert_eq!(
            std::mem::offset_of!(SuperblockHeader, snapshot_checksum),
            112
        );
        assert_eq!(
            std::mem::offset_of!(SuperblockHeader, checkpoint_previous_checksum),
            144
        );
        assert_eq!(std::mem::offset_of!(SuperblockHeader, log_view), 160);
        assert_eq!(std::mem::offset_of!(SuperblockHeader, commit_max), 168);
        assert_eq!(std::mem::offset_of!(SuperblockHeader, settings_digest), 176);
        assert_eq!(std::mem::offset_of!(SuperblockHeader, reserved_b), 184);
        assert_eq!(std::mem::offset_of!(SnapshotFileHeader, digest), 80);
        assert_eq!(
            std::mem::offset_of!(SuperblockHeader, checksum),
            SUPERBLOCK_CHECKSUM_OFFSET
        );
    }

    /// Sizes whose implied body overflows 64 bits, under a valid header checksum (what a
    /// buggy or hostile writer could seal), are invalid, not a panic or a wrap.
    #[test]
    fn sizes_that_overflow_are_invalid() {
        let body = body(1, 1);
        let mut buf = vec![0; SECTOR_BYTES];
        encode_entry(&mut buf, &meta(5, 1), &body, 99);
        let mut header: EntryHeader = bytemuck::pod_read_unaligned(&buf[..ENTRY_HEADER_BYTES]);
        header.entry_count = u32::MAX;
        header.record_bytes = u32::MAX;
        header.request_count = 1 << 28;
        header.body_bytes = 1;
        header.checksum_header = entry_header_checksum(&header);
        buf[..ENTRY_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
        assert!(matches!(
            decode_entry_header(&buf, usize::MAX),
            Err(EntryError::SizeInvalid { .. })
        ));
        assert!(matches!(
            decode_entry(&buf, usize::MAX),
            Err(EntryError::SizeInvalid { .. })
        ));
    }

    #[test]
    fn padded_sizes() {
        assert_eq!(entry_bytes_padded(0), SECTOR_BYTES);
        assert_eq!(
            entry_bytes_padded(SECTOR_BYTES - ENTRY_HEADER_BYTES),
            SECTOR_BYTES
        );
        assert_eq!(
            entry_bytes_padded(SECTOR_BYTES - ENTRY_HEADER_BYTES + 1),
            2 * SECTOR_BYTES
        );
    }

    #[test]
    fn round_trip_and_chain_value() {
        let body = body(3, 1);
        let mut buf = vec![0xAA; 2 * SECTOR_BYTES];
        let (written, checksum) = encode_entry(&mut buf, &meta(5, 3), &body, 99);
        assert_eq!(written, SECTOR_BYTES);
        assert!(
            buf[ENTRY_HEADER_BYTES + body.len()..written]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(buf[written], 0xAA, "nothing written past the padding");
        let entry = decode_entry(&buf, body.len()).unwrap();
        assert_eq!(entry.meta, meta(5, 3));
        assert_eq!(entry.body, &body[..]);
        assert_eq!(entry.checksum, checksum);
        assert_eq!(entry.checksum_previous, 99);
        assert_eq!(entry.padded_bytes, written);
        assert_eq!(
            decode_entry(&buf, body.len() - 1),
            Err(EntryError::TooLarge {
                body_bytes: body.len() as u32,
                max: body.len() - 1
            })
        );
        // The chain value commits to checksum_previous.
        let (_, checksum_other) = encode_entry(&mut buf, &meta(5, 3), &body, 98);
        assert_ne!(checksum, checksum_other);
    }

    #[test]
    fn empty_body_round_trips() {
        let mut buf = vec![0; SECTOR_BYTES];
        let meta = EntryMeta {
            entry_count: 0,
            ..meta(1, 0)
        };
        let (written, _) = encode_entry(&mut buf, &meta, &[], JOURNAL_CHAIN_ROOT);
        assert_eq!(written, SECTOR_BYTES);
        assert_eq!(decode_entry(&buf, 0).unwrap().body, &[] as &[u8]);
    }

    #[test]
    #[should_panic(expected = "entry_count * record_bytes")]
    fn encode_refuses_a_body_of_the_wrong_size() {
        let mut buf = vec![0; SECTOR_BYTES];
        encode_entry(&mut buf, &meta(1, 2), &body(1, 0), 0);
    }

    #[test]
    fn every_header_bit_flip_is_detected() {
        let body = body(2, 9);
        let mut buf = vec![0; SECTOR_BYTES];
        encode_entry(&mut buf, &meta(1, 2), &body, 0);
        for bit in 0..ENTRY_HEADER_BYTES * 8 {
            buf[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_entry(&buf, body.len()).is_err(), "bit {bit}");
            buf[bit / 8] ^= 1 << (bit % 8);
        }
        assert!(decode_entry(&buf, body.len()).is_ok());
    }

    #[test]
    fn scan_of_an_empty_region_is_clean() {
        let outcome = scan(&[], 8192, 4, 77, 1 << 20, |_, _| panic!("no entries"));
        assert_eq!(
            outcome,
            ScanOutcome {
                entries: 0,
                end_offset: 8192,
                op_last: 3,
                checksum_last: 77,
                tail: Tail::Clean
            }
        );
    }

    #[test]
    fn superblock_round_trip() {
        let superblock = Superblock {
            cluster_id: 0x1234_5678_9abc_def0_0fed_cba9_8765_4321,
            shard: 2,
            sequence: 11,
            view: 3,
            log_view: 2,
            commit_max: 1200,
            op_durable: 1000,
            checkpoint: Checkpoint {
                op: 900,
                segment: 1,
                offset: 40960,
                checksum: u128::MAX - 5,
            },
            snapshot_checksum: 77,
            checkpoint_previous: Checkpoint {
                op: 800,
                segment: 1,
                offset: 4096,
                checksum: 5,
            },
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            replacing: true,
            settings_digest: 0x000f_edcb_a987_6543,
        };
        let mut buf = [0u8; SUPERBLOCK_BYTES];
        encode_superblock(&superblock, &mut buf);
        assert_eq!(decode_superblock(&buf), Ok(superblock));
        let cleared = Superblock {
            replacing: false,
            ..superblock
        };
        let mut cleared_buf = [0u8; SUPERBLOCK_BYTES];
        encode_superblock(&cleared, &mut cleared_buf);
        assert_eq!(decode_superblock(&cleared_buf), Ok(cleared));
        assert_eq!(cleared_buf[10] | 1, buf[10], "the flag is bit 0 of byte 10");
        assert_eq!(superblock_latest(&[0; 4096], &buf), Ok(superblock));
        assert!(
            matches!(
                superblock_latest(&buf, &[0; 4096]),
                Err(SuperblockError::NoValidCopy { .. })
            ),
            "sequence 11 is misplaced in slot 0"
        );
        // Every bit of the header is covered by the checksum.
        for bit in 0..SUPERBLOCK_HEADER_BYTES * 8 {
            buf[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_superblock(&buf).is_err(), "bit {bit}");
            buf[bit / 8] ^= 1 << (bit % 8);
        }
    }

    #[test]
    fn superblocks_of_older_versions_are_refused() {
        for version in [1u16, 2] {
            let mut buf = [0u8; SUPERBLOCK_BYTES];
            buf[..8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
            buf[8..10].copy_from_slice(&version.to_le_bytes());
            assert_eq!(
                decode_superblock(&buf),
                Err(SuperblockError::UnsupportedVersion { version })
            );
        }
    }

    #[test]
    fn snapshot_header_round_trip_and_verification() {
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let meta = SnapshotMeta {
            cluster_id: 9,
            shard: 1,
            op: 64,
            snapshot_bytes: body.len() as u64,
            checkpoint_checksum: 1234,
            snapshot_checksum: journal_checksum(&body),
            digest: [7; 32],
        };
        let mut file = vec![0u8; meta.file_bytes() as usize];
        let header: &mut [u8; SNAPSHOT_HEADER_BYTES] =
            (&mut file[..SNAPSHOT_HEADER_BYTES]).try_into().unwrap();
        encode_snapshot_header(&meta, header);
        file[SNAPSHOT_HEADER_BYTES..SNAPSHOT_HEADER_BYTES + body.len()].copy_from_slice(&body);
        let superblock = Superblock {
            cluster_id: 9,
            shard: 1,
            sequence: 3,
            view: 0,
            log_view: 0,
            commit_max: 0,
            op_durable: 70,
            checkpoint: Checkpoint {
                op: 64,
                segment: 0,
                offset: 8192,
                checksum: 1234,
            },
            snapshot_checksum: meta.snapshot_checksum,
            checkpoint_previous: Checkpoint::ROOT,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            replacing: false,
            settings_digest: 0,
        };
        let (decoded, bytes) = verify_snapshot(&file, &superblock).unwrap();
        assert_eq!(decoded, meta);
        assert_eq!(bytes, &body[..]);
        file[SNAPSHOT_HEADER_BYTES + 5] ^= 1;
        assert_eq!(
            verify_snapshot(&file, &superblock),
            Err(SnapshotError::BodyChecksum)
        );
        file[SNAPSHOT_HEADER_BYTES + 5] ^= 1;
        file[20] ^= 1;
        assert_eq!(
            verify_snapshot(&file, &superblock),
            Err(SnapshotError::HeaderChecksum)
        );
        file[20] ^= 1;
        let other = Superblock {
            checkpoint: Checkpoint {
                op: 72,
                ..superblock.checkpoint
            },
            ..superblock
        };
        assert!(matches!(
            verify_snapshot(&file, &other),
            Err(SnapshotError::NotTheCheckpoint { op_found: 64, .. })
        ));
        assert!(matches!(
            verify_snapshot(&file[..file.len() - SECTOR_BYTES * 2], &superblock),
            Err(SnapshotError::Truncated { .. })
        ));
        assert_eq!(parse_snapshot_name(&snapshot_file_name(64)), Some(64));
        assert_eq!(parse_snapshot_name("snapshot-64.state"), None);
        assert_eq!(
            parse_snapshot_name(&format!("{}.tmp", snapshot_file_name(64))),
            None
        );
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(0), "segment-00000000.journal");
        assert_eq!(segment_file_name(123_456_789), "segment-123456789.journal");
        for index in [0, 1, 99_999_999, 100_000_000, u64::MAX] {
            assert_eq!(parse_segment_name(&segment_file_name(index)), Some(index));
        }
        for name in [
            "segment-1.journal",
            "segment-000000001.journal",
            "segment-0000000a.journal",
            "segment-+0000001.journal",
            "segment-00000001.journal.tmp",
            "xsegment-00000001.journal",
            "segment-99999999999999999999.journal",
            "",
        ] {
            assert_eq!(parse_segment_name(name), None, "{name}");
        }
    }
}
