//! A simulated journal of one replica of one group: the real entry bytes (`encode_entry`,
//! sector-padded, back to back as in a segment file), a `durable` watermark, one group
//! commit (fsync) in flight at a time, and crash semantics. Recovery runs the real
//! `journal::scan` over the bytes that survived, so a torn or damaged tail is found and cut
//! exactly as the runtime's recovery does.
//!
//! What a crash does to bytes above the durable watermark is a fault choice: lost, a prefix
//! of their sectors kept (a torn write), and optionally garbage in the last kept entry.
//! Bytes at or below the watermark are damaged only by [`Disk::corrupt`] (a fault applied
//! while the replica is down): recovery then finds `Tail::Corrupt`, cuts the journal at the
//! hole, records the promise (`promised`, the runtime's superblock `op_durable`) and the
//! replica starts recovering (`docs/protocol.md` 8).
//!
//! With `--sync on` the disk also keeps the checkpoints its replica took (the state
//! machine's snapshot after a committed op, durable at once) and a retention watermark
//! (`retained_min`): repairs below it are answered `NotRetained`, as the runtime's journal
//! answers once it has removed the segments. The bytes below the watermark stay, so that
//! recovery may replay from op 1 (the same state as restoring the checkpoint and replaying
//! after it) and the checkers may read them. A replica that installs a peer's checkpoint
//! by state sync gets a journal that starts there (`base`): nothing below it is on the disk,
//! and recovery restores the checkpoint and replays what follows.

use std::rc::Rc;

use percore_engine::checksum::Digest256;
use percore_engine::journal::{self, JournalChecksum, SECTOR_BYTES, Tail};

use super::rng::SimRng;

/// `Disk::promised` of a blank disk formatted with `--replace`: its replica may have
/// acknowledged any op.
const PROMISED_REPLACED: u64 = u64::MAX;

/// A checkpoint: the state machine's snapshot once op `op` (whose entry has `checksum`) is
/// applied, and the snapshot's digest (`StateMachine::snapshot_and_digest`).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The last op applied.
    pub op: u64,
    /// Its entry's checksum (the chain value the journal continues from).
    pub checksum: JournalChecksum,
    /// `StateMachine::snapshot` bytes.
    pub snapshot: Rc<[u8]>,
    /// The state machine's digest at `op`.
    pub digest: Digest256,
}

/// What a crash did to the unsynced tail (for the trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashTail {
    /// Nothing was unsynced.
    Nothing,
    /// Every unsynced byte was lost.
    Lost,
    /// The first `sectors` unsynced sectors reached the disk.
    Torn {
        /// Sectors kept.
        sectors: usize,
        /// Whether a kept sector of the last entry was garbled too.
        garbled: bool,
    },
}

/// What recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Last valid op (the new head, all of it durable now).
    pub op_last: u64,
    /// Its checksum (the chain head).
    pub checksum_last: JournalChecksum,
    /// How the scan ended.
    pub tail: Tail,
    /// The replica must start recovering, promising ops up to this one.
    pub recovering: Option<u64>,
}

/// One journal. Entry `op` is at `offsets[op - base - 1]`.
#[derive(Debug)]
pub struct Disk {
    body_bytes_max: usize,
    /// The checkpoint a state sync installed, which the journal starts after
    /// ([`Disk::base`]): nothing at or below its op is in `bytes`.
    base_checkpoint: Option<Checkpoint>,
    /// The latest two checkpoints taken or installed, latest first (`--sync on`).
    checkpoints: [Option<Checkpoint>; 2],
    /// The first op repairs are served from (`--sync on`): what lies below was removed.
    retained_min: u64,
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    lengths: Vec<usize>,
    checksums: Vec<JournalChecksum>,
    op_durable: u64,
    /// The op a group commit in flight will make durable.
    fsync_target: Option<u64>,
    /// The shard (group) every entry belongs to.
    shard: u32,
    /// Recovering: ops up to here may have been acknowledged, and some are missing (the
    /// runtime's superblock `op_durable`, kept while recovering); 0 when none,
    /// [`PROMISED_REPLACED`] while replaced. Survives crashes.
    promised: u64,
    /// Checkers: the checksums of the durable ops after `shadow_base` before the damage,
    /// so that an op a recovering replica promised still counts as held by it (it may not
    /// vote without it).
    shadow: Vec<JournalChecksum>,
    /// The journal's `base` when the shadow was taken: ops at or below it were in a
    /// checkpoint then.
    shadow_base: u64,
}

impl Disk {
    /// An empty journal whose entries' bodies are at most `body_bytes_max` bytes.
    pub fn new(body_bytes_max: usize, shard: u32) -> Disk {
        Disk {
            body_bytes_max,
            base_checkpoint: None,
            checkpoints: [None, None],
            retained_min: 1,
            bytes: Vec::new(),
            offsets: Vec::new(),
            lengths: Vec::new(),
            checksums: Vec::new(),
            op_durable: 0,
            fsync_target: None,
            shard,
            promised: 0,
            shadow: Vec::new(),
            shadow_base: 0,
        }
    }

    /// Fault, while the replica is down: the disk is lost, and a blank one formatted with
    /// `--replace` takes its place. Nothing survives but the mark. For the checkers the
    /// replica still holds what it had durably (the shadow, as after [`Disk::corrupt`]):
    /// it may not vote until it has installed a log that holds it again.
    pub fn replace(&mut self) {
        assert!(self.fsync_target.is_none(), "the replica is down");
        assert_eq!(self.promised, 0, "only an undamaged disk is replaced");
        let shadow = self.checksums[..self.index_end(self.op_durable)].to_vec();
        let shadow_base = self.base();
        *self = Disk::new(self.body_bytes_max, self.shard);
        self.shadow = shadow;
        self.shadow_base = shadow_base;
        self.promised = PROMISED_REPLACED;
    }

    /// Whether the disk is a replacement whose replica has not rebuilt yet (the runtime's
    /// `Superblock::replacing`).
    pub fn replaced(&self) -> bool {
        self.promised == PROMISED_REPLACED
    }

    /// The promise a recovering replica keeps (0: none).
    pub fn promised(&self) -> u64 {
        self.promised
    }

    /// The replica left recovering (repaired, or installed a newer view's log): the
    /// promise is dropped (the runtime's `Journal::promise_release`).
    pub fn promise_release(&mut self) {
        self.promised = 0;
        self.shadow.clear();
    }

    /// Whether the disk holds `op` with `checksum` durably, or held it before damage that
    /// its replica has not repaired yet (checkers: such a replica may not vote).
    /// An op below the journal's base is held in the checkpoint it starts from (committed
    /// state, whose digest was checked when it was installed).
    pub fn holds(&self, op: u64, checksum: JournalChecksum) -> bool {
        self.holds_durably(op, checksum)
            || (self.promised >= op
                && op >= 1
                && (op <= self.shadow_base
                    || self.shadow.get((op - self.shadow_base - 1) as usize) == Some(&checksum)))
    }

    /// Whether the disk holds `op` with `checksum` durably now, in its journal or in the
    /// checkpoint the journal starts from (ops below the base: committed state, whose
    /// digest was checked when it was installed).
    pub fn holds_durably(&self, op: u64, checksum: JournalChecksum) -> bool {
        (self.op_durable >= op && self.checksum(op) == Some(checksum)) || op < self.base()
    }

    /// Fault, while the replica is down: flips bytes inside one durable entry that has a
    /// durable entry after it (damage to the last one reads as a torn write, which only the
    /// superblock watermark of every group commit could tell apart; not modelled). Returns
    /// the damaged op, or `None` if there is no such entry.
    ///
    /// Only an entry above the latest checkpoint is damaged: recovery restores that
    /// checkpoint and reads only what follows it (what lies below is kept for peers, and
    /// read back, checked, only to serve them).
    pub fn corrupt(&mut self, rng: &mut SimRng) -> Option<u64> {
        assert!(self.fsync_target.is_none(), "the replica is down");
        let low = self.base().max(self.checkpoint_op()) + 1;
        if self.op_durable < low + 1 {
            return None;
        }
        let op = low + rng.below(self.op_durable - low);
        let index = self.index(op);
        let byte = self.offsets[index] + rng.below(self.lengths[index] as u64) as usize;
        self.bytes[byte] ^= 1 + rng.below(255) as u8;
        if self.shadow_base != self.base() || self.shadow.len() < self.index_end(self.op_durable) {
            self.shadow = self.checksums[..self.index_end(self.op_durable)].to_vec();
            self.shadow_base = self.base();
        }
        Some(op)
    }

    /// Highest op written (staged or durable).
    pub fn op_head(&self) -> u64 {
        self.base() + self.checksums.len() as u64
    }

    /// Highest op made durable.
    pub fn op_durable(&self) -> u64 {
        self.op_durable
    }

    /// Checksum of `op` (the chain root for 0), if written.
    pub fn checksum(&self, op: u64) -> Option<JournalChecksum> {
        if op == 0 {
            return Some(journal::JOURNAL_CHAIN_ROOT);
        }
        if op == self.base() {
            return self
                .base_checkpoint
                .as_ref()
                .map(|checkpoint| checkpoint.checksum);
        }
        if op < self.base() {
            return None;
        }
        self.checksums.get(self.index(op)).copied()
    }

    /// The chain head: what the next entry must chain to.
    pub fn checksum_head(&self) -> JournalChecksum {
        self.checksum(self.op_head()).expect("head is written")
    }

    /// The entry bytes of `op` (header and body, unpadded).
    pub fn entry(&self, op: u64) -> Option<&[u8]> {
        if op <= self.base() {
            return None;
        }
        let index = self.index(op);
        let offset = *self.offsets.get(index)?;
        Some(&self.bytes[offset..offset + self.lengths[index]])
    }

    /// Appends an encoded entry (`entry`: header and body, `padded` bytes on disk) for the
    /// next op, after checking the chain as the real journal does. `Err` if it does not
    /// continue the log (wrong op or chain): the caller refuses the entry.
    pub fn stage(&mut self, entry: &[u8], padded: usize) -> Result<JournalChecksum, String> {
        let decoded = journal::decode_entry(entry, entry.len()).map_err(|e| e.to_string())?;
        if decoded.meta.op != self.op_head() + 1 {
            return Err(format!(
                "op {} does not follow head {}",
                decoded.meta.op,
                self.op_head()
            ));
        }
        if decoded.checksum_previous != self.checksum_head() {
            return Err(format!("op {} does not chain to the head", decoded.meta.op));
        }
        debug_assert!(padded >= entry.len() && padded.is_multiple_of(SECTOR_BYTES));
        let offset = self.bytes.len();
        self.bytes.extend_from_slice(entry);
        self.bytes.resize(offset + padded, 0);
        self.offsets.push(offset);
        self.lengths.push(entry.len());
        self.checksums.push(decoded.checksum);
        Ok(decoded.checksum)
    }

    /// Whether a group commit is in flight.
    pub fn fsync_busy(&self) -> bool {
        self.fsync_target.is_some()
    }

    /// Whether anything staged is not durable yet.
    pub fn has_unsynced(&self) -> bool {
        self.op_head() > self.op_durable
    }

    /// Starts a group commit of everything staged so far; returns the op it covers.
    pub fn fsync_start(&mut self) -> u64 {
        assert!(self.fsync_target.is_none(), "one group commit at a time");
        let target = self.op_head();
        self.fsync_target = Some(target);
        target
    }

    /// The group commit finished: everything up to its target is durable.
    pub fn fsync_done(&mut self) -> u64 {
        let target = self.fsync_target.take().expect("a group commit in flight");
        assert!(target >= self.op_durable && target <= self.op_head());
        self.op_durable = target;
        if self.promised > 0 && target >= self.promised {
            self.promise_release();
        }
        target
    }

    /// The process died: decides what the unsynced tail leaves on the platter. With
    /// `faults`, a prefix of its sectors may survive and the last kept entry may be garbled.
    pub fn crash(&mut self, rng: &mut SimRng, faults: bool) -> CrashTail {
        self.fsync_target = None;
        let durable_end = self.end_of(self.op_durable);
        let unsynced = self.bytes.len() - durable_end;
        if unsynced == 0 {
            return CrashTail::Nothing;
        }
        if !faults || rng.chance(400_000) {
            self.bytes.truncate(durable_end);
            self.forget_above(self.op_durable);
            return CrashTail::Lost;
        }
        let sectors = rng.below((unsynced / SECTOR_BYTES) as u64 + 1) as usize;
        let kept_end = durable_end + sectors * SECTOR_BYTES;
        self.bytes.truncate(kept_end);
        let garbled = sectors > 0 && rng.chance(300_000);
        if garbled {
            // Garbage in the last sector kept: it lies in the last (possibly partial) entry,
            // so no valid history follows it and the scan must call it torn.
            let sector = kept_end - SECTOR_BYTES;
            let byte = sector + rng.below(SECTOR_BYTES as u64) as usize;
            self.bytes[byte] ^= 1 + rng.below(255) as u8;
        }
        // What survived is what the scanner accepts: rebuild the index from the bytes now,
        // so that checkers see the platter, not the lost page cache.
        self.recover(|_, _, _, _| {});
        CrashTail::Torn { sectors, garbled }
    }

    /// View change: removes every entry above `op` (durably: the runtime's `truncate_after`
    /// syncs before it returns) and returns the new chain head. Nothing may be unsynced.
    pub fn truncate(&mut self, op: u64) -> JournalChecksum {
        assert!(self.fsync_target.is_none(), "no group commit in flight");
        assert!(op <= self.op_head(), "truncate below the head");
        assert!(op >= self.base(), "a checkpoint is never truncated");
        let end = self.end_of(op);
        self.bytes.truncate(end);
        self.forget_above(op);
        self.op_durable = self.op_durable.min(op);
        self.checksum_head()
    }

    /// `(op, checksum)` of the last `count` entries, oldest first (what the runtime hands a
    /// restarted replica core).
    pub fn recent_checksums(&self, count: usize) -> Vec<(u64, JournalChecksum)> {
        let start = self.checksums.len().saturating_sub(count);
        self.checksums[start..]
            .iter()
            .enumerate()
            .map(|(index, checksum)| (self.base() + (start + index + 1) as u64, *checksum))
            .collect()
    }

    /// Restart: scans the surviving bytes with the real scanner, cuts them at the end of
    /// valid history, and makes what remains durable (the runtime's recovery does the same:
    /// a recovered journal is on disk). Calls `replay` for every valid entry, in order.
    pub fn recover(&mut self, mut replay: impl FnMut(u64, u16, &[u8], &[u8])) -> Recovered {
        self.offsets.clear();
        self.lengths.clear();
        self.checksums.clear();
        let mut found: Vec<(usize, usize, JournalChecksum)> = Vec::new();
        let checksum_base = self.checksum(self.base()).expect("the base is known");
        let outcome = journal::scan(
            &self.bytes,
            0,
            self.base() + 1,
            checksum_base,
            self.body_bytes_max,
            |entry, offset| {
                found.push((
                    offset as usize,
                    journal::ENTRY_HEADER_BYTES + entry.body.len(),
                    entry.checksum,
                ));
                replay(
                    entry.meta.op,
                    entry.meta.operation,
                    entry.records(),
                    entry.requests(),
                );
            },
        );
        for (offset, length, checksum) in found {
            self.offsets.push(offset);
            self.lengths.push(length);
            self.checksums.push(checksum);
        }
        if let Tail::Corrupt { op_expected, .. } = outcome.tail {
            // What lies after the hole was durable once: this replica may have acknowledged
            // it. The promise is recorded (the runtime writes the superblock) before the
            // journal is cut at the hole, as a view-change truncation cuts it.
            let after = &self.bytes[outcome.end_offset as usize..];
            let op_after =
                journal::op_max_after(after, self.shard, op_expected, self.body_bytes_max);
            self.promised = self.promised.max(op_after.unwrap_or(op_expected));
        }
        self.bytes.truncate(outcome.end_offset as usize);
        self.op_durable = outcome.op_last;
        self.fsync_target = None;
        let replaced = self.replaced();
        let recovering = (self.promised > outcome.op_last && !replaced).then_some(self.promised);
        if recovering.is_none() && !replaced {
            self.promise_release();
        }
        Recovered {
            op_last: outcome.op_last,
            checksum_last: outcome.checksum_last,
            tail: outcome.tail,
            recovering,
        }
    }

    /// Byte offset just past entry `op` (0 for the base).
    fn end_of(&self, op: u64) -> usize {
        if op <= self.base() {
            return 0;
        }
        self.offsets
            .get(self.index_end(op))
            .copied()
            .unwrap_or(self.bytes.len())
    }

    fn forget_above(&mut self, op: u64) {
        let end = self.index_end(op);
        self.offsets.truncate(end);
        self.lengths.truncate(end);
        self.checksums.truncate(end);
    }

    /// Index of entry `op` (above the base) in `offsets`, `lengths` and `checksums`.
    fn index(&self, op: u64) -> usize {
        debug_assert!(op > self.base());
        (op - self.base() - 1) as usize
    }

    /// Number of indexed entries up to `op` (at or above the base).
    fn index_end(&self, op: u64) -> usize {
        (op - self.base()) as usize
    }

    // ---------------------------------------------------------------------------------
    // Checkpoints, retention and state sync (`--sync on`).

    /// The latest checkpoint's op (0: none).
    pub fn checkpoint_op(&self) -> u64 {
        self.checkpoints[0]
            .as_ref()
            .map_or(0, |checkpoint| checkpoint.op)
    }

    /// The checkpoint at `op`, if it is one of the two kept.
    pub fn checkpoint(&self, op: u64) -> Option<&Checkpoint> {
        self.checkpoints
            .iter()
            .flatten()
            .find(|checkpoint| checkpoint.op == op)
    }

    /// The op the journal starts after: 0, or the op of the checkpoint a state sync
    /// installed.
    pub fn base(&self) -> u64 {
        self.base_checkpoint
            .as_ref()
            .map_or(0, |checkpoint| checkpoint.op)
    }

    /// The checkpoint the journal starts from, if a state sync installed one.
    pub fn base_checkpoint(&self) -> Option<&Checkpoint> {
        self.base_checkpoint.as_ref()
    }

    /// The first op served to peers.
    pub fn retained_min(&self) -> u64 {
        self.retained_min
    }

    /// A checkpoint was taken (written durably at once: the runtime's checkpoint record
    /// is a superblock write; a crash before it only leaves an older checkpoint, which
    /// this model does not draw). Its op is applied, so committed and durable.
    pub fn checkpoint_take(&mut self, checkpoint: Checkpoint) {
        assert!(
            checkpoint.op > self.checkpoint_op(),
            "checkpoints move forward"
        );
        assert!(checkpoint.op <= self.op_durable, "an applied op is durable");
        assert_eq!(self.checksum(checkpoint.op), Some(checkpoint.checksum));
        self.checkpoints[1] = self.checkpoints[0].take();
        self.checkpoints[0] = Some(checkpoint);
    }

    /// After a checkpoint: what the journal keeps (the runtime's `retain_from_op`). Peers
    /// still need the ops from `peers_next_min` (the lowest next op a peer lacks, reported
    /// durable heads), but never more than `retain_ops` below the previous checkpoint; the
    /// runtime removes the segments holding only ops at or below the previous checkpoint
    /// and below that.
    pub fn retain_from(&mut self, peers_next_min: u64, retain_ops: u64) {
        let previous = self.checkpoints[1]
            .as_ref()
            .map_or(0, |checkpoint| checkpoint.op);
        let floor = (previous + 1).saturating_sub(retain_ops);
        let retained_min = peers_next_min.max(floor).min(previous + 1);
        self.retained_min = self.retained_min.max(retained_min);
    }

    /// State sync: the journal is switched to `checkpoint` (the runtime's
    /// `install_synced_checkpoint`, one superblock write): nothing before or after it is
    /// kept, and it is the only checkpoint. The promise of a recovering replica stays.
    pub fn install_checkpoint(&mut self, checkpoint: Checkpoint) {
        assert!(self.fsync_target.is_none(), "no group commit in flight");
        assert!(
            checkpoint.op > self.op_head(),
            "a sync only moves the log forward"
        );
        self.bytes.clear();
        self.offsets.clear();
        self.lengths.clear();
        self.checksums.clear();
        self.op_durable = checkpoint.op;
        self.retained_min = checkpoint.op + 1;
        self.checkpoints = [Some(checkpoint.clone()), None];
        self.base_checkpoint = Some(checkpoint);
    }
}
