//! The prepared certificate log of one BFT shard (`<data-dir>/bft-prepared-<k>/`).
//!
//! A replica makes each prepared certificate durable before its Commit for the op leaves
//! ([`Action::PersistPrepared`](percore_engine::bft::Action::PersistPrepared)); after a
//! crash [`PreparedLog::open`] hands them back to
//! [`BftReplica::restore`](percore_engine::bft::BftReplica::restore), so the replica's
//! ViewChanges report them as if it had never crashed and a crash of a correct replica does
//! not count against `f` (`docs/bft.md` §7, §12).
//!
//! The log is a sequence of segment files `<sequence>.prepared` (20 digits). Its task
//! (`bft::prepared_loop`) appends one frame per write, holding every certificate the core
//! asked for since the previous write, with one O_DIRECT write and one `fdatasync`: one
//! write covers many Commits. A frame is
//!
//! ```text
//! magic "PCBFTPR1" | group u32 | replica u8 | 0 u8 * 3 | body_bytes u32 | count u32
//!   | blake3(header before it | body) [32] | body | zeros to the next sector
//! body = (length u32 | codec::encode_prepared)*
//! ```
//!
//! A frame torn by a crash fails its checksum and ends the segment's reading (its Commits
//! never left: they wait for the write). Disk use is bounded: a new segment starts once the
//! current one holds [`PREPARED_SEGMENT_BYTES`] or only certificates at or below the
//! durable stable checkpoint, and a segment whose certificates are all at or below it is
//! removed (the core keeps nothing below its low watermark, `restore` ignores them).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use glommio::io::{Directory, DmaFile, OpenOptions};
use percore_engine::bft::{PreparedEntry, codec};
use percore_engine::journal::SECTOR_BYTES;

use crate::journal::FsyncPolicy;

/// First bytes of a frame.
pub const PREPARED_FRAME_MAGIC: [u8; 8] = *b"PCBFTPR1";
/// Bytes of a frame header: magic, group, replica and padding, body bytes, count, checksum.
pub const PREPARED_HEADER_BYTES: usize = 8 + 4 + 4 + 4 + 4 + 32;
/// A segment takes frames until it holds this many bytes; then the next one starts.
pub const PREPARED_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Segments kept at once: the certificates above the stable checkpoint fit in a few of
/// them, and past this bound the oldest is removed only once it is below the checkpoint
/// (the bound is checked, not enforced by dropping certificates).
pub const PREPARED_SEGMENTS_MAX: usize = 64;

/// Why the log cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PreparedLogError {
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An intact frame names another group or replica, or holds an undecodable entry.
    #[error("{path}: {reason}")]
    Invalid {
        /// The segment.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

fn io_error(path: &Path, source: impl Into<std::io::Error>) -> PreparedLogError {
    PreparedLogError::Io {
        path: path.to_path_buf(),
        source: source.into(),
    }
}

/// One segment: its sequence number and the highest op of a certificate in it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    sequence: u64,
    op_max: u64,
}

/// The open log of one shard; the guard task owns it.
pub struct PreparedLog {
    dir: PathBuf,
    group: u32,
    replica: u8,
    fsync: FsyncPolicy,
    /// Oldest first; the last is written to.
    segments: VecDeque<Segment>,
    /// The segment written to and where its next frame goes (`None`: none open yet).
    file: Option<(DmaFile, u64)>,
    /// A frame being built.
    frame: Vec<u8>,
}

impl std::fmt::Debug for PreparedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedLog")
            .field("dir", &self.dir)
            .field("segments", &self.segments)
            .finish_non_exhaustive()
    }
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{sequence:020}.prepared"))
}

/// Encodes a frame of `entries` into `frame` (cleared first), padded to a sector.
pub fn frame_encode(group: u32, replica: u8, entries: &[PreparedEntry], frame: &mut Vec<u8>) {
    frame.clear();
    frame.resize(PREPARED_HEADER_BYTES, 0);
    for entry in entries {
        let start = frame.len();
        frame.extend_from_slice(&[0; 4]);
        codec::encode_prepared(entry, frame);
        let length = (frame.len() - start - 4) as u32;
        frame[start..start + 4].copy_from_slice(&length.to_le_bytes());
    }
    let body_bytes = (frame.len() - PREPARED_HEADER_BYTES) as u32;
    frame[..8].copy_from_slice(&PREPARED_FRAME_MAGIC);
    frame[8..12].copy_from_slice(&group.to_le_bytes());
    frame[12] = replica;
    frame[16..20].copy_from_slice(&body_bytes.to_le_bytes());
    frame[20..24].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    let checksum = frame_checksum(frame);
    frame[24..PREPARED_HEADER_BYTES].copy_from_slice(&checksum);
    frame.resize(frame.len().next_multiple_of(SECTOR_BYTES), 0);
}

fn frame_checksum(frame: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&frame[..24]);
    hasher.update(&frame[PREPARED_HEADER_BYTES..]);
    *hasher.finalize().as_bytes()
}

/// Decodes the frames at the start of `bytes` (a segment's contents) into `entries`, up to
/// the first that is not intact (never written, or torn by a crash).
pub fn segment_decode(
    bytes: &[u8],
    group: u32,
    replica: u8,
    entries: &mut Vec<PreparedEntry>,
) -> Result<(), &'static str> {
    let mut offset = 0;
    while bytes.len() - offset >= PREPARED_HEADER_BYTES {
        let header = &bytes[offset..offset + PREPARED_HEADER_BYTES];
        if header[..8] != PREPARED_FRAME_MAGIC {
            return Ok(());
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        let body_bytes = word(16) as usize;
        let count = word(20) as usize;
        let end = offset + PREPARED_HEADER_BYTES + body_bytes;
        if end > bytes.len() {
            return Ok(());
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header[..24]);
        hasher.update(&bytes[offset + PREPARED_HEADER_BYTES..end]);
        if hasher.finalize().as_bytes() != &header[24..PREPARED_HEADER_BYTES] {
            return Ok(());
        }
        if word(8) != group || header[12] != replica {
            return Err("a frame of another group or replica");
        }
        let mut body = &bytes[offset + PREPARED_HEADER_BYTES..end];
        for _ in 0..count {
            if body.len() < 4 {
                return Err("a frame shorter than its entries");
            }
            let length = u32::from_le_bytes(body[..4].try_into().expect("4")) as usize;
            let Some(encoded) = body.get(4..4 + length) else {
                return Err("a frame shorter than its entries");
            };
            let (entry, read) =
                codec::decode_prepared(encoded).map_err(|_| "an undecodable entry")?;
            if read != length {
                return Err("an entry longer than it says");
            }
            entries.push(entry);
            body = &body[4 + length..];
        }
        offset = end.next_multiple_of(SECTOR_BYTES);
    }
    Ok(())
}

impl PreparedLog {
    /// Opens (creating it if needed) the log in `dir` and returns it with every intact
    /// certificate it holds, in write order (the caller's core keeps those above its
    /// checkpoint). Blocking file reads: start-up only.
    pub async fn open(
        dir: &Path,
        group: u32,
        replica: u8,
        fsync: FsyncPolicy,
    ) -> Result<(PreparedLog, Vec<PreparedEntry>), PreparedLogError> {
        std::fs::create_dir_all(dir).map_err(|error| io_error(dir, error))?;
        let mut sequences = Vec::new();
        for item in std::fs::read_dir(dir).map_err(|error| io_error(dir, error))? {
            let item = item.map_err(|error| io_error(dir, error))?;
            let name = item.file_name();
            let Some(sequence) = name
                .to_str()
                .and_then(|name| name.strip_suffix(".prepared"))
                .and_then(|stem| stem.parse::<u64>().ok())
            else {
                continue;
            };
            sequences.push(sequence);
        }
        sequences.sort_unstable();
        let mut entries = Vec::new();
        let mut segments = VecDeque::with_capacity(PREPARED_SEGMENTS_MAX);
        for sequence in sequences {
            let path = segment_path(dir, sequence);
            let bytes = std::fs::read(&path).map_err(|error| io_error(&path, error))?;
            let first = entries.len();
            segment_decode(&bytes, group, replica, &mut entries)
                .map_err(|reason| PreparedLogError::Invalid { path, reason })?;
            let op_max = entries[first..]
                .iter()
                .map(|entry: &PreparedEntry| entry.cert.pre_prepare.op)
                .max()
                .unwrap_or(0);
            segments.push_back(Segment { sequence, op_max });
        }
        let log = PreparedLog {
            dir: dir.to_path_buf(),
            group,
            replica,
            fsync,
            segments,
            // Writes start in a new segment: the last one may end in a torn frame.
            file: None,
            frame: Vec::with_capacity(SECTOR_BYTES),
        };
        Ok((log, entries))
    }

    /// Makes `entries` durable (one write and one `fdatasync`), after dropping the segments
    /// whose certificates are all at or below `low`, the durable stable checkpoint.
    pub async fn append(
        &mut self,
        entries: &[PreparedEntry],
        low: u64,
    ) -> Result<(), PreparedLogError> {
        debug_assert!(!entries.is_empty());
        let op_max = entries
            .iter()
            .map(|entry| entry.cert.pre_prepare.op)
            .max()
            .unwrap_or(0);
        let current_stale = self.segments.back().is_some_and(|last| last.op_max <= low);
        let current_full = self
            .file
            .as_ref()
            .is_some_and(|(_, offset)| *offset >= PREPARED_SEGMENT_BYTES);
        if self.file.is_none() || current_stale || current_full {
            self.start_segment().await?;
        }
        self.remove_below(low).await?;
        frame_encode(self.group, self.replica, entries, &mut self.frame);
        let (file, offset) = self.file.as_mut().expect("a segment is open");
        let path = segment_path(&self.dir, self.segments.back().expect("open").sequence);
        let mut buffer = file.alloc_dma_buffer(self.frame.len());
        buffer.as_bytes_mut().copy_from_slice(&self.frame);
        let written = file
            .write_at(buffer, *offset)
            .await
            .map_err(|error| io_error(&path, error))?;
        if written != self.frame.len() {
            return Err(io_error(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "short prepared certificate write",
                ),
            ));
        }
        if self.fsync.is_durable() {
            file.fdatasync()
                .await
                .map_err(|error| io_error(&path, error))?;
        }
        *offset += written as u64;
        let last = self.segments.back_mut().expect("open");
        last.op_max = last.op_max.max(op_max);
        Ok(())
    }

    /// Creates the next segment (its directory entry synced) and writes to it from now on.
    async fn start_segment(&mut self) -> Result<(), PreparedLogError> {
        let sequence = self.segments.back().map_or(0, |last| last.sequence + 1);
        let path = segment_path(&self.dir, sequence);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .dma_open(&path)
            .await
            .map_err(|error| io_error(&path, error))?;
        // Written through io_uring: a later process waits out what is in flight at a crash.
        crate::io_fence::hold(&file).map_err(|error| io_error(&path, error))?;
        if self.fsync.is_durable() {
            let directory = Directory::open(&self.dir)
                .await
                .map_err(|error| io_error(&self.dir, error))?;
            directory
                .sync()
                .await
                .map_err(|error| io_error(&self.dir, error))?;
        }
        if let Some((previous, _)) = self.file.take() {
            let _ = previous.close().await;
        }
        self.file = Some((file, 0));
        self.segments.push_back(Segment {
            sequence,
            op_max: 0,
        });
        Ok(())
    }

    /// Removes the segments before the current one whose certificates are all at or below
    /// `low` (oldest first; a crash between removals leaves only stale certificates).
    async fn remove_below(&mut self, low: u64) -> Result<(), PreparedLogError> {
        while self.segments.len() > 1 && self.segments[0].op_max <= low {
            let segment = self.segments.pop_front().expect("two or more");
            let path = segment_path(&self.dir, segment.sequence);
            match glommio::io::remove(&path).await {
                Ok(()) => {}
                Err(error) => {
                    let error = std::io::Error::from(error);
                    if error.kind() != std::io::ErrorKind::NotFound {
                        return Err(io_error(&path, error));
                    }
                }
            }
        }
        if self.segments.len() > PREPARED_SEGMENTS_MAX {
            tracing::warn!(
                dir = %self.dir.display(),
                segments = self.segments.len(),
                "BFT prepared certificate log: more segments than expected above the \
                 stable checkpoint"
            );
        }
        Ok(())
    }

    /// Segments on disk (tests, metrics).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }
}

/// Where `shard`'s log lives, next to its journal directory.
pub fn prepared_dir(journal_dir: &Path, shard: usize) -> PathBuf {
    journal_dir
        .parent()
        .unwrap_or(journal_dir)
        .join(format!("bft-prepared-{shard}"))
}

// A frame header fits the first sector (the reader reads a header before its body).
const _: () = assert!(PREPARED_HEADER_BYTES <= SECTOR_BYTES);

#[cfg(test)]
mod tests {
    use percore_engine::bft::{
        PreparedCert, PreparedEntry, SigningKey, Vote, VoteKind, batch_digest,
    };

    use super::*;

    /// A prepared certificate of `op` in view 0 of group 0 (leader 0, Prepares from 1 and 2).
    fn entry(op: u64, batch: &[u8]) -> PreparedEntry {
        let digest = batch_digest(batch);
        let key = |replica: u8| SigningKey::from_bytes(&[replica + 1; 32]);
        let vote = |kind, replica| Vote::sign(&key(replica), 0, kind, replica, 0, op, digest);
        PreparedEntry {
            cert: PreparedCert {
                pre_prepare: vote(VoteKind::PrePrepare, 0),
                prepares: vec![vote(VoteKind::Prepare, 1), vote(VoteKind::Prepare, 2)],
            },
            batch: batch.to_vec(),
        }
    }

    #[test]
    fn frames_decode_up_to_a_torn_one() {
        let first = vec![entry(1, b"one"), entry(2, b"")];
        let second = vec![entry(3, &[7; 5_000])];
        let mut segment = Vec::new();
        let mut frame = Vec::new();
        for entries in [&first, &second, &first] {
            frame_encode(0, 3, entries, &mut frame);
            assert_eq!(frame.len() % SECTOR_BYTES, 0);
            segment.extend_from_slice(&frame);
        }
        let mut decoded = Vec::new();
        segment_decode(&segment, 0, 3, &mut decoded).unwrap();
        assert_eq!(decoded.len(), 5);
        assert_eq!(decoded[2], second[0]);
        // Tear the last frame: the first two are read back.
        let last = segment.len() - frame.len();
        segment[last + PREPARED_HEADER_BYTES + 10] ^= 1;
        decoded.clear();
        segment_decode(&segment, 0, 3, &mut decoded).unwrap();
        assert_eq!(decoded, [first.clone(), second.clone()].concat());
        // A frame cut short by a crash, and zeros, end the segment too.
        decoded.clear();
        segment_decode(&segment[..last + 100], 0, 3, &mut decoded).unwrap();
        assert_eq!(decoded.len(), 3);
        // An intact frame of another replica is refused.
        assert!(segment_decode(&segment, 0, 2, &mut Vec::new()).is_err());
    }

    #[test]
    fn the_log_reads_back_what_it_wrote_and_drops_segments_below_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("percore-prepared-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inner = dir.clone();
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(move || async move {
                let dir = inner;
                let (mut log, entries) = PreparedLog::open(&dir, 0, 3, FsyncPolicy::Always)
                    .await
                    .unwrap();
                assert!(entries.is_empty());
                log.append(&[entry(1, b"a"), entry(2, b"b")], 0)
                    .await
                    .unwrap();
                log.append(&[entry(3, b"c")], 0).await.unwrap();
                assert_eq!(log.segments(), 1);
                drop(log);
                // A restart reads them back and writes on in a new segment.
                let (mut log, entries) = PreparedLog::open(&dir, 0, 3, FsyncPolicy::Always)
                    .await
                    .unwrap();
                assert_eq!(
                    entries,
                    vec![entry(1, b"a"), entry(2, b"b"), entry(3, b"c")]
                );
                log.append(&[entry(4, b"d")], 2).await.unwrap();
                assert_eq!(log.segments(), 2);
                // The checkpoint passes op 3: the first segment goes; the current one holds
                // only op 4, above it.
                log.append(&[entry(5, b"e")], 3).await.unwrap();
                assert_eq!(log.segments(), 1);
                // The checkpoint passes every op written: the next write starts a segment
                // and the old one goes.
                log.append(&[entry(9, b"i")], 8).await.unwrap();
                assert_eq!(log.segments(), 1);
                drop(log);
                let (_, entries) = PreparedLog::open(&dir, 0, 3, FsyncPolicy::Always)
                    .await
                    .unwrap();
                assert_eq!(entries, vec![entry(9, b"i")]);
            })
            .unwrap()
            .join()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
