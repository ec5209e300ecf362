//! The signed statements of the BFT protocol, the certificates built from them, and the
//! messages replicas exchange. Everything here verifies itself against a [`Committee`]
//! (the group's public keys); nothing here keeps state or performs I/O.
//!
//! One ed25519 signature covers one fixed 69-byte statement `(kind, group, replica, view,
//! op, digest)`: a vote on a whole batch is one signature however many transactions the
//! batch holds. Verification is always `verify_strict` (see [`Committee::verify_vote`] for
//! why certificates are not batch-verified).

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::{BftError, REPLICA_COUNT_MAX};

/// A blake3 digest (batches, checkpoints, view-change contents).
pub type Digest = [u8; 32];

/// Domain separation of every signed statement (protocol version 1).
pub const SIGNING_DOMAIN: &[u8; 15] = b"percore-bft-v1\0";
/// Bytes of one signed statement.
pub const SIGNING_BYTES: usize = SIGNING_DOMAIN.len() + 1 + 4 + 1 + 8 + 8 + 32;
/// The chain digest before op 1.
pub const CHAIN_GENESIS: Digest = [0; 32];

/// The digest of a batch's bytes. An empty batch is the null op a new view fills a gap with.
pub fn batch_digest(batch: &[u8]) -> Digest {
    *blake3::hash(batch).as_bytes()
}

/// The digest of the committed log through `op`: `blake3(domain, previous, op, batch)`.
/// A checkpoint certifies this value, so a log fetched from anyone can be checked against
/// it batch by batch.
pub fn chain_digest(previous: &Digest, op: u64, batch: &Digest) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"percore-bft-chain-v1");
    hasher.update(previous);
    hasher.update(&op.to_le_bytes());
    hasher.update(batch);
    *hasher.finalize().as_bytes()
}

/// Domain of [`SnapshotStatement::digest`].
pub const SNAPSHOT_STATEMENT_DOMAIN: &[u8; 24] = b"percore-bft-snapshot-v1\0";

/// What a snapshot checkpoint certifies: after executing the committed log through BFT op
/// `op` (chain digest `chain`), a replica's journal holds `journal_op` applied batches and
/// its state machine has digest `state_digest` (`StateMachine::digest`, the session table
/// included). Signed as a [`VoteKind::StateCheckpoint`] vote on [`Self::digest`]; a
/// snapshot file fetched from any peer is believed only if its restored state has
/// `state_digest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStatement {
    /// The BFT op.
    pub op: u64,
    /// `chain(op)`.
    pub chain: Digest,
    /// The journal op (applied batches) at `op`: where the snapshot's journal starts.
    pub journal_op: u64,
    /// The state machine's digest at `op`.
    pub state_digest: Digest,
}

impl SnapshotStatement {
    /// The digest a `StateCheckpoint` vote signs: `blake3(domain, op, chain, journal_op,
    /// state_digest)`.
    pub fn digest(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(SNAPSHOT_STATEMENT_DOMAIN);
        hasher.update(&self.op.to_le_bytes());
        hasher.update(&self.chain);
        hasher.update(&self.journal_op.to_le_bytes());
        hasher.update(&self.state_digest);
        *hasher.finalize().as_bytes()
    }
}

/// What a signed statement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum VoteKind {
    /// The leader of `view` proposes batch `digest` at `op`.
    PrePrepare = 1,
    /// A backup accepted the leader's proposal `(view, op, digest)`.
    Prepare = 2,
    /// The signer holds a prepared certificate for `(view, op, digest)`.
    Commit = 3,
    /// The signer's committed log through `op` has chain digest `digest` (view is 0).
    Checkpoint = 4,
    /// The signer moves to `view`; `op` is its stable checkpoint, `digest` the digest of
    /// its view-change contents ([`ViewChange::content_digest`]).
    ViewChange = 5,
    /// The signer's state after executing its committed log through `op`: `digest` is
    /// [`SnapshotStatement::digest`] (chain digest, journal op and state machine digest
    /// there; view 0). A kind of its own: a vote that commits to a state digest is never
    /// read as a `Checkpoint` vote, whose digest is the chain alone.
    StateCheckpoint = 6,
}

/// One signed statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vote {
    /// What it says.
    pub kind: VoteKind,
    /// The view (0 for checkpoints).
    pub view: u64,
    /// The op (the checkpoint's op for checkpoints and view changes).
    pub op: u64,
    /// The batch, chain or content digest.
    pub digest: Digest,
    /// The signer.
    pub replica: u8,
    /// ed25519 over [`Vote::signing_bytes`].
    pub signature: Signature,
}

impl Vote {
    /// The exact bytes a signer signs.
    pub fn signing_bytes(
        group: u32,
        kind: VoteKind,
        replica: u8,
        view: u64,
        op: u64,
        digest: &Digest,
    ) -> [u8; SIGNING_BYTES] {
        let mut bytes = [0u8; SIGNING_BYTES];
        let mut at = 0;
        let mut put = |part: &[u8]| {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        };
        put(SIGNING_DOMAIN);
        put(&[kind as u8]);
        put(&group.to_le_bytes());
        put(&[replica]);
        put(&view.to_le_bytes());
        put(&op.to_le_bytes());
        put(digest);
        debug_assert_eq!(at, SIGNING_BYTES);
        bytes
    }

    /// Signs a statement as `replica` of `group`.
    pub fn sign(
        key: &SigningKey,
        group: u32,
        kind: VoteKind,
        replica: u8,
        view: u64,
        op: u64,
        digest: Digest,
    ) -> Vote {
        let bytes = Vote::signing_bytes(group, kind, replica, view, op, &digest);
        Vote {
            kind,
            view,
            op,
            digest,
            replica,
            signature: key.sign(&bytes),
        }
    }

    /// Whether `other` is about the same `(kind, view, op)`, from the same signer.
    pub fn same_slot(&self, other: &Vote) -> bool {
        self.kind == other.kind
            && self.view == other.view
            && self.op == other.op
            && self.replica == other.replica
    }
}

/// Signatures a certificate needs in a group of `replica_count` replicas tolerating
/// `faults_max` Byzantine ones: `⌈(n + f + 1) / 2⌉` ([`Committee::quorum`]).
pub const fn quorum_of(replica_count: usize, faults_max: u8) -> usize {
    (replica_count + faults_max as usize + 2) / 2
}

/// The group's public keys and quorum sizes: what every signature and certificate is
/// checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committee {
    /// The group (shard) signed into every statement.
    pub group: u32,
    /// Byzantine replicas tolerated (`f`).
    pub faults_max: u8,
    keys: Vec<VerifyingKey>,
}

impl Committee {
    /// A committee of `keys.len()` replicas tolerating `faults_max` Byzantine ones.
    pub fn new(group: u32, faults_max: u8, keys: Vec<VerifyingKey>) -> Result<Self, BftError> {
        super::check_fault_model(keys.len(), faults_max)?;
        if let Some(replica) = keys.iter().position(VerifyingKey::is_weak) {
            return Err(BftError::WeakKey(replica as u8));
        }
        Ok(Self {
            group,
            faults_max,
            keys,
        })
    }

    /// Replicas in the group (`n`).
    pub fn replica_count(&self) -> u8 {
        self.keys.len() as u8
    }

    /// Signatures a certificate needs: `⌈(n + f + 1) / 2⌉`, which is `2f + 1` when
    /// `n = 3f + 1`. Two quorums share at least `f + 1` replicas, so at least one correct.
    pub fn quorum(&self) -> usize {
        quorum_of(self.keys.len(), self.faults_max)
    }

    /// Replies or reports that include at least one correct replica: `f + 1`.
    pub fn weak_quorum(&self) -> usize {
        usize::from(self.faults_max) + 1
    }

    /// The leader of `view` ([`crate::placement::leader_of`]).
    pub fn leader_of(&self, view: u64) -> u8 {
        crate::placement::leader_of(self.group, view, self.replica_count())
    }

    /// The public key of `replica`.
    pub fn key(&self, replica: u8) -> Option<&VerifyingKey> {
        self.keys.get(usize::from(replica))
    }

    /// Checks one vote's signature with `verify_strict` (rejects small-order keys and `R`,
    /// non-canonical `s`, and uses the cofactorless equation).
    ///
    /// Certificates are verified one signature at a time too, not with `verify_batch`:
    /// ed25519-dalek's batch equation is cofactorless with 128-bit coefficients drawn from
    /// a transcript of the inputs, and it skips the small-order checks, so a signer that
    /// puts a torsion component in `R` gets a signature that `verify_strict` rejects but a
    /// batch accepts for some batches and not others. Validity of a vote must not depend on
    /// which certificate carries it, so strict per-signature checks are the rule.
    pub fn verify_vote(&self, vote: &Vote) -> Result<(), BftError> {
        let key = self
            .key(vote.replica)
            .ok_or(BftError::UnknownSigner(vote.replica))?;
        let bytes = Vote::signing_bytes(
            self.group,
            vote.kind,
            vote.replica,
            vote.view,
            vote.op,
            &vote.digest,
        );
        key.verify_strict(&bytes, &vote.signature)
            .map_err(|_| BftError::BadSignature {
                replica: vote.replica,
                kind: vote.kind,
            })
    }

    /// Checks a prepared certificate: the leader's signed PrePrepare and `quorum − 1`
    /// Prepares from distinct other replicas, all for one `(view, op, digest)`.
    pub fn verify_prepared(
        &self,
        cert: &PreparedCert,
        prepares_needed: usize,
    ) -> Result<(), BftError> {
        let head = &cert.pre_prepare;
        if head.kind != VoteKind::PrePrepare || head.replica != self.leader_of(head.view) {
            return Err(BftError::InvalidCertificate(
                "prepared: not the leader's proposal",
            ));
        }
        self.verify_vote(head)?;
        let mut seen = 1u8 << head.replica;
        for vote in &cert.prepares {
            if vote.kind != VoteKind::Prepare
                || (vote.view, vote.op, vote.digest) != (head.view, head.op, head.digest)
            {
                return Err(BftError::InvalidCertificate(
                    "prepared: vote does not match",
                ));
            }
            seen = distinct(seen, vote.replica, self.replica_count())?;
            self.verify_vote(vote)?;
        }
        if cert.prepares.len() < prepares_needed {
            return Err(BftError::InvalidCertificate("prepared: too few prepares"));
        }
        Ok(())
    }

    /// Checks a commit certificate: `quorum` Commits from distinct replicas for one
    /// `(view, op, digest)`.
    pub fn verify_commit(&self, cert: &CommitCert, commits_needed: usize) -> Result<(), BftError> {
        self.verify_same_votes(&cert.commits, VoteKind::Commit, commits_needed)
    }

    /// Checks a checkpoint certificate: `quorum` Checkpoint votes from distinct replicas for
    /// one `(op, chain digest)`.
    pub fn verify_checkpoint(&self, cert: &CheckpointCert) -> Result<(), BftError> {
        self.verify_same_votes(&cert.votes, VoteKind::Checkpoint, self.quorum())
    }

    fn verify_same_votes(
        &self,
        votes: &[Vote],
        kind: VoteKind,
        needed: usize,
    ) -> Result<(), BftError> {
        let Some(first) = votes.first() else {
            return Err(BftError::InvalidCertificate("empty certificate"));
        };
        if votes.len() < needed || votes.len() > usize::from(self.replica_count()) {
            return Err(BftError::InvalidCertificate("wrong number of votes"));
        }
        let mut seen = 0u8;
        for vote in votes {
            if vote.kind != kind
                || (vote.view, vote.op, vote.digest) != (first.view, first.op, first.digest)
            {
                return Err(BftError::InvalidCertificate("votes do not match"));
            }
            seen = distinct(seen, vote.replica, self.replica_count())?;
            self.verify_vote(vote)?;
        }
        Ok(())
    }

    /// Checks a state certificate: `quorum` `StateCheckpoint` votes from distinct replicas
    /// for one `(op, digest)`, where `op` is the statement's and `digest` its
    /// [`SnapshotStatement::digest`] (so the statement carried in clear is what was signed).
    pub fn verify_state(&self, cert: &StateCert) -> Result<(), BftError> {
        let Some(first) = cert.votes.first() else {
            return Err(BftError::InvalidCertificate("empty certificate"));
        };
        if first.kind != VoteKind::StateCheckpoint
            || first.view != 0
            || first.op != cert.statement.op
            || first.digest != cert.statement.digest()
        {
            return Err(BftError::InvalidCertificate(
                "state: votes do not sign the statement",
            ));
        }
        self.verify_same_votes(&cert.votes, VoteKind::StateCheckpoint, self.quorum())
    }

    /// Checks a view change: its signature over its contents, its checkpoint certificate,
    /// and each prepared certificate (distinct ops above the checkpoint and within
    /// `log_window_ops` of it, views below the view change's).
    pub fn verify_view_change(
        &self,
        view_change: &ViewChange,
        prepares_needed: usize,
        log_window_ops: u64,
    ) -> Result<(), BftError> {
        let checkpoint_op = view_change.checkpoint_op();
        if view_change.vote.kind != VoteKind::ViewChange
            || view_change.vote.op != checkpoint_op
            || view_change.vote.digest != view_change.content_digest()
        {
            return Err(BftError::InvalidCertificate(
                "view change: contents do not match",
            ));
        }
        self.verify_vote(&view_change.vote)?;
        if let Some(cert) = &view_change.checkpoint {
            self.verify_checkpoint(cert)?;
        }
        if view_change.prepared.len() as u64 > log_window_ops {
            return Err(BftError::InvalidCertificate(
                "view change: too many prepared",
            ));
        }
        let mut op_previous = checkpoint_op;
        for entry in &view_change.prepared {
            let head = &entry.cert.pre_prepare;
            if head.op <= op_previous
                || head.op > checkpoint_op + log_window_ops
                || head.view >= view_change.vote.view
            {
                return Err(BftError::InvalidCertificate(
                    "view change: prepared out of range",
                ));
            }
            if batch_digest(&entry.batch) != head.digest {
                return Err(BftError::BatchDigestMismatch { op: head.op });
            }
            self.verify_prepared(&entry.cert, prepares_needed)?;
            op_previous = head.op;
        }
        Ok(())
    }
}

/// Adds `replica` to a set, refusing repeats and unknown replicas.
fn distinct(seen: u8, replica: u8, replica_count: u8) -> Result<u8, BftError> {
    const _: () = assert!(REPLICA_COUNT_MAX <= 8, "replica sets fit a u8");
    if replica >= replica_count {
        return Err(BftError::UnknownSigner(replica));
    }
    if seen & (1 << replica) != 0 {
        return Err(BftError::InvalidCertificate("a replica signed twice"));
    }
    Ok(seen | (1 << replica))
}

/// Proof that `quorum` replicas accepted the leader's proposal `(view, op, digest)`:
/// no other digest can be prepared at `(view, op)` by a correct replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedCert {
    /// The leader's signed proposal.
    pub pre_prepare: Vote,
    /// `quorum − 1` Prepares from distinct replicas other than the leader.
    pub prepares: Vec<Vote>,
}

/// Proof that `(view, op, digest)` is committed: `quorum` Commit votes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitCert {
    /// Matching Commit votes from distinct replicas.
    pub commits: Vec<Vote>,
}

impl CommitCert {
    /// The certified `(view, op, digest)`, if any vote is there.
    pub fn statement(&self) -> Option<(u64, u64, Digest)> {
        self.commits
            .first()
            .map(|vote| (vote.view, vote.op, vote.digest))
    }
}

/// Proof that the committed log through `op` has chain digest `digest`: the log below can
/// be dropped (the low watermark moves to `op`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointCert {
    /// Matching Checkpoint votes from distinct replicas.
    pub votes: Vec<Vote>,
}

impl CheckpointCert {
    /// The certified op (0 for an empty certificate).
    pub fn op(&self) -> u64 {
        self.votes.first().map_or(0, |vote| vote.op)
    }

    /// The certified chain digest.
    pub fn digest(&self) -> Digest {
        self.votes.first().map_or(CHAIN_GENESIS, |vote| vote.digest)
    }
}

/// Proof that `quorum` replicas hold the state [`SnapshotStatement`] describes: a snapshot
/// of it from any peer can be checked against `statement.state_digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCert {
    /// What the votes sign (their digest is `statement.digest()`).
    pub statement: SnapshotStatement,
    /// Matching `StateCheckpoint` votes from distinct replicas.
    pub votes: Vec<Vote>,
}

impl StateCert {
    /// The certified BFT op.
    pub fn op(&self) -> u64 {
        self.statement.op
    }
}

/// A prepared certificate and the batch it certifies (so a new leader can re-propose it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedEntry {
    /// The certificate.
    pub cert: PreparedCert,
    /// The batch bytes (`batch_digest(batch) == cert.pre_prepare.digest`).
    pub batch: Vec<u8>,
}

/// A replica's move to a new view: its stable checkpoint and everything it prepared above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewChange {
    /// Kind `ViewChange`: `view` the new view, `op` the checkpoint's op, `digest` the
    /// [`ViewChange::content_digest`], signed by the sender.
    pub vote: Vote,
    /// The sender's stable checkpoint certificate (`None`: op 0, the genesis).
    pub checkpoint: Option<CheckpointCert>,
    /// Prepared certificates above the checkpoint, ascending ops, one per op.
    pub prepared: Vec<PreparedEntry>,
}

impl ViewChange {
    /// The checkpoint op the sender stands on.
    pub fn checkpoint_op(&self) -> u64 {
        self.checkpoint.as_ref().map_or(0, CheckpointCert::op)
    }

    /// What the signature binds: the checkpoint `(op, digest)` and every prepared
    /// `(view, op, digest)` (the certificates and batches check themselves).
    pub fn content_digest(&self) -> Digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"percore-bft-view-change-v1");
        let checkpoint_digest = self
            .checkpoint
            .as_ref()
            .map_or(CHAIN_GENESIS, CheckpointCert::digest);
        hasher.update(&self.checkpoint_op().to_le_bytes());
        hasher.update(&checkpoint_digest);
        hasher.update(&(self.prepared.len() as u64).to_le_bytes());
        for entry in &self.prepared {
            let head = &entry.cert.pre_prepare;
            hasher.update(&head.view.to_le_bytes());
            hasher.update(&head.op.to_le_bytes());
            hasher.update(&head.digest);
        }
        *hasher.finalize().as_bytes()
    }
}

/// The new leader's start of a view: `quorum` view changes and its re-proposals for every
/// op between the highest checkpoint among them and the highest prepared op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewView {
    /// The view.
    pub view: u64,
    /// `quorum` verified view changes for `view`, from distinct replicas.
    pub view_changes: Vec<ViewChange>,
    /// PrePrepares of `view` (signed by its leader) for each op of the plan, with batches
    /// (empty for a null op).
    pub pre_prepares: Vec<(Vote, Vec<u8>)>,
}

/// Proof of misbehaviour: two valid signatures by one replica for different digests at one
/// `(kind, view, op)`. Anyone holding the committee's keys can check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// The statement seen first.
    pub first: Vote,
    /// The conflicting statement.
    pub second: Vote,
}

impl Evidence {
    /// Whether this is a real proof under `committee`.
    pub fn verify(&self, committee: &Committee) -> Result<(), BftError> {
        if !self.first.same_slot(&self.second) || self.first.digest == self.second.digest {
            return Err(BftError::InvalidCertificate(
                "evidence: statements do not conflict",
            ));
        }
        committee.verify_vote(&self.first)?;
        committee.verify_vote(&self.second)
    }

    /// The replica it convicts.
    pub fn replica(&self) -> u8 {
        self.first.replica
    }
}

/// What replicas send each other. Unsigned wrappers carry signed statements; the sender
/// of a message matters only for where answers go, never for what is believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The leader proposes `batch` (kind PrePrepare).
    PrePrepare {
        /// The leader's signed proposal.
        vote: Vote,
        /// The batch bytes.
        batch: Vec<u8>,
    },
    /// A backup accepted a proposal.
    Prepare {
        /// The signed Prepare.
        vote: Vote,
        /// The leader's proposal it accepted: if it differs from the receiver's, the
        /// receiver holds evidence that the leader equivocated.
        pre_prepare: Vote,
    },
    /// A replica prepared `(view, op, digest)`.
    Commit(Vote),
    /// A replica's chain digest at a checkpoint op.
    Checkpoint(Vote),
    /// A replica moves to a new view.
    ViewChange(Box<ViewChange>),
    /// The new leader starts its view.
    NewView(Box<NewView>),
    /// Unsigned progress report (every status interval): peers ahead answer with
    /// `CommitProof`s or a `CheckpointProof`, peers in a later view with its `NewView`.
    Status {
        /// The sender's view.
        view: u64,
        /// The sender's highest executed op.
        commit_op: u64,
        /// The sender's low watermark (a peer with a later stable checkpoint sends it).
        low: u64,
    },
    /// A committed batch with its certificate, for a replica that is behind.
    CommitProof {
        /// The proposal of the certificate's view.
        pre_prepare: Vote,
        /// `quorum` Commits.
        cert: CommitCert,
        /// The batch bytes.
        batch: Vec<u8>,
    },
    /// A stable checkpoint above the receiver's log: it must fetch state.
    CheckpointProof(CheckpointCert),
    /// State transfer: asks one peer for the committed ops `from_op..=to_op` with their
    /// commit certificates. Unsigned; answered with `StateOps`.
    StateRequest {
        /// First op asked for.
        from_op: u64,
        /// Last op asked for.
        to_op: u64,
    },
    /// State transfer: committed ops in op order, each with its commit certificate and
    /// its batch (empty for a null op). Believed op by op: the certificate must hold
    /// `quorum` Commits for the batch's digest.
    StateOps(Vec<(CommitCert, Vec<u8>)>),
    /// A replica's snapshot checkpoint vote and the statement it signs (in clear: the
    /// certificate carries it).
    StateCheckpoint {
        /// Kind `StateCheckpoint`, digest `statement.digest()`.
        vote: Vote,
        /// What it certifies.
        statement: SnapshotStatement,
    },
    /// State transfer: answer to a `StateRequest` for ops the peer no longer holds in its
    /// log: its latest state certificate, whose snapshot it serves
    /// (`SnapshotRequest`/`SnapshotChunk`).
    StateSnapshot(StateCert),
    /// Snapshot transfer (driver to driver, unsigned): the bytes at `offset` of the
    /// snapshot file at journal op `journal_op`.
    SnapshotRequest {
        /// The snapshot's journal op.
        journal_op: u64,
        /// Byte offset in the file.
        offset: u64,
    },
    /// Snapshot transfer: one chunk of a snapshot file (empty: the file is not here).
    /// Believed only once the whole file restores to the certified state digest.
    SnapshotChunk {
        /// The snapshot's journal op.
        journal_op: u64,
        /// Byte offset of `bytes` in the file.
        offset: u64,
        /// The whole file's size.
        file_bytes: u64,
        /// The chunk.
        bytes: Vec<u8>,
    },
}

impl Message {
    /// A short name (traces, metrics).
    pub fn name(&self) -> &'static str {
        match self {
            Message::PrePrepare { .. } => "pre_prepare",
            Message::Prepare { .. } => "prepare",
            Message::Commit(_) => "commit",
            Message::Checkpoint(_) => "checkpoint",
            Message::ViewChange(_) => "view_change",
            Message::NewView(_) => "new_view",
            Message::Status { .. } => "status",
            Message::CommitProof { .. } => "commit_proof",
            Message::CheckpointProof(_) => "checkpoint_proof",
            Message::StateRequest { .. } => "state_request",
            Message::StateOps(_) => "state_ops",
            Message::StateCheckpoint { .. } => "state_checkpoint",
            Message::StateSnapshot(_) => "state_snapshot",
            Message::SnapshotRequest { .. } => "snapshot_request",
            Message::SnapshotChunk { .. } => "snapshot_chunk",
        }
    }
}
