//! Messages between BFT groups (cross-shard credit legs and their acknowledgements): the
//! signed *outputs statement*, its certificate, the proof a receiving group checks before it
//! votes for or applies an internal record, the proven batch a leader proposes, their wire
//! encoding, and two sans-IO queues: the sending side's [`OutputsCollector`] and the
//! receiving side's [`InboundProofs`]. `docs/bft.md` §14 gives the design and its argument.
//!
//! A commit certificate proves that a group committed a batch, but a credit leg is an
//! *output* of applying that batch, which a receiver cannot recompute without the sender's
//! state. So after executing op `n`, every replica of the sending group `k` signs, for each
//! destination group `j` that op `n` sent records to,
//!
//! ```text
//! "percore-bft-outputs-v1\0" | origin k u32 | destination j u32 | replica u8 | op n u64
//!     | outputs_digest(k, j, n, operation, records) [32]
//! ```
//!
//! Apply is deterministic, so every correct replica of `k` signs the same digest for
//! `(k, j, n)`. `quorum` such signatures from distinct replicas of `k` (an
//! [`OutputsCert`]) include at least `f + 1` correct replicas, so the records that hash to
//! the digest are exactly what committed op `n` of group `k` produced for `j`: a Byzantine
//! leader of `j` (or of `k`) cannot make up a leg, change its amount, move it to another
//! destination or present one of `k`'s legs as another group's. Replays of a proven output
//! are not refused here: a leg applied twice is a duplicate for the ledger's per-origin
//! window (it is acknowledged again and changes nothing), which is exactly how a lost
//! acknowledgement is repaired.
//!
//! A replica restored from a snapshot cannot sign the outputs of the ops below it. So at each
//! snapshot op `c` every replica also signs *in-flight statements* ([`OutputsKind::InFlight`],
//! their own domain [`IN_FLIGHT_SIGNING_DOMAIN`] and digest [`in_flight_digest`]) over the
//! legs its state has in flight right after `c`, cut into chunks by [`in_flight_chunks`]:
//! replicated state, so every correct replica signs the same chunks, and a replica restored
//! from the snapshot of `c` signs them from the restored state. They are certified, proven
//! and applied like outputs; legs applied already are duplicates at the destination.
//!
//! Nothing here performs I/O, reads a clock or draws randomness; every limit is a named
//! constant or a configuration field, and a full queue is a typed error, never growth.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::message::{Committee, Digest};
use super::request::{
    BATCH_FORMAT_PROVEN, BATCH_FORMAT_SIGNED, BATCH_FORMAT_UNSIGNED, ProposalCheck,
    RequestAuthError,
};
use super::{BftError, REPLICA_COUNT_MAX};
use crate::state_machine::Outbound;

/// Domain separation of the outputs statement (never a prefix of [`super::message::SIGNING_DOMAIN`]
/// statements: it differs in its first bytes and in its length).
pub const OUTPUTS_SIGNING_DOMAIN: &[u8; 23] = b"percore-bft-outputs-v1\0";
/// Bytes of one signed outputs statement.
pub const OUTPUTS_SIGNING_BYTES: usize = OUTPUTS_SIGNING_DOMAIN.len() + 4 + 4 + 1 + 8 + 32;
/// Domain separation of the in-flight statement ([`OutputsKind::InFlight`]): other first
/// bytes and another length than both [`OUTPUTS_SIGNING_DOMAIN`] and
/// [`super::message::SIGNING_DOMAIN`], so no in-flight signature is ever an outputs vote or
/// a protocol vote, or the other way round.
pub const IN_FLIGHT_SIGNING_DOMAIN: &[u8; 25] = b"percore-bft-in-flight-v1\0";
/// Bytes of one signed in-flight statement (the outputs statement's fields and the chunk).
pub const IN_FLIGHT_SIGNING_BYTES: usize = IN_FLIGHT_SIGNING_DOMAIN.len() + 4 + 4 + 1 + 8 + 4 + 32;
/// Largest signed statement of either kind.
pub const STATEMENT_SIGNING_BYTES_MAX: usize = IN_FLIGHT_SIGNING_BYTES;
/// Checkpoints whose in-flight statements an [`OutputsCollector`] keeps at once: the
/// newest two, so that a replica restored from its previous snapshot still finds peers
/// holding the statements of that snapshot.
pub const IN_FLIGHT_CHECKPOINTS_KEPT: usize = 2;
/// Most groups (shards) one cluster may have: bounds the committees built at start-up.
pub const GROUPS_MAX: usize = 256;
/// Largest record bytes of one op's outputs to one destination: 8,192 records of 128 bytes.
/// One op's outputs to one group are at most its batch's records, and a runtime batch is at
/// most one journal entry, which the journal's 512 KiB write buffer bounds (a node with
/// larger batch limits is refused at start): every batch's outputs fit.
pub const OUTPUT_RECORDS_BYTES_MAX: usize = 1 << 20;
/// Most proofs one proven batch may carry.
pub const PROVEN_BATCH_PROOFS_MAX: usize = 256;
/// The second `u16` of a proven batch, where a client batch has its format
/// ([`BATCH_FORMAT_UNSIGNED`] or [`BATCH_FORMAT_SIGNED`]).
pub const PROVEN_BATCH_MARK: u16 = BATCH_FORMAT_PROVEN;
/// Bytes of one encoded [`OutputsVote`] at most (an in-flight vote's statement carries its
/// chunk too).
pub const OUTPUTS_VOTE_BYTES: usize = 4 + 4 + 8 + 1 + 4 + 32 + 1 + 64;

const _: () = assert!(REPLICA_COUNT_MAX <= 8, "signer sets fit a u8");
const _: () = assert!(
    PROVEN_BATCH_MARK != BATCH_FORMAT_UNSIGNED && PROVEN_BATCH_MARK != BATCH_FORMAT_SIGNED,
    "a proven batch is never taken for a client batch"
);
const _: () = assert!(PROVEN_BATCH_PROOFS_MAX <= u16::MAX as usize);
const _: () = assert!(OUTPUT_RECORDS_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(GROUPS_MAX <= u32::MAX as usize);
const _: () = assert!(IN_FLIGHT_SIGNING_BYTES != OUTPUTS_SIGNING_BYTES);
const _: () = assert!(IN_FLIGHT_SIGNING_BYTES != super::message::SIGNING_BYTES);
const _: () = assert!(IN_FLIGHT_SIGNING_BYTES >= OUTPUTS_SIGNING_BYTES);

/// Why an outputs vote, certificate, proof or proven batch is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XShardError {
    /// A group index at or above the cluster's group count.
    #[error("unknown group {0}")]
    UnknownGroup(u32),
    /// A statement whose origin is its destination (a group never messages itself).
    #[error("origin and destination are both group {0}")]
    SameGroup(u32),
    /// A proof addressed to another group than the one checking it.
    #[error("proof for group {destination}, checked by group {receiver}")]
    WrongDestination {
        /// The group the proof is for.
        destination: u32,
        /// The group checking it.
        receiver: u32,
    },
    /// A vote about another group's outputs than the collector's.
    #[error("vote about group {origin}'s outputs, collected by group {collector}")]
    WrongOrigin {
        /// The group the vote is about.
        origin: u32,
        /// The collecting group.
        collector: u32,
    },
    /// A signer that is not in the committee.
    #[error("unknown signer {0}")]
    UnknownSigner(u8),
    /// A signature that `verify_strict` refuses (for the statement as claimed).
    #[error("bad outputs signature from replica {0}")]
    BadSignature(u8),
    /// A certificate with the same signer twice.
    #[error("replica {0} signed a certificate twice")]
    DuplicateSigner(u8),
    /// A certificate with fewer than `quorum` (or more than `n`) signatures.
    #[error("{signers} signatures; a certificate needs {quorum}..={replicas}")]
    SignerCount {
        /// Signatures present.
        signers: usize,
        /// The origin group's quorum.
        quorum: usize,
        /// The origin group's replicas.
        replicas: usize,
    },
    /// Records that do not hash to the certified digest (a forged or altered output).
    #[error("records of group {origin} op {op} do not match the certified digest")]
    DigestMismatch {
        /// The origin group.
        origin: u32,
        /// The origin op.
        op: u64,
    },
    /// Record bytes that are empty, not whole records, or above the limit.
    #[error("{0} record bytes are not 1..=max whole records")]
    RecordBytes(usize),
    /// A proof with more records than one batch of the receiving group may hold: no leader
    /// could ever propose it, so queued it would wait forever.
    #[error("a proof of {records} records; a batch holds at most {records_max}")]
    ProofRecords {
        /// Records the proof carries.
        records: usize,
        /// The receiving group's batch cap.
        records_max: usize,
    },
    /// A proven batch whose proofs carry different operations than the batch.
    #[error("proof operation {proof} in a batch of operation {batch}")]
    OperationMismatch {
        /// The batch's operation.
        batch: u16,
        /// The proof's.
        proof: u16,
    },
    /// A proven batch that carries one `(origin, op, kind)` twice.
    #[error("group {origin} op {op} appears twice in one batch")]
    DuplicateProof {
        /// The origin group.
        origin: u32,
        /// The origin op.
        op: u64,
    },
    /// A proven batch with no proofs, too many, or more records than a batch may hold.
    #[error("{0}: out of range")]
    OutOfRange(&'static str),
    /// Bytes that are not an encoding of what was asked for.
    #[error("malformed cross-shard encoding: {0}")]
    Malformed(&'static str),
    /// A vote for outputs this replica has not produced yet (it may be ahead of it): not
    /// kept; the sender resends.
    #[error("outputs of op {op} for group {destination} not produced here yet")]
    NotProduced {
        /// The destination group.
        destination: u32,
        /// The op.
        op: u64,
    },
    /// The same outputs were produced here twice with different records: apply is not
    /// deterministic, or the caller fed another op's outputs (a bug, never input).
    #[error("op {op} for group {destination} produced twice with different records")]
    Diverged {
        /// The destination group.
        destination: u32,
        /// The op.
        op: u64,
    },
    /// A bounded queue is full; nothing changed.
    #[error("{0} full")]
    Full(&'static str),
    /// Nothing new (a duplicate vote or proof).
    #[error("stale")]
    Stale,
    /// The committees could not be built.
    #[error(transparent)]
    Committee(#[from] BftError),
}

/// The digest an outputs statement signs: the destination's records op `op` of `origin`
/// produced, in order, bound to `(origin, destination, op, operation)`.
pub fn outputs_digest(
    origin: u32,
    destination: u32,
    op: u64,
    operation: u16,
    records: &[u8],
) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"percore-bft-outputs-digest-v1");
    hasher.update(&origin.to_le_bytes());
    hasher.update(&destination.to_le_bytes());
    hasher.update(&op.to_le_bytes());
    hasher.update(&operation.to_le_bytes());
    hasher.update(&(records.len() as u64).to_le_bytes());
    hasher.update(records);
    *hasher.finalize().as_bytes()
}

/// The digest an in-flight statement signs: chunk `chunk` of the legs `origin` had in flight
/// to `destination` right after applying journal op `checkpoint_op` (a snapshot op), in leg
/// order, bound to all of those and the operation. Its own prefix, so it never equals an
/// [`outputs_digest`].
pub fn in_flight_digest(
    origin: u32,
    destination: u32,
    checkpoint_op: u64,
    chunk: u32,
    operation: u16,
    records: &[u8],
) -> Digest {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"percore-bft-in-flight-digest-v1");
    hasher.update(&origin.to_le_bytes());
    hasher.update(&destination.to_le_bytes());
    hasher.update(&checkpoint_op.to_le_bytes());
    hasher.update(&chunk.to_le_bytes());
    hasher.update(&operation.to_le_bytes());
    hasher.update(&(records.len() as u64).to_le_bytes());
    hasher.update(records);
    *hasher.finalize().as_bytes()
}

/// What a statement certifies about its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutputsKind {
    /// What applying op `op` emitted for the destination ([`outputs_digest`]).
    Op,
    /// Chunk `chunk` of the legs in flight to the destination right after applying op `op`,
    /// a snapshot op ([`in_flight_digest`], [`in_flight_chunks`]): what lets a replica
    /// restored from a snapshot, which no longer has the ops below it, certify again the
    /// legs those ops emitted.
    InFlight {
        /// The chunk's index, from 0 per destination.
        chunk: u32,
    },
}

/// What identifies certified records at their destination: `(origin, op, kind)`.
pub type ProvenKey = (u32, u64, OutputsKind);

/// What a replica of `origin` says after executing op `op`: it sent `destination` the
/// records whose digest is `digest` ([`outputs_digest`]), or (an in-flight statement) it
/// had those legs in flight to `destination` right after op `op` ([`in_flight_digest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputsStatement {
    /// The group that executed the op (signed by its replicas).
    pub origin: u32,
    /// The group the records are for.
    pub destination: u32,
    /// The origin group's journal op.
    pub op: u64,
    /// Outputs of the op, or legs in flight after it.
    pub kind: OutputsKind,
    /// The records' digest for `kind`.
    pub digest: Digest,
}

/// The bytes one replica signs for one statement (their length depends on the kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementBytes {
    bytes: [u8; STATEMENT_SIGNING_BYTES_MAX],
    len: usize,
}

impl StatementBytes {
    /// The signed bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::ops::Deref for StatementBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl OutputsStatement {
    /// The exact bytes `replica` signs: [`OUTPUTS_SIGNING_DOMAIN`] `| origin | destination |
    /// replica | op | digest` for outputs, [`IN_FLIGHT_SIGNING_DOMAIN`] `| origin |
    /// destination | replica | op | chunk u32 | digest` for legs in flight.
    pub fn signing_bytes(&self, replica: u8) -> StatementBytes {
        let mut bytes = [0u8; STATEMENT_SIGNING_BYTES_MAX];
        let mut at = 0;
        let mut put = |part: &[u8]| {
            bytes[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        };
        match self.kind {
            OutputsKind::Op => put(OUTPUTS_SIGNING_DOMAIN),
            OutputsKind::InFlight { .. } => put(IN_FLIGHT_SIGNING_DOMAIN),
        }
        put(&self.origin.to_le_bytes());
        put(&self.destination.to_le_bytes());
        put(&[replica]);
        put(&self.op.to_le_bytes());
        if let OutputsKind::InFlight { chunk } = self.kind {
            put(&chunk.to_le_bytes());
        }
        put(&self.digest);
        debug_assert_eq!(
            at,
            match self.kind {
                OutputsKind::Op => OUTPUTS_SIGNING_BYTES,
                OutputsKind::InFlight { .. } => IN_FLIGHT_SIGNING_BYTES,
            }
        );
        StatementBytes { bytes, len: at }
    }

    /// The digest of `records` of `operation` under this statement's origin, destination,
    /// op and kind: what [`OutputsStatement::digest`] must be for them.
    pub fn digest_of(&self, operation: u16, records: &[u8]) -> Digest {
        match self.kind {
            OutputsKind::Op => {
                outputs_digest(self.origin, self.destination, self.op, operation, records)
            }
            OutputsKind::InFlight { chunk } => in_flight_digest(
                self.origin,
                self.destination,
                self.op,
                chunk,
                operation,
                records,
            ),
        }
    }
}

/// One replica's signed outputs statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputsVote {
    /// What it says.
    pub statement: OutputsStatement,
    /// The signer, a replica of `statement.origin`.
    pub replica: u8,
    /// ed25519 over [`OutputsStatement::signing_bytes`].
    pub signature: Signature,
}

impl OutputsVote {
    /// Signs `statement` as `replica`.
    pub fn sign(key: &SigningKey, replica: u8, statement: OutputsStatement) -> OutputsVote {
        OutputsVote {
            statement,
            replica,
            signature: key.sign(statement.signing_bytes(replica).as_slice()),
        }
    }
}

/// `quorum` signatures of the origin group's replicas over one outputs statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputsCert {
    /// The certified statement.
    pub statement: OutputsStatement,
    /// `(replica, signature)`, distinct replicas.
    pub signatures: Vec<(u8, Signature)>,
}

/// Records one group sent another, with the certificate that the sending group produced
/// them by executing a committed op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenOutputs {
    /// The certificate.
    pub cert: OutputsCert,
    /// The operation of the batch the records join at the destination.
    pub operation: u16,
    /// The records, whole, in the order the origin produced them.
    pub records: Vec<u8>,
}

impl ProvenOutputs {
    /// `(origin, op, kind)`: what identifies these outputs at their destination.
    pub fn key(&self) -> ProvenKey {
        let statement = &self.cert.statement;
        (statement.origin, statement.op, statement.kind)
    }
}

/// What a receiving group's leader proposes to apply internal records: one operation, the
/// leader's clock, and the proofs whose records make up the batch, in order.
///
/// Timestamps are not certified: the receiving group orders its own records in time. Every
/// replica stamps the certified records alike before applying them, from `now_ns` and its
/// replicated state only (as the ledger's `prepare` would with nothing pending:
/// `max(min(now_ns, TIMESTAMP_MAX), last committed timestamp + 1)`, then one apart), which
/// is why a leg's fingerprint and its acknowledgement's match leave the timestamp out. A
/// Byzantine leader chooses `now_ns` as it chooses a client batch's timestamps, and nothing
/// more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvenBatch {
    /// The internal operation (every proof's).
    pub operation: u16,
    /// The proposing leader's clock (ns).
    pub now_ns: u64,
    /// The proofs, distinct `(origin, op, kind)`.
    pub proofs: Vec<ProvenOutputs>,
}

impl ProvenBatch {
    /// Records in the batch (`record_bytes` each).
    pub fn record_count(&self, record_bytes: usize) -> usize {
        self.proofs
            .iter()
            .map(|proof| proof.records.len() / record_bytes)
            .sum()
    }
}

/// The committees of every group of the cluster: the same replicas and keys, a different
/// group signed into every statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    committees: Vec<Committee>,
}

impl Groups {
    /// One committee per group `0..group_count`.
    pub fn new(
        group_count: u32,
        faults_max: u8,
        keys: &[VerifyingKey],
    ) -> Result<Groups, XShardError> {
        if group_count == 0 || group_count as usize > GROUPS_MAX {
            return Err(XShardError::OutOfRange("group count"));
        }
        let committees = (0..group_count)
            .map(|group| Committee::new(group, faults_max, keys.to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Groups { committees })
    }

    /// Groups in the cluster.
    pub fn group_count(&self) -> u32 {
        self.committees.len() as u32
    }

    /// The committee of `group`.
    pub fn committee(&self, group: u32) -> Result<&Committee, XShardError> {
        self.committees
            .get(group as usize)
            .ok_or(XShardError::UnknownGroup(group))
    }

    /// Checks the statement's groups: both known, and different.
    fn check_route(&self, statement: &OutputsStatement) -> Result<(), XShardError> {
        self.committee(statement.origin)?;
        self.committee(statement.destination)?;
        if statement.origin == statement.destination {
            return Err(XShardError::SameGroup(statement.origin));
        }
        Ok(())
    }

    /// Checks one vote: known groups, a signer of the origin group, a strict signature.
    pub fn verify_vote(&self, vote: &OutputsVote) -> Result<(), XShardError> {
        self.check_route(&vote.statement)?;
        let committee = self.committee(vote.statement.origin)?;
        verify_signature(committee, &vote.statement, vote.replica, &vote.signature)
    }

    /// Checks a certificate: `quorum..=n` strict signatures of distinct replicas of the
    /// origin group over the statement.
    pub fn verify_cert(&self, cert: &OutputsCert) -> Result<(), XShardError> {
        self.check_route(&cert.statement)?;
        let committee = self.committee(cert.statement.origin)?;
        let (quorum, replicas) = (committee.quorum(), usize::from(committee.replica_count()));
        let signers = cert.signatures.len();
        if signers < quorum || signers > replicas {
            return Err(XShardError::SignerCount {
                signers,
                quorum,
                replicas,
            });
        }
        let mut seen = 0u8;
        for (replica, signature) in &cert.signatures {
            if *replica >= committee.replica_count() {
                return Err(XShardError::UnknownSigner(*replica));
            }
            if seen & (1 << replica) != 0 {
                return Err(XShardError::DuplicateSigner(*replica));
            }
            seen |= 1 << replica;
            verify_signature(committee, &cert.statement, *replica, signature)?;
        }
        Ok(())
    }

    /// The acceptance rule of one proof at group `receiver`: addressed to it, whole records
    /// (`record_bytes` each) within the limit and at most `records_max` of them (the
    /// receiver's batch cap: a bigger proof fits no batch), that hash to the certified
    /// digest, and a valid certificate of the origin group. Digest first: forged records
    /// cost a hash, not `quorum` signature checks.
    pub fn verify_proven(
        &self,
        proof: &ProvenOutputs,
        receiver: u32,
        record_bytes: usize,
        records_max: usize,
    ) -> Result<(), XShardError> {
        assert!(record_bytes > 0);
        let statement = &proof.cert.statement;
        if statement.destination != receiver {
            return Err(XShardError::WrongDestination {
                destination: statement.destination,
                receiver,
            });
        }
        let bytes = proof.records.len();
        if bytes == 0 || !bytes.is_multiple_of(record_bytes) || bytes > OUTPUT_RECORDS_BYTES_MAX {
            return Err(XShardError::RecordBytes(bytes));
        }
        let records = bytes / record_bytes;
        if records > records_max {
            return Err(XShardError::ProofRecords {
                records,
                records_max,
            });
        }
        if statement.digest_of(proof.operation, &proof.records) != statement.digest {
            return Err(XShardError::DigestMismatch {
                origin: statement.origin,
                op: statement.op,
            });
        }
        self.verify_cert(&proof.cert)
    }

    /// The acceptance rule of a proven batch at group `receiver`, applied alike by a backup
    /// before it votes for the proposal and by every replica before it applies it: 1 to
    /// [`PROVEN_BATCH_PROOFS_MAX`] proofs, each of the batch's operation, distinct
    /// `(origin, op)`, each valid ([`Groups::verify_proven`]), at most `records_max` records
    /// in all.
    pub fn verify_batch(
        &self,
        batch: &ProvenBatch,
        receiver: u32,
        record_bytes: usize,
        records_max: usize,
    ) -> Result<(), XShardError> {
        if batch.proofs.is_empty() || batch.proofs.len() > PROVEN_BATCH_PROOFS_MAX {
            return Err(XShardError::OutOfRange("proofs per batch"));
        }
        let mut records = 0usize;
        for (index, proof) in batch.proofs.iter().enumerate() {
            if proof.operation != batch.operation {
                return Err(XShardError::OperationMismatch {
                    batch: batch.operation,
                    proof: proof.operation,
                });
            }
            let key = proof.key();
            if batch.proofs[..index].iter().any(|other| other.key() == key) {
                return Err(XShardError::DuplicateProof {
                    origin: key.0,
                    op: key.1,
                });
            }
            records += proof.records.len() / record_bytes.max(1);
            if records > records_max {
                return Err(XShardError::OutOfRange("records per batch"));
            }
            self.verify_proven(proof, receiver, record_bytes, records_max)?;
        }
        Ok(())
    }

    /// The acceptance rule on the committed (or proposed) bytes themselves: a proven batch
    /// ([`is_proven_batch`]) that decodes and passes [`Groups::verify_batch`]. A backup of
    /// `receiver` applies it before it votes for a proposal holding internal records (a
    /// refusal is the leader's misbehaviour: no vote, so no progress, and the view changes),
    /// and every replica applies it again before applying the records (a batch that fails
    /// is skipped alike by every correct replica, like any invalid committed batch).
    pub fn verify_batch_bytes(
        &self,
        bytes: &[u8],
        receiver: u32,
        record_bytes: usize,
        records_max: usize,
    ) -> Result<ProvenBatch, XShardError> {
        if !is_proven_batch(bytes) {
            return Err(XShardError::Malformed("not a proven batch"));
        }
        let batch = decode_batch(bytes)?;
        self.verify_batch(&batch, receiver, record_bytes, records_max)?;
        Ok(batch)
    }
}

fn verify_signature(
    committee: &Committee,
    statement: &OutputsStatement,
    replica: u8,
    signature: &Signature,
) -> Result<(), XShardError> {
    let key = committee
        .key(replica)
        .ok_or(XShardError::UnknownSigner(replica))?;
    key.verify_strict(statement.signing_bytes(replica).as_slice(), signature)
        .map_err(|_| XShardError::BadSignature(replica))
}

/// Whether batch bytes are a proven batch (a client batch has its format, 0 or 1, where
/// this has [`PROVEN_BATCH_MARK`]).
pub fn is_proven_batch(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && u16::from_le_bytes([bytes[2], bytes[3]]) == PROVEN_BATCH_MARK
}

impl XShardError {
    /// The rule broken, without the values: what a refused proposal reports
    /// ([`RequestAuthError::Proven`]).
    pub fn rule(&self) -> &'static str {
        match self {
            XShardError::UnknownGroup(_) => "unknown group",
            XShardError::SameGroup(_) => "origin is the destination",
            XShardError::WrongDestination { .. } => "addressed to another group",
            XShardError::WrongOrigin { .. } => "about another group's outputs",
            XShardError::UnknownSigner(_) => "unknown signer",
            XShardError::BadSignature(_) => "bad outputs signature",
            XShardError::DuplicateSigner(_) => "signer twice in a certificate",
            XShardError::SignerCount { .. } => "signer count",
            XShardError::DigestMismatch { .. } => "records do not match the certified digest",
            XShardError::RecordBytes(_) => "records not whole",
            XShardError::ProofRecords { .. } => "more records than a batch holds",
            XShardError::OperationMismatch { .. } => "proof of another operation",
            XShardError::DuplicateProof { .. } => "proof twice in a batch",
            XShardError::OutOfRange(what) | XShardError::Malformed(what) => what,
            XShardError::NotProduced { .. } => "outputs not produced here",
            XShardError::Diverged { .. } => "outputs diverged",
            XShardError::Full(what) => what,
            XShardError::Stale => "stale",
            XShardError::Committee(_) => "committee",
        }
    }
}

/// One op's outputs to one destination group: what [`OutputsCollector::on_produced`]
/// takes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedOutputs {
    /// The destination group.
    pub destination: u32,
    /// The operation of the batch the records join there.
    pub operation: u16,
    /// The records, in the order the op emitted them.
    pub records: Vec<u8>,
}

/// Groups what applying one op emitted (the state machine's `poll_outbound`, drained in
/// order) by destination, into `out` (cleared first) in ascending destination order, each
/// destination's records in emission order: a deterministic function of the op's outputs,
/// so every correct replica signs the same statements. Refuses a destination that would
/// get records of two operations in one op (one statement certifies one operation) and
/// outputs over [`OUTPUT_RECORDS_BYTES_MAX`] for one destination; `out` is then
/// unspecified.
pub fn outputs_by_destination<O: Into<u16>, R: bytemuck::Pod>(
    outbound: impl IntoIterator<Item = Outbound<O, R>>,
    out: &mut Vec<ProducedOutputs>,
) -> Result<(), XShardError> {
    out.clear();
    for each in outbound {
        let operation: u16 = each.operation.into();
        let at = match out.binary_search_by_key(&each.shard, |produced| produced.destination) {
            Ok(at) => at,
            Err(at) => {
                out.insert(
                    at,
                    ProducedOutputs {
                        destination: each.shard,
                        operation,
                        records: Vec::new(),
                    },
                );
                at
            }
        };
        let produced = &mut out[at];
        if produced.operation != operation {
            return Err(XShardError::OperationMismatch {
                proof: operation,
                batch: produced.operation,
            });
        }
        let record = bytemuck::bytes_of(&each.record);
        if produced.records.len() + record.len() > OUTPUT_RECORDS_BYTES_MAX {
            return Err(XShardError::RecordBytes(
                produced.records.len() + record.len(),
            ));
        }
        produced.records.extend_from_slice(record);
    }
    Ok(())
}

/// Chunk `chunk` of the legs in flight from this group to `destination` at one snapshot op:
/// what [`OutputsCollector::on_in_flight`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightChunk {
    /// The destination group.
    pub destination: u32,
    /// The chunk's index, from 0 per destination.
    pub chunk: u32,
    /// The operation of the batch the legs join there.
    pub operation: u16,
    /// The legs, whole records, in the order given.
    pub records: Vec<u8>,
}

/// Records of one in-flight chunk at most: whole records of `record_bytes` bytes within
/// [`OUTPUT_RECORDS_BYTES_MAX`], and at most `records_max`, the batch cap, so that the
/// destination can propose any chunk in one proven batch ([`Groups::verify_proven`] refuses
/// a bigger proof). The batch cap must be the same at every replica of the cluster (the
/// acceptance rule of proven batches assumes it too), or replicas cut different chunks and
/// none is certified.
pub fn in_flight_chunk_records_max(record_bytes: usize, records_max: usize) -> usize {
    assert!(record_bytes > 0 && record_bytes <= OUTPUT_RECORDS_BYTES_MAX);
    assert!(records_max > 0);
    (OUTPUT_RECORDS_BYTES_MAX / record_bytes).min(records_max)
}

/// Cuts the legs a state machine has in flight (its `unconfirmed_outbound`, oldest leg
/// first) into the chunks of in-flight statements, into `out` (cleared first): ascending
/// destination; per destination the legs in the order given, cut into chunks `0, 1, ...` of
/// at most [`in_flight_chunk_records_max`] records (`records_max` is the batch cap), each
/// full but the last. A deterministic function of the in-flight set (replicated state) and
/// the batch cap, so every correct replica that holds the same state signs the same
/// statements. A destination that would get legs of two operations is refused (one
/// statement certifies one operation); `out` is then unspecified.
pub fn in_flight_chunks<O: Into<u16>, R: bytemuck::Pod>(
    in_flight: impl IntoIterator<Item = Outbound<O, R>>,
    records_max: usize,
    out: &mut Vec<InFlightChunk>,
) -> Result<(), XShardError> {
    out.clear();
    let record_bytes = size_of::<R>();
    // Whole records per chunk: a chunk never splits a record.
    let chunk_bytes_max = in_flight_chunk_records_max(record_bytes, records_max) * record_bytes;
    for each in in_flight {
        let operation: u16 = each.operation.into();
        let record = bytemuck::bytes_of(&each.record);
        // The last chunk of this destination (chunks of one destination are adjacent).
        let end = out.partition_point(|chunk| chunk.destination <= each.shard);
        let last = end
            .checked_sub(1)
            .filter(|at| out[*at].destination == each.shard);
        let at = match last {
            Some(at) if out[at].records.len() + record.len() <= chunk_bytes_max => at,
            Some(at) => {
                let chunk = out[at].chunk + 1;
                out.insert(
                    at + 1,
                    InFlightChunk {
                        destination: each.shard,
                        chunk,
                        operation: out[at].operation,
                        records: Vec::new(),
                    },
                );
                at + 1
            }
            None => {
                out.insert(
                    end,
                    InFlightChunk {
                        destination: each.shard,
                        chunk: 0,
                        operation,
                        records: Vec::new(),
                    },
                );
                end
            }
        };
        let chunk = &mut out[at];
        if chunk.operation != operation {
            return Err(XShardError::OperationMismatch {
                proof: operation,
                batch: chunk.operation,
            });
        }
        chunk.records.extend_from_slice(record);
        debug_assert!(chunk.records.len() <= chunk_bytes_max);
    }
    Ok(())
}

/// Most chunks [`in_flight_chunks`] cuts from at most `legs_max` legs of `record_bytes`
/// bytes, at a batch cap of `records_max` records, for `destinations` groups: one partial
/// chunk per destination at most, plus the full ones. What a collector's in-flight room per
/// checkpoint must hold.
pub fn in_flight_chunks_max(
    legs_max: usize,
    (record_bytes, records_max): (usize, usize),
    destinations: usize,
) -> usize {
    let per_chunk = in_flight_chunk_records_max(record_bytes, records_max);
    legs_max / per_chunk + destinations.min(legs_max)
}

/// The proposal check of a replica of group `receiver` once it takes other groups'
/// outputs: a proven batch ([`is_proven_batch`]) carries no client signature and must pass
/// [`Groups::verify_batch_bytes`] for this group; every other batch goes to `client` (the
/// client-signature check, [`super::RequestVerifier`]). A pure function of the bytes and
/// the public keys, so every correct replica decides alike; a refusal is
/// [`RequestAuthError::Proven`].
#[derive(Debug)]
pub struct SignedOrProven<C> {
    client: C,
    groups: Groups,
    receiver: u32,
    record_bytes: usize,
    records_max: usize,
}

impl<C: ProposalCheck> SignedOrProven<C> {
    /// The check of group `receiver`, whose batches hold at most `records_max` records of
    /// `record_bytes` bytes.
    pub fn new(
        client: C,
        groups: Groups,
        receiver: u32,
        record_bytes: usize,
        records_max: usize,
    ) -> Result<SignedOrProven<C>, XShardError> {
        groups.committee(receiver)?;
        if record_bytes == 0 || records_max == 0 {
            return Err(XShardError::OutOfRange("batch limits"));
        }
        Ok(SignedOrProven {
            client,
            groups,
            receiver,
            record_bytes,
            records_max,
        })
    }
}

impl<C: ProposalCheck> ProposalCheck for SignedOrProven<C> {
    fn check_proposal(&mut self, batch: &[u8], digest: &Digest) -> Result<(), RequestAuthError> {
        if !is_proven_batch(batch) {
            return self.client.check_proposal(batch, digest);
        }
        self.groups
            .verify_batch_bytes(batch, self.receiver, self.record_bytes, self.records_max)
            .map(|_| ())
            .map_err(|error| RequestAuthError::Proven(error.rule()))
    }
}

/// A replica's message about cross-group outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XShardMessage {
    /// A replica of the origin group to its group's peers: its outputs vote.
    Vote(OutputsVote),
    /// A replica of the origin group to the destination group: certified outputs.
    Proven(ProvenOutputs),
}

const TAG_VOTE: u8 = 1;
const TAG_PROVEN: u8 = 2;

/// Appends the encoding of `message` to `out`:
/// `tag u8 | vote` or `tag u8 | proven`, with
/// `statement = origin u32 | destination u32 | op u64 | kind u8 | [chunk u32, in-flight
/// kind only] | digest [32]`,
/// `vote = statement | replica u8 | signature [64]`,
/// `cert = statement | count u8 | (replica u8 | signature [64])*`,
/// `proven = cert | operation u16 | length u32 | records`, all little-endian.
pub fn encode_message(message: &XShardMessage, out: &mut Vec<u8>) {
    match message {
        XShardMessage::Vote(vote) => {
            out.push(TAG_VOTE);
            put_statement(out, &vote.statement);
            out.push(vote.replica);
            out.extend_from_slice(&vote.signature.to_bytes());
        }
        XShardMessage::Proven(proof) => {
            out.push(TAG_PROVEN);
            put_proven(out, proof);
        }
    }
}

/// Decodes one message; refuses unknown tags, counts above their limits and trailing
/// bytes. Checks the shape only: [`Groups`] checks signatures and digests.
pub fn decode_message(bytes: &[u8]) -> Result<XShardMessage, XShardError> {
    let mut reader = Reader { bytes, at: 0 };
    let message = match reader.u8()? {
        TAG_VOTE => {
            let statement = reader.statement()?;
            let replica = reader.u8()?;
            let signature = Signature::from_bytes(&reader.array::<64>()?);
            XShardMessage::Vote(OutputsVote {
                statement,
                replica,
                signature,
            })
        }
        TAG_PROVEN => XShardMessage::Proven(reader.proven()?),
        _ => return Err(XShardError::Malformed("unknown tag")),
    };
    reader.finish()?;
    Ok(message)
}

/// Appends the batch bytes of `batch`:
/// `operation u16 | PROVEN_BATCH_MARK u16 | count u16 | now_ns u64 | proven*`.
pub fn encode_batch(batch: &ProvenBatch, out: &mut Vec<u8>) {
    assert!(batch.proofs.len() <= PROVEN_BATCH_PROOFS_MAX);
    out.extend_from_slice(&batch.operation.to_le_bytes());
    out.extend_from_slice(&PROVEN_BATCH_MARK.to_le_bytes());
    out.extend_from_slice(&(batch.proofs.len() as u16).to_le_bytes());
    out.extend_from_slice(&batch.now_ns.to_le_bytes());
    for proof in &batch.proofs {
        put_proven(out, proof);
    }
}

/// Decodes batch bytes written by [`encode_batch`] (shape only; see [`Groups::verify_batch`]).
pub fn decode_batch(bytes: &[u8]) -> Result<ProvenBatch, XShardError> {
    let mut reader = Reader { bytes, at: 0 };
    let operation = reader.u16()?;
    if reader.u16()? != PROVEN_BATCH_MARK {
        return Err(XShardError::Malformed("not a proven batch"));
    }
    let count = usize::from(reader.u16()?);
    if count == 0 || count > PROVEN_BATCH_PROOFS_MAX {
        return Err(XShardError::OutOfRange("proofs per batch"));
    }
    let now_ns = reader.u64()?;
    let mut proofs = Vec::with_capacity(count);
    for _ in 0..count {
        proofs.push(reader.proven()?);
    }
    reader.finish()?;
    Ok(ProvenBatch {
        operation,
        now_ns,
        proofs,
    })
}

const KIND_OP: u8 = 0;
const KIND_IN_FLIGHT: u8 = 1;

fn put_statement(out: &mut Vec<u8>, statement: &OutputsStatement) {
    out.extend_from_slice(&statement.origin.to_le_bytes());
    out.extend_from_slice(&statement.destination.to_le_bytes());
    out.extend_from_slice(&statement.op.to_le_bytes());
    match statement.kind {
        OutputsKind::Op => out.push(KIND_OP),
        OutputsKind::InFlight { chunk } => {
            out.push(KIND_IN_FLIGHT);
            out.extend_from_slice(&chunk.to_le_bytes());
        }
    }
    out.extend_from_slice(&statement.digest);
}

fn put_proven(out: &mut Vec<u8>, proof: &ProvenOutputs) {
    assert!(proof.cert.signatures.len() <= REPLICA_COUNT_MAX);
    assert!(proof.records.len() <= OUTPUT_RECORDS_BYTES_MAX);
    put_statement(out, &proof.cert.statement);
    out.push(proof.cert.signatures.len() as u8);
    for (replica, signature) in &proof.cert.signatures {
        out.push(*replica);
        out.extend_from_slice(&signature.to_bytes());
    }
    out.extend_from_slice(&proof.operation.to_le_bytes());
    out.extend_from_slice(&(proof.records.len() as u32).to_le_bytes());
    out.extend_from_slice(&proof.records);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], XShardError> {
        let end = self
            .at
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(XShardError::Malformed("truncated"))?;
        let part = &self.bytes[self.at..end];
        self.at = end;
        Ok(part)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], XShardError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, XShardError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, XShardError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, XShardError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, XShardError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn statement(&mut self) -> Result<OutputsStatement, XShardError> {
        let (origin, destination, op) = (self.u32()?, self.u32()?, self.u64()?);
        let kind = match self.u8()? {
            KIND_OP => OutputsKind::Op,
            KIND_IN_FLIGHT => OutputsKind::InFlight { chunk: self.u32()? },
            _ => return Err(XShardError::Malformed("unknown statement kind")),
        };
        Ok(OutputsStatement {
            origin,
            destination,
            op,
            kind,
            digest: self.array()?,
        })
    }

    fn proven(&mut self) -> Result<ProvenOutputs, XShardError> {
        let statement = self.statement()?;
        let count = usize::from(self.u8()?);
        if count > REPLICA_COUNT_MAX {
            return Err(XShardError::OutOfRange("signatures per certificate"));
        }
        let mut signatures = Vec::with_capacity(count);
        for _ in 0..count {
            let replica = self.u8()?;
            signatures.push((replica, Signature::from_bytes(&self.array::<64>()?)));
        }
        let operation = self.u16()?;
        let length = self.u32()? as usize;
        if length > OUTPUT_RECORDS_BYTES_MAX {
            return Err(XShardError::RecordBytes(length));
        }
        let records = self.take(length)?.to_vec();
        Ok(ProvenOutputs {
            cert: OutputsCert {
                statement,
                signatures,
            },
            operation,
            records,
        })
    }

    fn finish(&self) -> Result<(), XShardError> {
        if self.at != self.bytes.len() {
            return Err(XShardError::Malformed("trailing bytes"));
        }
        Ok(())
    }
}

/// What an [`OutputsCollector`] asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XShardAction {
    /// Send this replica's vote to every other replica of its group.
    Broadcast(OutputsVote),
    /// Send this replica's vote to replica `to` of its group (the answer to `to`'s first
    /// vote, so a replica that executed later than this one need not wait for a resend).
    Send {
        /// The peer.
        to: u8,
        /// The vote.
        vote: OutputsVote,
    },
    /// Hand certified outputs to the destination group: to this node's replica of it,
    /// which checks them and keeps them until its group commits them
    /// ([`InboundProofs`]). Every correct replica of the origin group does this, so a
    /// Byzantine leader of either group cannot keep outputs from their destination.
    Deliver(ProvenOutputs),
}

/// Limits of an [`OutputsCollector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectorConfig {
    /// The collecting replica's group (the origin of what it signs).
    pub group: u32,
    /// The collecting replica.
    pub replica: u8,
    /// Outputs of ops kept at once, collecting or certified and not yet released. Must be
    /// at least the number of ops that can have unacknowledged legs (the ledger's
    /// `credit_legs_in_flight_max` bounds it), or a full collector stalls legs.
    pub outputs_kept_max: usize,
    /// In-flight chunks one snapshot op may produce ([`in_flight_chunks_max`] of the
    /// ledger's in-flight window); the collector keeps those of
    /// [`IN_FLIGHT_CHECKPOINTS_KEPT`] snapshot ops.
    pub in_flight_chunks_max: usize,
    /// Interval at which an uncertified vote is broadcast again and certified outputs are
    /// delivered again until released (µs).
    pub resend_interval_us: u64,
    /// How long after it was produced a certified in-flight chunk is first delivered (µs).
    /// Its legs were normally certified and delivered by their ops' outputs already, which
    /// settle it long before; only a chunk still unsettled this late travels.
    pub in_flight_deliver_after_us: u64,
}

/// Counters of an [`OutputsCollector`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CollectorMetrics {
    /// Outputs statements this replica signed.
    pub votes_signed: u64,
    /// Peers' votes accepted.
    pub votes_accepted: u64,
    /// Peers' votes refused (bad signature, unknown signer, other group, another digest).
    pub votes_refused: u64,
    /// Votes for outputs not produced here yet (dropped; the sender resends).
    pub votes_early: u64,
    /// Outputs certified here.
    pub certified: u64,
    /// Deliveries of certified outputs, first and resent.
    pub deliveries: u64,
    /// Outputs produced while the collector was full (refused; the caller counts them).
    pub full: u64,
    /// In-flight statements this replica signed (also counted in `votes_signed`).
    pub in_flight_signed: u64,
    /// In-flight chunks certified here (also counted in `certified`).
    pub in_flight_certified: u64,
    /// Deliveries of certified in-flight chunks (also counted in `deliveries`).
    pub in_flight_deliveries: u64,
}

#[derive(Debug)]
struct Outputs {
    statement: OutputsStatement,
    operation: u16,
    records: Vec<u8>,
    own: OutputsVote,
    signatures: [Option<Signature>; REPLICA_COUNT_MAX],
    signers: u8,
    certified: bool,
    resend_at_us: u64,
    produced_at_us: u64,
    /// Not delivered before this (µs): when produced for outputs of an op, later for an
    /// in-flight chunk.
    deliver_at_us: u64,
}

/// `(destination, op, kind)`: how a collector files what it signed.
type CollectorKey = (u32, u64, OutputsKind);

/// The sending side: signs this replica's outputs statement for each op's outputs to each
/// destination, and its in-flight statements at each snapshot op, collects its group's
/// matching votes into a certificate, and delivers the certified records until the driver
/// releases them (legs: once their acknowledgement is applied; acknowledgements: once
/// delivered). Sans-IO; at most `outputs_kept_max` outputs of ops and
/// [`IN_FLIGHT_CHECKPOINTS_KEPT`] `× in_flight_chunks_max` in-flight chunks, a vote per
/// replica each.
#[derive(Debug)]
pub struct OutputsCollector {
    config: CollectorConfig,
    groups: Groups,
    key: SigningKey,
    kept: BTreeMap<CollectorKey, Outputs>,
    /// In-flight chunks among `kept`.
    in_flight_kept: usize,
    /// The snapshot ops whose in-flight chunks are kept, ascending.
    in_flight_checkpoints: VecDeque<u64>,
    metrics: CollectorMetrics,
}

impl OutputsCollector {
    /// A collector for `config.replica` of `config.group`, signing with `key` (which must
    /// be that replica's key in `groups`).
    pub fn new(
        config: CollectorConfig,
        groups: Groups,
        key: SigningKey,
    ) -> Result<OutputsCollector, XShardError> {
        let committee = groups.committee(config.group)?;
        if committee.key(config.replica) != Some(&key.verifying_key()) {
            return Err(XShardError::Committee(BftError::KeyMismatch(
                config.replica,
            )));
        }
        if config.outputs_kept_max == 0
            || config.in_flight_chunks_max == 0
            || config.resend_interval_us == 0
        {
            return Err(XShardError::OutOfRange("collector limits"));
        }
        Ok(OutputsCollector {
            kept: BTreeMap::new(),
            in_flight_kept: 0,
            in_flight_checkpoints: VecDeque::with_capacity(IN_FLIGHT_CHECKPOINTS_KEPT + 1),
            config,
            groups,
            key,
            metrics: CollectorMetrics::default(),
        })
    }

    /// Counters.
    pub fn metrics(&self) -> CollectorMetrics {
        self.metrics
    }

    /// Outputs and in-flight chunks kept (collecting or certified, not released).
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Outputs of ops kept (what `outputs_kept_max` bounds).
    pub fn outputs_kept(&self) -> usize {
        self.kept.len() - self.in_flight_kept
    }

    /// In-flight chunks kept.
    pub fn in_flight_kept(&self) -> usize {
        self.in_flight_kept
    }

    /// Op `op` of this group, executed here, produced `records` (whole records, in order)
    /// of `operation` for `destination`: sign and broadcast this replica's vote. Producing
    /// the same outputs again (a replay after restart) is `Stale`; different records for
    /// the same op are `Diverged` (a bug).
    pub fn on_produced(
        &mut self,
        now_us: u64,
        op: u64,
        destination: u32,
        operation: u16,
        records: Vec<u8>,
        actions: &mut Vec<XShardAction>,
    ) -> Result<(), XShardError> {
        let produced = ProducedOutputs {
            destination,
            operation,
            records,
        };
        self.sign(now_us, op, OutputsKind::Op, produced, actions)
    }

    /// This replica applied snapshot op `checkpoint_op` (or restored the snapshot taken
    /// there) and had `chunks` in flight then ([`in_flight_chunks`] of its state right after
    /// that op): sign and broadcast an in-flight statement per chunk. Certified chunks are
    /// delivered only from `in_flight_deliver_after_us` on, and only while unsettled. The
    /// chunks of the newest [`IN_FLIGHT_CHECKPOINTS_KEPT`] snapshot ops are kept: older
    /// ones go (every leg still in flight then is in the newer chunks too). Returns how
    /// many chunks were signed; the chunks of a snapshot op older than every kept one, or
    /// more than `in_flight_chunks_max` of them, are refused (`Stale`, `Full`), and a chunk
    /// signed already is skipped.
    pub fn on_in_flight(
        &mut self,
        now_us: u64,
        checkpoint_op: u64,
        chunks: Vec<InFlightChunk>,
        actions: &mut Vec<XShardAction>,
    ) -> Result<usize, XShardError> {
        if chunks.len() > self.config.in_flight_chunks_max {
            self.metrics.full += 1;
            return Err(XShardError::Full("in-flight chunks"));
        }
        if !self.in_flight_checkpoints.contains(&checkpoint_op) {
            if self.in_flight_checkpoints.len() == IN_FLIGHT_CHECKPOINTS_KEPT
                && self.in_flight_checkpoints.front() > Some(&checkpoint_op)
            {
                return Err(XShardError::Stale);
            }
            let at = self
                .in_flight_checkpoints
                .partition_point(|op| *op < checkpoint_op);
            self.in_flight_checkpoints.insert(at, checkpoint_op);
            while self.in_flight_checkpoints.len() > IN_FLIGHT_CHECKPOINTS_KEPT {
                let oldest = self.in_flight_checkpoints.pop_front().expect("not empty");
                self.forget_in_flight(oldest);
            }
        }
        let mut signed = 0;
        for chunk in chunks {
            let kind = OutputsKind::InFlight { chunk: chunk.chunk };
            let produced = ProducedOutputs {
                destination: chunk.destination,
                operation: chunk.operation,
                records: chunk.records,
            };
            match self.sign(now_us, checkpoint_op, kind, produced, actions) {
                Ok(()) => signed += 1,
                Err(XShardError::Stale) => {}
                Err(error) => return Err(error),
            }
        }
        debug_assert!(
            self.in_flight_kept <= IN_FLIGHT_CHECKPOINTS_KEPT * self.config.in_flight_chunks_max
        );
        Ok(signed)
    }

    fn forget_in_flight(&mut self, checkpoint_op: u64) {
        let before = self.kept.len();
        self.kept
            .retain(|(_, op, kind), _| *op != checkpoint_op || matches!(kind, OutputsKind::Op));
        self.in_flight_kept -= before - self.kept.len();
    }

    fn sign(
        &mut self,
        now_us: u64,
        op: u64,
        kind: OutputsKind,
        produced: ProducedOutputs,
        actions: &mut Vec<XShardAction>,
    ) -> Result<(), XShardError> {
        let ProducedOutputs {
            destination,
            operation,
            records,
        } = produced;
        let origin = self.config.group;
        let mut statement = OutputsStatement {
            origin,
            destination,
            op,
            kind,
            digest: [0; 32],
        };
        statement.digest = statement.digest_of(operation, &records);
        self.groups.check_route(&statement)?;
        if records.is_empty() || records.len() > OUTPUT_RECORDS_BYTES_MAX {
            return Err(XShardError::RecordBytes(records.len()));
        }
        let key = (destination, op, kind);
        if let Some(held) = self.kept.get(&key) {
            if held.statement == statement {
                return Err(XShardError::Stale);
            }
            return Err(XShardError::Diverged { destination, op });
        }
        if kind == OutputsKind::Op && self.outputs_kept() >= self.config.outputs_kept_max {
            self.metrics.full += 1;
            return Err(XShardError::Full("outputs collector"));
        }
        let own = OutputsVote::sign(&self.key, self.config.replica, statement);
        self.metrics.votes_signed += 1;
        let deliver_at_us = match kind {
            OutputsKind::Op => now_us,
            OutputsKind::InFlight { .. } => {
                self.metrics.in_flight_signed += 1;
                self.in_flight_kept += 1;
                now_us.saturating_add(self.config.in_flight_deliver_after_us)
            }
        };
        let mut signatures = [None; REPLICA_COUNT_MAX];
        signatures[usize::from(self.config.replica)] = Some(own.signature);
        let outputs = Outputs {
            statement,
            operation,
            records,
            own,
            signatures,
            signers: 1 << self.config.replica,
            certified: false,
            resend_at_us: now_us + self.config.resend_interval_us,
            produced_at_us: now_us,
            deliver_at_us,
        };
        self.kept.insert(key, outputs);
        actions.push(XShardAction::Broadcast(own));
        self.try_certify(key, actions);
        Ok(())
    }

    /// A peer's vote. Kept only for outputs produced here with the same digest; its first
    /// vote for those outputs is answered with this replica's.
    pub fn on_vote(
        &mut self,
        vote: OutputsVote,
        actions: &mut Vec<XShardAction>,
    ) -> Result<(), XShardError> {
        let result = self.accept_vote(vote, actions);
        match &result {
            Ok(()) => self.metrics.votes_accepted += 1,
            Err(XShardError::NotProduced { .. }) => self.metrics.votes_early += 1,
            Err(XShardError::Stale) => {}
            Err(_) => self.metrics.votes_refused += 1,
        }
        result
    }

    fn accept_vote(
        &mut self,
        vote: OutputsVote,
        actions: &mut Vec<XShardAction>,
    ) -> Result<(), XShardError> {
        let statement = vote.statement;
        if statement.origin != self.config.group {
            return Err(XShardError::WrongOrigin {
                origin: statement.origin,
                collector: self.config.group,
            });
        }
        let key = (statement.destination, statement.op, statement.kind);
        let Some(held) = self.kept.get(&key) else {
            return Err(XShardError::NotProduced {
                destination: statement.destination,
                op: statement.op,
            });
        };
        if vote.replica >= REPLICA_COUNT_MAX as u8 {
            return Err(XShardError::UnknownSigner(vote.replica));
        }
        if held.signers & (1 << vote.replica) != 0 {
            return Err(XShardError::Stale);
        }
        self.groups.verify_vote(&vote)?;
        if held.statement != statement {
            // Validly signed for other records of a committed op (or another in-flight set
            // at a snapshot op): only a Byzantine replica (or more than f faults) can do that.
            return Err(XShardError::DigestMismatch {
                origin: statement.origin,
                op: statement.op,
            });
        }
        let held = self.kept.get_mut(&key).expect("looked up above");
        held.signatures[usize::from(vote.replica)] = Some(vote.signature);
        held.signers |= 1 << vote.replica;
        actions.push(XShardAction::Send {
            to: vote.replica,
            vote: held.own,
        });
        self.try_certify(key, actions);
        Ok(())
    }

    fn try_certify(&mut self, key: CollectorKey, actions: &mut Vec<XShardAction>) {
        let quorum = self
            .groups
            .committee(self.config.group)
            .expect("checked at construction")
            .quorum();
        let held = self.kept.get_mut(&key).expect("kept");
        if held.certified || (held.signers.count_ones() as usize) < quorum {
            return;
        }
        held.certified = true;
        self.metrics.certified += 1;
        if let OutputsKind::InFlight { .. } = key.2 {
            // Delivered by `on_tick` once due, if the driver has not released it by then.
            self.metrics.in_flight_certified += 1;
            held.resend_at_us = held.resend_at_us.max(held.deliver_at_us);
            return;
        }
        self.metrics.deliveries += 1;
        actions.push(XShardAction::Deliver(proven(held, quorum)));
    }

    /// Resends what is due: an uncertified vote is broadcast again, certified outputs are
    /// delivered again (their destination may have lost them, or committed them under a
    /// leader that later withheld the acknowledgement), certified in-flight chunks from
    /// their delivery time on.
    pub fn on_tick(&mut self, now_us: u64, actions: &mut Vec<XShardAction>) {
        let quorum = self
            .groups
            .committee(self.config.group)
            .expect("checked at construction")
            .quorum();
        for held in self.kept.values_mut() {
            if held.resend_at_us > now_us {
                continue;
            }
            held.resend_at_us = now_us + self.config.resend_interval_us;
            if !held.certified {
                actions.push(XShardAction::Broadcast(held.own));
            } else if held.deliver_at_us <= now_us {
                self.metrics.deliveries += 1;
                if let OutputsKind::InFlight { .. } = held.statement.kind {
                    self.metrics.in_flight_deliveries += 1;
                }
                actions.push(XShardAction::Deliver(proven(held, quorum)));
            } else {
                held.resend_at_us = held.deliver_at_us;
            }
        }
    }

    /// When [`OutputsCollector::on_tick`] has something to resend.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.kept.values().map(|held| held.resend_at_us).min()
    }

    /// Forgets the outputs of `op` for `destination` (delivered for good: the legs are
    /// acknowledged, or the acknowledgements were handed over). Returns whether they were
    /// kept.
    pub fn release(&mut self, destination: u32, op: u64) -> bool {
        self.kept
            .remove(&(destination, op, OutputsKind::Op))
            .is_some()
    }

    /// Releases every output and in-flight chunk produced at least `min_age_us` before
    /// `now_us` (0: any age) for which `settled(operation, records)` holds, certified here
    /// or not, and returns how many went. The driver asks the state machine
    /// (`StateMachine::outputs_settled`, from replicated state): a leg is settled once its
    /// acknowledgement is applied, so every correct replica releases it, including one that
    /// executed the op after its peers released it and so never collects a certificate
    /// (peers drop votes for outputs they no longer hold). Outputs that are settled when
    /// produced (acknowledgements) stay `min_age_us`, delivered again each
    /// `resend_interval_us` meanwhile, then go whether certified or not: a lost one is
    /// repaired by the leg's resend, which its destination acknowledges again at a new op.
    /// So the collector never fills with outputs nobody will answer. An in-flight chunk
    /// goes once every leg in it is acknowledged, like the outputs of an op.
    pub fn release_settled(
        &mut self,
        now_us: u64,
        min_age_us: u64,
        mut settled: impl FnMut(u16, &[u8]) -> bool,
    ) -> usize {
        let before = self.kept.len();
        let mut in_flight_released = 0;
        self.kept.retain(|(_, _, kind), held| {
            let keep = now_us < held.produced_at_us.saturating_add(min_age_us)
                || !settled(held.operation, &held.records);
            if !keep && matches!(kind, OutputsKind::InFlight { .. }) {
                in_flight_released += 1;
            }
            keep
        });
        self.in_flight_kept -= in_flight_released;
        before - self.kept.len()
    }

    /// Whether the outputs of `op` for `destination` are certified here.
    pub fn is_certified(&self, destination: u32, op: u64) -> bool {
        self.is_certified_kind(destination, op, OutputsKind::Op)
    }

    /// Whether the records of `(destination, op, kind)` are certified here.
    pub fn is_certified_kind(&self, destination: u32, op: u64, kind: OutputsKind) -> bool {
        self.kept
            .get(&(destination, op, kind))
            .is_some_and(|held| held.certified)
    }
}

/// The first `quorum` signatures of `held`, lowest replica first, with its records.
fn proven(held: &Outputs, quorum: usize) -> ProvenOutputs {
    let signatures: Vec<(u8, Signature)> = held
        .signatures
        .iter()
        .enumerate()
        .filter_map(|(replica, signature)| signature.map(|signature| (replica as u8, signature)))
        .take(quorum)
        .collect();
    debug_assert_eq!(signatures.len(), quorum);
    ProvenOutputs {
        cert: OutputsCert {
            statement: held.statement,
            signatures,
        },
        operation: held.operation,
        records: held.records.clone(),
    }
}

/// Counters of an [`InboundProofs`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboundMetrics {
    /// Proofs verified and queued.
    pub accepted: u64,
    /// Proofs refused (every [`XShardError`] but `Stale` and `Full`).
    pub refused: u64,
    /// Proofs already queued (not verified again).
    pub duplicates: u64,
    /// Proofs dropped because the queue was full (the origin resends).
    pub full: u64,
    /// Proofs removed because a batch holding them committed.
    pub committed: u64,
}

#[derive(Debug)]
struct Inbound {
    proof: ProvenOutputs,
    /// The view in which this replica, as leader, last proposed it (not again in that view).
    proposed_in_view: Option<u64>,
    /// When [`InboundProofs::forward_due`] hands it out next (0: not seen by it yet).
    forward_at_us: u64,
}

/// The receiving side, one per replica of the destination group: verified proofs waiting
/// to be committed by the group. The leader takes them into proven batches; every replica
/// reports them as pending work (so a leader that withholds them is suspected, as one that
/// withholds client requests); a committed batch removes the proofs it holds. At most
/// `capacity` proofs, each checked once on arrival and at most `records_max` records (the
/// group's batch cap), so every queued proof fits a batch.
#[derive(Debug)]
pub struct InboundProofs {
    receiver: u32,
    record_bytes: usize,
    records_max: usize,
    groups: Groups,
    queue: VecDeque<Inbound>,
    capacity: usize,
    metrics: InboundMetrics,
}

impl InboundProofs {
    /// The queue of group `receiver` for records of `record_bytes` bytes in batches of at
    /// most `records_max` records, holding at most `capacity` proofs.
    pub fn new(
        receiver: u32,
        (record_bytes, records_max): (usize, usize),
        groups: Groups,
        capacity: usize,
    ) -> Result<InboundProofs, XShardError> {
        groups.committee(receiver)?;
        if record_bytes == 0 || records_max == 0 || capacity == 0 {
            return Err(XShardError::OutOfRange("inbound limits"));
        }
        Ok(InboundProofs {
            receiver,
            record_bytes,
            records_max,
            groups,
            queue: VecDeque::with_capacity(capacity),
            capacity,
            metrics: InboundMetrics::default(),
        })
    }

    /// Counters.
    pub fn metrics(&self) -> InboundMetrics {
        self.metrics
    }

    /// Proofs waiting to commit.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A proof delivered to this replica: verified ([`Groups::verify_proven`], which also
    /// refuses more than `records_max` records: such a proof fits no batch, so queued it
    /// would never leave) and queued, unless the same `(origin, op)` is queued already
    /// (`Stale`) or the queue is full.
    pub fn on_proven(&mut self, proof: ProvenOutputs) -> Result<(), XShardError> {
        let key = proof.key();
        if self.queue.iter().any(|queued| queued.proof.key() == key) {
            self.metrics.duplicates += 1;
            return Err(XShardError::Stale);
        }
        if self.queue.len() >= self.capacity {
            self.metrics.full += 1;
            return Err(XShardError::Full("inbound proofs"));
        }
        if let Err(error) =
            self.groups
                .verify_proven(&proof, self.receiver, self.record_bytes, self.records_max)
        {
            self.metrics.refused += 1;
            return Err(error);
        }
        self.metrics.accepted += 1;
        self.queue.push_back(Inbound {
            proof,
            proposed_in_view: None,
            forward_at_us: 0,
        });
        Ok(())
    }

    /// Leader of `view`: the oldest queued proofs not yet proposed in this view that fit,
    /// all of the operation of the oldest one taken, at most `records_max` records and
    /// [`PROVEN_BATCH_PROOFS_MAX`] proofs, as a batch to propose at `now_ns`. They stay
    /// queued until committed (a view change may lose the proposal). A proof skipped because
    /// it does not fit never decides the operation, so it cannot hold back the proofs of
    /// another operation behind it. `records_max` is normally the queue's own batch cap
    /// (every queued proof fits it, [`InboundProofs::on_proven`]); one op's outputs to one
    /// group are at most one record per record of the op, and in-flight chunks are cut at the
    /// batch cap ([`in_flight_chunks`]).
    pub fn take_batch(
        &mut self,
        view: u64,
        now_ns: u64,
        records_max: usize,
    ) -> Option<ProvenBatch> {
        let record_bytes = self.record_bytes;
        let mut operation = None;
        let (mut records, mut proofs) = (0usize, Vec::new());
        for queued in self.queue.iter_mut() {
            if proofs.len() == PROVEN_BATCH_PROOFS_MAX {
                break;
            }
            if queued.proposed_in_view == Some(view) {
                continue;
            }
            let proof_records = queued.proof.records.len() / record_bytes;
            if operation.is_some_and(|operation| operation != queued.proof.operation)
                || records + proof_records > records_max
            {
                continue;
            }
            operation = Some(queued.proof.operation);
            queued.proposed_in_view = Some(view);
            records += proof_records;
            proofs.push(queued.proof.clone());
        }
        // The operation is set exactly when a proof was taken.
        let operation = operation?;
        debug_assert!(!proofs.is_empty() && records <= records_max);
        Some(ProvenBatch {
            operation,
            now_ns,
            proofs,
        })
    }

    /// Copies into `out` the proofs that stayed queued at least `after_us` (since the first
    /// call that saw them, or since they were last handed out), for the driver to send to
    /// the group's other replicas. Every correct replica of the origin group delivers to its
    /// own node, so the replicas of a group normally hold the same proofs; one that reached
    /// a replica after its batch committed (a late delivery), or that only some nodes
    /// certified, would otherwise stay queued there: pending work that no leader proposes
    /// and too few replicas report to change views. A replica queues a forwarded copy like
    /// a delivered one (verified, or `Stale` if it holds it); the leader proposes it, and
    /// committed again it is a duplicate the state machine acknowledges again and changes
    /// nothing else. Each proof is handed out at most once per `after_us`.
    pub fn forward_due(&mut self, now_us: u64, after_us: u64, out: &mut Vec<ProvenOutputs>) {
        for queued in self.queue.iter_mut() {
            if queued.forward_at_us == 0 {
                queued.forward_at_us = now_us.saturating_add(after_us).max(1);
            } else if now_us >= queued.forward_at_us {
                queued.forward_at_us = now_us.saturating_add(after_us);
                out.push(queued.proof.clone());
            }
        }
    }

    /// A proven batch committed in this group (verified): its proofs leave the queue.
    /// Returns how many were queued.
    pub fn on_committed(&mut self, batch: &ProvenBatch) -> usize {
        let before = self.queue.len();
        self.queue
            .retain(|queued| !batch.proofs.iter().any(|p| p.key() == queued.proof.key()));
        let removed = before - self.queue.len();
        self.metrics.committed += removed as u64;
        removed
    }
}

#[cfg(test)]
#[path = "xshard_tests.rs"]
mod tests;
