//! The wire encoding of BFT [`Message`]s (phase 2): what a replica puts in the body of a
//! `Command::Bft` peer frame, and the decoder that turns such a body back into a message.
//!
//! The encoding is little-endian and length-prefixed, with every count bounded by a named
//! limit before anything is allocated; the decoder never panics on bytes from the network
//! and refuses trailing bytes, unknown tags and vote kinds. Decoding checks only the shape:
//! signatures, certificates and digests are the replica core's business
//! ([`crate::bft::BftReplica::on_message`]). Nothing here performs I/O or keeps state.
//!
//! ```text
//! message    = tag u8 | fields
//! vote       = kind u8 | replica u8 | view u64 | op u64 | digest [32] | signature [64]
//! bytes      = length u32 | bytes
//! votes      = count u8 (<= REPLICA_COUNT_MAX) | vote*
//! checkpoint = votes                      option<x> = 0 | 1 x
//! prepared   = vote (PrePrepare) | votes (Prepares)
//! view change= vote | option<checkpoint> | count u16 (<= LOG_WINDOW_OPS_LIMIT) | (prepared | bytes)*
//! state ops  = count u16 (<= LOG_WINDOW_OPS_LIMIT) | (votes | bytes)*
//! statement  = op u64 | chain [32] | journal op u64 | state digest [32]
//! state vote = vote (StateCheckpoint) | statement
//! state cert = statement | votes
//! snapshot request = journal op u64 | offset u64
//! snapshot chunk   = journal op u64 | offset u64 | file bytes u64 | bytes (<= SNAPSHOT_CHUNK_BYTES_MAX)
//! ```
//!
//! [`view_change_bytes_max`] bounds the two messages whose size grows with the log window
//! (ViewChange and NewView), so that a driver can size its frames to carry them.

use ed25519_dalek::Signature;

use super::message::{
    CheckpointCert, CommitCert, Message, NewView, PreparedCert, PreparedEntry, SnapshotStatement,
    StateCert, ViewChange, Vote, VoteKind, quorum_of,
};
use super::{LOG_WINDOW_OPS_LIMIT, REPLICA_COUNT_MAX};

/// Bytes of one encoded [`Vote`].
pub const VOTE_BYTES: usize = 1 + 1 + 8 + 8 + 32 + 64;
/// Bytes of a message's tag.
const TAG_BYTES: usize = 1;
/// Bytes of a count bounded by [`REPLICA_COUNT_MAX`] (votes, view changes).
const COUNT_U8_BYTES: usize = 1;
/// Bytes of a count bounded by [`LOG_WINDOW_OPS_LIMIT`] (prepared entries, proposals).
const COUNT_U16_BYTES: usize = 2;
/// Bytes of an option flag.
const FLAG_BYTES: usize = 1;
/// Bytes of the length before a `bytes` field.
const LENGTH_BYTES: usize = 4;
/// Bytes of a view, op or offset.
const U64_BYTES: usize = 8;

/// Message tags, in wire order.
const TAG_PRE_PREPARE: u8 = 1;
const TAG_PREPARE: u8 = 2;
const TAG_COMMIT: u8 = 3;
const TAG_CHECKPOINT: u8 = 4;
const TAG_VIEW_CHANGE: u8 = 5;
const TAG_NEW_VIEW: u8 = 6;
const TAG_STATUS: u8 = 7;
const TAG_COMMIT_PROOF: u8 = 8;
const TAG_CHECKPOINT_PROOF: u8 = 9;
const TAG_STATE_REQUEST: u8 = 10;
const TAG_STATE_OPS: u8 = 11;
const TAG_STATE_CHECKPOINT: u8 = 12;
const TAG_STATE_SNAPSHOT: u8 = 13;
const TAG_SNAPSHOT_REQUEST: u8 = 14;
const TAG_SNAPSHOT_CHUNK: u8 = 15;

/// Bytes of one encoded [`SnapshotStatement`].
pub const STATEMENT_BYTES: usize = 8 + 32 + 8 + 32;
/// Largest snapshot chunk a `SnapshotChunk` may carry (bytes).
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;

const _: () = assert!(REPLICA_COUNT_MAX <= u8::MAX as usize);
const _: () = assert!(LOG_WINDOW_OPS_LIMIT <= u16::MAX as u64);

/// Why bytes are not an encoded BFT message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes end inside a field.
    #[error("truncated BFT message")]
    Truncated,
    /// An unknown message tag.
    #[error("unknown BFT message tag {0}")]
    BadTag(u8),
    /// An unknown vote kind.
    #[error("unknown vote kind {0}")]
    BadKind(u8),
    /// A count above its limit, or an option flag that is neither 0 nor 1.
    #[error("{0}: out of range")]
    OutOfRange(&'static str),
    /// Bytes after the message.
    #[error("{0} bytes after the BFT message")]
    TrailingBytes(usize),
}

/// Appends the encoding of `message` to `out`.
pub fn encode(message: &Message, out: &mut Vec<u8>) {
    match message {
        Message::PrePrepare { vote, batch } => {
            out.push(TAG_PRE_PREPARE);
            put_vote(out, vote);
            put_bytes(out, batch);
        }
        Message::Prepare { vote, pre_prepare } => {
            out.push(TAG_PREPARE);
            put_vote(out, vote);
            put_vote(out, pre_prepare);
        }
        Message::Commit(vote) => {
            out.push(TAG_COMMIT);
            put_vote(out, vote);
        }
        Message::Checkpoint(vote) => {
            out.push(TAG_CHECKPOINT);
            put_vote(out, vote);
        }
        Message::ViewChange(view_change) => {
            out.push(TAG_VIEW_CHANGE);
            put_view_change(out, view_change);
        }
        Message::NewView(new_view) => {
            out.push(TAG_NEW_VIEW);
            out.extend_from_slice(&new_view.view.to_le_bytes());
            out.push(new_view.view_changes.len() as u8);
            for view_change in &new_view.view_changes {
                put_view_change(out, view_change);
            }
            out.extend_from_slice(&(new_view.pre_prepares.len() as u16).to_le_bytes());
            for (vote, batch) in &new_view.pre_prepares {
                put_vote(out, vote);
                put_bytes(out, batch);
            }
        }
        Message::Status {
            view,
            commit_op,
            low,
        } => {
            out.push(TAG_STATUS);
            for value in [view, commit_op, low] {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        Message::CommitProof {
            pre_prepare,
            cert,
            batch,
        } => {
            out.push(TAG_COMMIT_PROOF);
            put_vote(out, pre_prepare);
            put_votes(out, &cert.commits);
            put_bytes(out, batch);
        }
        Message::CheckpointProof(cert) => {
            out.push(TAG_CHECKPOINT_PROOF);
            put_votes(out, &cert.votes);
        }
        Message::StateRequest { from_op, to_op } => {
            out.push(TAG_STATE_REQUEST);
            out.extend_from_slice(&from_op.to_le_bytes());
            out.extend_from_slice(&to_op.to_le_bytes());
        }
        Message::StateOps(ops) => {
            out.push(TAG_STATE_OPS);
            debug_assert!(ops.len() as u64 <= LOG_WINDOW_OPS_LIMIT);
            out.extend_from_slice(&(ops.len() as u16).to_le_bytes());
            for (cert, batch) in ops {
                put_votes(out, &cert.commits);
                put_bytes(out, batch);
            }
        }
        Message::StateCheckpoint { vote, statement } => {
            out.push(TAG_STATE_CHECKPOINT);
            put_vote(out, vote);
            put_statement(out, statement);
        }
        Message::StateSnapshot(cert) => {
            out.push(TAG_STATE_SNAPSHOT);
            put_statement(out, &cert.statement);
            put_votes(out, &cert.votes);
        }
        Message::SnapshotRequest { journal_op, offset } => {
            out.push(TAG_SNAPSHOT_REQUEST);
            out.extend_from_slice(&journal_op.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        Message::SnapshotChunk {
            journal_op,
            offset,
            file_bytes,
            bytes,
        } => {
            out.push(TAG_SNAPSHOT_CHUNK);
            debug_assert!(bytes.len() <= SNAPSHOT_CHUNK_BYTES_MAX);
            for value in [journal_op, offset, file_bytes] {
                out.extend_from_slice(&value.to_le_bytes());
            }
            put_bytes(out, bytes);
        }
    }
}

/// Bytes [`encode`] appends for `message` (sizes outboxes and refuses what cannot be sent).
pub fn encoded_bytes(message: &Message) -> usize {
    let view_change_bytes = |view_change: &ViewChange| {
        view_change_bytes(
            view_change.checkpoint.as_ref().map(|cert| cert.votes.len()),
            view_change
                .prepared
                .iter()
                .map(|entry| prepared_bytes(entry.cert.prepares.len(), entry.batch.len()))
                .sum::<usize>(),
        )
    };
    TAG_BYTES
        + match message {
            Message::PrePrepare { batch, .. } => proposal_bytes(batch.len()),
            Message::Prepare { .. } => 2 * VOTE_BYTES,
            Message::Commit(_) | Message::Checkpoint(_) => VOTE_BYTES,
            Message::ViewChange(view_change) => view_change_bytes(view_change),
            Message::NewView(new_view) => new_view_bytes(
                new_view
                    .view_changes
                    .iter()
                    .map(view_change_bytes)
                    .sum::<usize>(),
                new_view
                    .pre_prepares
                    .iter()
                    .map(|(_, batch)| proposal_bytes(batch.len()))
                    .sum::<usize>(),
            ),
            Message::Status { .. } => 24,
            Message::CommitProof { cert, batch, .. } => {
                VOTE_BYTES + 1 + cert.commits.len() * VOTE_BYTES + 4 + batch.len()
            }
            Message::CheckpointProof(cert) => 1 + cert.votes.len() * VOTE_BYTES,
            Message::StateRequest { .. } => 16,
            Message::StateOps(ops) => {
                2 + ops
                    .iter()
                    .map(|(cert, batch)| 1 + cert.commits.len() * VOTE_BYTES + 4 + batch.len())
                    .sum::<usize>()
            }
            Message::StateCheckpoint { .. } => VOTE_BYTES + STATEMENT_BYTES,
            Message::StateSnapshot(cert) => STATEMENT_BYTES + 1 + cert.votes.len() * VOTE_BYTES,
            Message::SnapshotRequest { .. } => 16,
            Message::SnapshotChunk { bytes, .. } => 24 + 4 + bytes.len(),
        }
}

/// Upper bounds on the encoded size of the view-change messages of one group (bytes, the
/// tag included): [`view_change_bytes_max`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewChangeBytesMax {
    /// The largest `ViewChange` (bytes).
    pub view_change: usize,
    /// The largest `NewView` a correct leader sends (bytes).
    pub new_view: usize,
}

impl ViewChangeBytesMax {
    /// The larger of the two (bytes).
    pub fn largest(&self) -> usize {
        self.view_change.max(self.new_view)
    }
}

/// The largest ViewChange and NewView of a group of `replica_count` replicas tolerating
/// `faults_max` Byzantine ones, with a log window of `log_window_ops` and batches of at most
/// `batch_bytes_max` bytes. Saturates rather than overflows.
///
/// Computed from the layout [`encode`] writes (the same per-field sizes as
/// [`encoded_bytes`]), with every count at the most the core accepts:
/// - a ViewChange carries a checkpoint certificate of at most `n` votes
///   (`Committee::verify_checkpoint`) and at most `L` prepared entries
///   (`Committee::verify_view_change`), each with at most `n − 1` Prepares (distinct
///   replicas other than the leader) and a batch of at most `batch_bytes_max`: with at most
///   `f` faults a prepared batch holds a correct replica's Prepare, and a correct replica
///   prepares no larger batch;
/// - a NewView from a correct leader carries the `q` ([`quorum_of`]) view changes it chose
///   and one proposal per op of the plan: at most `L` ops, from the highest checkpoint among
///   them to the highest prepared op, which lies within `L` of its own view change's
///   checkpoint, each with a batch of at most `batch_bytes_max`. A faulty leader's NewView
///   with more view changes may be larger; refusing it costs the view its silence would.
///
/// # Panics
///
/// If `replica_count` is 0 or above [`REPLICA_COUNT_MAX`] (a configuration bug: the fault
/// model is checked before this).
pub fn view_change_bytes_max(
    replica_count: usize,
    faults_max: u8,
    log_window_ops: u64,
    batch_bytes_max: usize,
) -> ViewChangeBytesMax {
    assert!((1..=REPLICA_COUNT_MAX).contains(&replica_count));
    let quorum = quorum_of(replica_count, faults_max).min(replica_count);
    let window = usize::try_from(log_window_ops).unwrap_or(usize::MAX);
    let prepared = prepared_bytes(replica_count - 1, batch_bytes_max).saturating_mul(window);
    let view_change = view_change_bytes(Some(replica_count), prepared);
    let new_view = new_view_bytes(
        view_change.saturating_mul(quorum),
        proposal_bytes(batch_bytes_max).saturating_mul(window),
    );
    let bytes_max = ViewChangeBytesMax {
        view_change: view_change.saturating_add(TAG_BYTES),
        new_view: new_view.saturating_add(TAG_BYTES),
    };
    debug_assert!(bytes_max.new_view >= bytes_max.view_change);
    bytes_max
}

/// Bytes of a certificate of `votes` votes (`votes` in the layout).
const fn votes_bytes(votes: usize) -> usize {
    COUNT_U8_BYTES.saturating_add(votes.saturating_mul(VOTE_BYTES))
}

/// Bytes of one prepared entry with `prepares` Prepares and a batch of `batch_bytes`.
const fn prepared_bytes(prepares: usize, batch_bytes: usize) -> usize {
    (VOTE_BYTES + LENGTH_BYTES)
        .saturating_add(votes_bytes(prepares))
        .saturating_add(batch_bytes)
}

/// Bytes of one proposal (a PrePrepare's vote and batch) of `batch_bytes`.
const fn proposal_bytes(batch_bytes: usize) -> usize {
    (VOTE_BYTES + LENGTH_BYTES).saturating_add(batch_bytes)
}

/// Bytes of a view change (without a tag) whose checkpoint certificate holds
/// `checkpoint_votes` votes (`None`: no certificate) and whose prepared entries take
/// `prepared_bytes` together.
const fn view_change_bytes(checkpoint_votes: Option<usize>, prepared_bytes: usize) -> usize {
    let checkpoint = match checkpoint_votes {
        None => 0,
        Some(votes) => votes_bytes(votes),
    };
    (VOTE_BYTES + FLAG_BYTES + COUNT_U16_BYTES)
        .saturating_add(checkpoint)
        .saturating_add(prepared_bytes)
}

/// Bytes of a NewView (without a tag) whose view changes take `view_changes_bytes` and
/// whose proposals take `proposals_bytes` together.
const fn new_view_bytes(view_changes_bytes: usize, proposals_bytes: usize) -> usize {
    (U64_BYTES + COUNT_U8_BYTES + COUNT_U16_BYTES)
        .saturating_add(view_changes_bytes)
        .saturating_add(proposals_bytes)
}

/// Decodes one message that fills `bytes` exactly. Never panics; allocates at most what
/// the bytes themselves hold (every length is checked against what is left).
pub fn decode(bytes: &[u8]) -> Result<Message, CodecError> {
    let mut reader = Reader { bytes };
    let message = match reader.u8()? {
        TAG_PRE_PREPARE => Message::PrePrepare {
            vote: reader.vote()?,
            batch: reader.bytes()?,
        },
        TAG_PREPARE => Message::Prepare {
            vote: reader.vote()?,
            pre_prepare: reader.vote()?,
        },
        TAG_COMMIT => Message::Commit(reader.vote()?),
        TAG_CHECKPOINT => Message::Checkpoint(reader.vote()?),
        TAG_VIEW_CHANGE => Message::ViewChange(Box::new(reader.view_change()?)),
        TAG_NEW_VIEW => {
            let view = reader.u64()?;
            let count = reader.count_u8("new view: view changes")?;
            let mut view_changes = Vec::with_capacity(count);
            for _ in 0..count {
                view_changes.push(reader.view_change()?);
            }
            let count = reader.count_u16("new view: pre-prepares")?;
            let mut pre_prepares = Vec::with_capacity(count.min(reader.left() / VOTE_BYTES));
            for _ in 0..count {
                pre_prepares.push((reader.vote()?, reader.bytes()?));
            }
            Message::NewView(Box::new(NewView {
                view,
                view_changes,
                pre_prepares,
            }))
        }
        TAG_STATUS => Message::Status {
            view: reader.u64()?,
            commit_op: reader.u64()?,
            low: reader.u64()?,
        },
        TAG_COMMIT_PROOF => Message::CommitProof {
            pre_prepare: reader.vote()?,
            cert: CommitCert {
                commits: reader.votes()?,
            },
            batch: reader.bytes()?,
        },
        TAG_CHECKPOINT_PROOF => Message::CheckpointProof(CheckpointCert {
            votes: reader.votes()?,
        }),
        TAG_STATE_REQUEST => Message::StateRequest {
            from_op: reader.u64()?,
            to_op: reader.u64()?,
        },
        TAG_STATE_OPS => {
            let count = reader.count_u16("state ops")?;
            // Each op takes at least a vote count and a length: allocate no more than
            // the bytes can hold.
            let mut ops = Vec::with_capacity(count.min(reader.left() / 5));
            for _ in 0..count {
                let commits = reader.votes()?;
                ops.push((CommitCert { commits }, reader.bytes()?));
            }
            Message::StateOps(ops)
        }
        TAG_STATE_CHECKPOINT => Message::StateCheckpoint {
            vote: reader.vote()?,
            statement: reader.statement()?,
        },
        TAG_STATE_SNAPSHOT => Message::StateSnapshot(StateCert {
            statement: reader.statement()?,
            votes: reader.votes()?,
        }),
        TAG_SNAPSHOT_REQUEST => Message::SnapshotRequest {
            journal_op: reader.u64()?,
            offset: reader.u64()?,
        },
        TAG_SNAPSHOT_CHUNK => {
            let journal_op = reader.u64()?;
            let offset = reader.u64()?;
            let file_bytes = reader.u64()?;
            let bytes = reader.bytes()?;
            if bytes.len() > SNAPSHOT_CHUNK_BYTES_MAX {
                return Err(CodecError::OutOfRange("snapshot chunk"));
            }
            Message::SnapshotChunk {
                journal_op,
                offset,
                file_bytes,
                bytes,
            }
        }
        tag => return Err(CodecError::BadTag(tag)),
    };
    if !reader.bytes.is_empty() {
        return Err(CodecError::TrailingBytes(reader.bytes.len()));
    }
    Ok(message)
}

/// Appends `votes` as the codec encodes a certificate (a count, then each vote): what the
/// runtime journals as a commit or checkpoint certificate.
pub fn encode_votes(votes: &[Vote], out: &mut Vec<u8>) {
    put_votes(out, votes);
}

/// Decodes what [`encode_votes`] wrote at the start of `bytes`; returns the votes and the
/// bytes read.
pub fn decode_votes(bytes: &[u8]) -> Result<(Vec<Vote>, usize), CodecError> {
    let mut reader = Reader { bytes };
    let votes = reader.votes()?;
    Ok((votes, bytes.len() - reader.bytes.len()))
}

/// Appends one prepared certificate and its batch as a ViewChange carries it: what the
/// runtime makes durable before its Commit leaves ([`crate::bft::Action::PersistPrepared`]).
pub fn encode_prepared(entry: &PreparedEntry, out: &mut Vec<u8>) {
    put_vote(out, &entry.cert.pre_prepare);
    put_votes(out, &entry.cert.prepares);
    put_bytes(out, &entry.batch);
}

/// Decodes what [`encode_prepared`] wrote at the start of `bytes`; returns the entry and
/// the bytes read. The certificate is not verified here.
pub fn decode_prepared(bytes: &[u8]) -> Result<(PreparedEntry, usize), CodecError> {
    let mut reader = Reader { bytes };
    let entry = reader.prepared()?;
    Ok((entry, bytes.len() - reader.bytes.len()))
}

fn put_vote(out: &mut Vec<u8>, vote: &Vote) {
    out.push(vote.kind as u8);
    out.push(vote.replica);
    out.extend_from_slice(&vote.view.to_le_bytes());
    out.extend_from_slice(&vote.op.to_le_bytes());
    out.extend_from_slice(&vote.digest);
    out.extend_from_slice(&vote.signature.to_bytes());
}

fn put_votes(out: &mut Vec<u8>, votes: &[Vote]) {
    debug_assert!(votes.len() <= REPLICA_COUNT_MAX);
    out.push(votes.len() as u8);
    for vote in votes {
        put_vote(out, vote);
    }
}

fn put_statement(out: &mut Vec<u8>, statement: &SnapshotStatement) {
    out.extend_from_slice(&statement.op.to_le_bytes());
    out.extend_from_slice(&statement.chain);
    out.extend_from_slice(&statement.journal_op.to_le_bytes());
    out.extend_from_slice(&statement.state_digest);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_view_change(out: &mut Vec<u8>, view_change: &ViewChange) {
    put_vote(out, &view_change.vote);
    match &view_change.checkpoint {
        None => out.push(0),
        Some(cert) => {
            out.push(1);
            put_votes(out, &cert.votes);
        }
    }
    debug_assert!(view_change.prepared.len() as u64 <= LOG_WINDOW_OPS_LIMIT);
    out.extend_from_slice(&(view_change.prepared.len() as u16).to_le_bytes());
    for entry in &view_change.prepared {
        encode_prepared(entry, out);
    }
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], CodecError> {
        if count > self.bytes.len() {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count_u8(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let count = usize::from(self.u8()?);
        if count > REPLICA_COUNT_MAX {
            return Err(CodecError::OutOfRange(what));
        }
        Ok(count)
    }

    fn count_u16(&mut self, what: &'static str) -> Result<usize, CodecError> {
        let count = u16::from_le_bytes(self.array()?);
        if u64::from(count) > LOG_WINDOW_OPS_LIMIT {
            return Err(CodecError::OutOfRange(what));
        }
        Ok(usize::from(count))
    }

    fn vote(&mut self) -> Result<Vote, CodecError> {
        let kind = match self.u8()? {
            1 => VoteKind::PrePrepare,
            2 => VoteKind::Prepare,
            3 => VoteKind::Commit,
            4 => VoteKind::Checkpoint,
            5 => VoteKind::ViewChange,
            6 => VoteKind::StateCheckpoint,
            other => return Err(CodecError::BadKind(other)),
        };
        Ok(Vote {
            kind,
            replica: self.u8()?,
            view: self.u64()?,
            op: self.u64()?,
            digest: self.array()?,
            signature: Signature::from_bytes(&self.array()?),
        })
    }

    fn statement(&mut self) -> Result<SnapshotStatement, CodecError> {
        Ok(SnapshotStatement {
            op: self.u64()?,
            chain: self.array()?,
            journal_op: self.u64()?,
            state_digest: self.array()?,
        })
    }

    fn votes(&mut self) -> Result<Vec<Vote>, CodecError> {
        let count = self.count_u8("votes")?;
        let mut votes = Vec::with_capacity(count);
        for _ in 0..count {
            votes.push(self.vote()?);
        }
        Ok(votes)
    }

    fn bytes(&mut self) -> Result<Vec<u8>, CodecError> {
        let length = u32::from_le_bytes(self.array()?) as usize;
        Ok(self.take(length)?.to_vec())
    }

    fn prepared(&mut self) -> Result<PreparedEntry, CodecError> {
        let pre_prepare = self.vote()?;
        let prepares = self.votes()?;
        Ok(PreparedEntry {
            cert: PreparedCert {
                pre_prepare,
                prepares,
            },
            batch: self.bytes()?,
        })
    }

    fn view_change(&mut self) -> Result<ViewChange, CodecError> {
        let vote = self.vote()?;
        let checkpoint = match self.u8()? {
            0 => None,
            1 => Some(CheckpointCert {
                votes: self.votes()?,
            }),
            _ => return Err(CodecError::OutOfRange("view change: checkpoint flag")),
        };
        let count = self.count_u16("view change: prepared")?;
        let mut prepared = Vec::with_capacity(count.min(self.left() / VOTE_BYTES));
        for _ in 0..count {
            prepared.push(self.prepared()?);
        }
        Ok(ViewChange {
            vote,
            checkpoint,
            prepared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bft::SigningKey;
    use proptest::prelude::*;

    fn vote(kind: VoteKind, replica: u8, op: u64) -> Vote {
        let key = SigningKey::from_bytes(&[replica + 1; 32]);
        Vote::sign(&key, 3, kind, replica, 7, op, [op as u8; 32])
    }

    fn samples() -> Vec<Message> {
        let checkpoint = CheckpointCert {
            votes: (0..3).map(|r| vote(VoteKind::Checkpoint, r, 16)).collect(),
        };
        let view_change = ViewChange {
            vote: vote(VoteKind::ViewChange, 2, 16),
            checkpoint: Some(checkpoint.clone()),
            prepared: vec![PreparedEntry {
                cert: PreparedCert {
                    pre_prepare: vote(VoteKind::PrePrepare, 1, 17),
                    prepares: (2..4).map(|r| vote(VoteKind::Prepare, r, 17)).collect(),
                },
                batch: b"batch".to_vec(),
            }],
        };
        vec![
            Message::PrePrepare {
                vote: vote(VoteKind::PrePrepare, 0, 1),
                batch: vec![1, 2, 3],
            },
            Message::Prepare {
                vote: vote(VoteKind::Prepare, 1, 1),
                pre_prepare: vote(VoteKind::PrePrepare, 0, 1),
            },
            Message::Commit(vote(VoteKind::Commit, 2, 1)),
            Message::Checkpoint(vote(VoteKind::Checkpoint, 3, 16)),
            Message::ViewChange(Box::new(view_change.clone())),
            Message::NewView(Box::new(NewView {
                view: 8,
                view_changes: vec![
                    view_change,
                    ViewChange {
                        vote: vote(VoteKind::ViewChange, 0, 0),
                        checkpoint: None,
                        prepared: Vec::new(),
                    },
                ],
                pre_prepares: vec![(vote(VoteKind::PrePrepare, 0, 17), Vec::new())],
            })),
            Message::Status {
                view: 1,
                commit_op: 2,
                low: 3,
            },
            Message::CommitProof {
                pre_prepare: vote(VoteKind::PrePrepare, 0, 5),
                cert: CommitCert {
                    commits: (0..3).map(|r| vote(VoteKind::Commit, r, 5)).collect(),
                },
                batch: vec![9; 100],
            },
            Message::CheckpointProof(checkpoint),
            Message::StateRequest {
                from_op: 3,
                to_op: 18,
            },
            Message::StateOps(vec![
                (
                    CommitCert {
                        commits: (0..3).map(|r| vote(VoteKind::Commit, r, 3)).collect(),
                    },
                    vec![4; 40],
                ),
                (
                    CommitCert {
                        commits: (1..4).map(|r| vote(VoteKind::Commit, r, 4)).collect(),
                    },
                    Vec::new(),
                ),
            ]),
            Message::StateOps(Vec::new()),
            Message::StateCheckpoint {
                vote: vote(VoteKind::StateCheckpoint, 1, 32),
                statement: statement(),
            },
            Message::StateSnapshot(StateCert {
                statement: statement(),
                votes: (0..3)
                    .map(|r| vote(VoteKind::StateCheckpoint, r, 32))
                    .collect(),
            }),
            Message::SnapshotRequest {
                journal_op: 30,
                offset: 65_536,
            },
            Message::SnapshotChunk {
                journal_op: 30,
                offset: 65_536,
                file_bytes: 200_000,
                bytes: vec![5; 300],
            },
        ]
    }

    fn statement() -> SnapshotStatement {
        SnapshotStatement {
            op: 32,
            chain: [1; 32],
            journal_op: 30,
            state_digest: [2; 32],
        }
    }

    #[test]
    fn every_message_round_trips_and_its_size_is_known() {
        for message in samples() {
            let mut bytes = Vec::new();
            encode(&message, &mut bytes);
            assert_eq!(bytes.len(), encoded_bytes(&message), "{}", message.name());
            assert_eq!(decode(&bytes), Ok(message.clone()), "{}", message.name());
            // Every strict prefix is refused, and so is a trailing byte.
            for cut in 0..bytes.len() {
                assert!(
                    decode(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    message.name()
                );
            }
            bytes.push(0);
            assert_eq!(decode(&bytes), Err(CodecError::TrailingBytes(1)));
        }
    }

    #[test]
    fn unknown_tags_kinds_and_counts_are_refused() {
        assert_eq!(decode(&[0]), Err(CodecError::BadTag(0)));
        assert_eq!(decode(&[16]), Err(CodecError::BadTag(16)));
        let mut bytes = Vec::new();
        encode(&Message::Commit(vote(VoteKind::Commit, 1, 1)), &mut bytes);
        bytes[1] = 9;
        assert_eq!(decode(&bytes), Err(CodecError::BadKind(9)));
        let mut proof = vec![TAG_CHECKPOINT_PROOF, REPLICA_COUNT_MAX as u8 + 1];
        proof.extend_from_slice(&[0; 4 * VOTE_BYTES]);
        assert_eq!(decode(&proof), Err(CodecError::OutOfRange("votes")));
        let mut ops = vec![TAG_STATE_OPS];
        ops.extend_from_slice(&(LOG_WINDOW_OPS_LIMIT as u16 + 1).to_le_bytes());
        assert_eq!(decode(&ops), Err(CodecError::OutOfRange("state ops")));
    }

    /// The largest NewView a correct leader of view 1 sends, in a group of `n` replicas
    /// tolerating `f`, with a window of `window` ops and batches of `batch_bytes`: `q` view
    /// changes, each on a checkpoint certified by all `n` replicas and reporting the whole
    /// window prepared, every certificate holding `n − 1` Prepares and a full batch; and
    /// the leader's proposal, with its batch, for every op of the plan. Every signature is
    /// real and every view change verifies against the returned committee.
    fn largest_new_view(n: u8, f: u8, window: u64, batch_bytes: usize) -> NewView {
        let keys: Vec<SigningKey> = (0..n)
            .map(|r| SigningKey::from_bytes(&[r + 1; 32]))
            .collect();
        let committee =
            crate::bft::Committee::new(3, f, keys.iter().map(SigningKey::verifying_key).collect())
                .expect("committee");
        let sign = |replica: u8, kind, view, op, digest| {
            Vote::sign(
                &keys[usize::from(replica)],
                3,
                kind,
                replica,
                view,
                op,
                digest,
            )
        };
        let checkpoint_op = 16;
        let checkpoint = CheckpointCert {
            votes: (0..n)
                .map(|r| sign(r, VoteKind::Checkpoint, 0, checkpoint_op, [7; 32]))
                .collect(),
        };
        let leader = committee.leader_of(0);
        let prepared: Vec<PreparedEntry> = (checkpoint_op + 1..=checkpoint_op + window)
            .map(|op| {
                let mut batch = vec![0x5A; batch_bytes];
                batch[..8].copy_from_slice(&op.to_le_bytes());
                let digest = crate::bft::batch_digest(&batch);
                PreparedEntry {
                    cert: PreparedCert {
                        pre_prepare: sign(leader, VoteKind::PrePrepare, 0, op, digest),
                        prepares: (0..n)
                            .filter(|r| *r != leader)
                            .map(|r| sign(r, VoteKind::Prepare, 0, op, digest))
                            .collect(),
                    },
                    batch,
                }
            })
            .collect();
        let view_changes: Vec<ViewChange> = (0..committee.quorum() as u8)
            .map(|r| {
                let mut view_change = ViewChange {
                    vote: sign(r, VoteKind::ViewChange, 1, checkpoint_op, [0; 32]),
                    checkpoint: Some(checkpoint.clone()),
                    prepared: prepared.clone(),
                };
                let digest = view_change.content_digest();
                view_change.vote = sign(r, VoteKind::ViewChange, 1, checkpoint_op, digest);
                committee
                    .verify_view_change(&view_change, committee.quorum() - 1, window)
                    .expect("a view change the core accepts");
                view_change
            })
            .collect();
        let plan = crate::bft::new_view_plan(&view_changes, None);
        assert_eq!(plan.entries.len() as u64, window);
        let new_leader = committee.leader_of(1);
        NewView {
            view: 1,
            pre_prepares: plan
                .entries
                .into_iter()
                .map(|(op, digest, batch)| {
                    (sign(new_leader, VoteKind::PrePrepare, 1, op, digest), batch)
                })
                .collect(),
            view_changes,
        }
    }

    #[test]
    fn view_change_bytes_max_is_the_size_of_the_largest_messages() {
        use crate::bft::LOG_WINDOW_OPS_DEFAULT;
        // The runtime's largest batch at the default batch cap: 1,000 records of 128 bytes,
        // each with its request descriptor (32) and client signature (64), and the header.
        const BATCH_BYTES_DEFAULT: usize = 8 + 1_000 * (128 + 32 + 64);
        let cases = [
            (4, 1, LOG_WINDOW_OPS_DEFAULT, BATCH_BYTES_DEFAULT),
            (7, 2, LOG_WINDOW_OPS_DEFAULT, BATCH_BYTES_DEFAULT),
            (5, 1, 64, 4_096),
            (1, 0, 32, 100),
        ];
        for (n, f, window, batch_bytes) in cases {
            let new_view = largest_new_view(n, f, window, batch_bytes);
            let bound = view_change_bytes_max(usize::from(n), f, window, batch_bytes);
            let view_change = Message::ViewChange(Box::new(new_view.view_changes[0].clone()));
            let new_view = Message::NewView(Box::new(new_view));
            for (message, bytes_max) in
                [(view_change, bound.view_change), (new_view, bound.new_view)]
            {
                let mut bytes = Vec::with_capacity(bytes_max);
                encode(&message, &mut bytes);
                assert_eq!(bytes.len(), encoded_bytes(&message));
                // Reached exactly: an upper bound, and no larger than it needs to be.
                assert_eq!(
                    bytes.len(),
                    bytes_max,
                    "{} at n = {n}, f = {f}, L = {window}, batches of {batch_bytes} bytes",
                    message.name()
                );
            }
            assert_eq!(bound.largest(), bound.new_view);
        }
    }

    #[test]
    fn view_change_bytes_max_grows_with_every_input_and_saturates() {
        let base = view_change_bytes_max(4, 1, 32, 1_000);
        for larger in [
            view_change_bytes_max(5, 1, 32, 1_000),
            view_change_bytes_max(7, 2, 32, 1_000),
            view_change_bytes_max(4, 1, 64, 1_000),
            view_change_bytes_max(4, 1, 32, 1_001),
        ] {
            assert!(larger.view_change >= base.view_change);
            assert!(larger.new_view > base.new_view);
        }
        let huge = view_change_bytes_max(7, 2, LOG_WINDOW_OPS_LIMIT, usize::MAX / 2);
        assert_eq!(huge.new_view, usize::MAX);
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2_000)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_messages(
            which in 0usize..12,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = Vec::new();
            encode(&samples()[which], &mut bytes);
            for (at, value) in flips {
                let index = at % bytes.len();
                bytes[index] = value;
            }
            let _ = decode(&bytes);
        }
    }
}
