//! Byzantine-fault-tolerant replication (phase 1): a PBFT-shaped, sans-IO replica core for
//! one replication group of `n >= 3f + 1` replicas, next to the crash-fault core of
//! [`crate::replica`]. `docs/bft.md` describes the protocol, its threat model and what is
//! still missing.
//!
//! The leader of view `v` proposes `(v, op, blake3(batch))`; backups sign Prepares; a replica
//! holding a prepared certificate (the proposal and `quorum − 1` Prepares) signs a Commit;
//! `quorum` matching Commits (`2f + 1` for `n = 3f + 1`) commit the batch, and batches are
//! handed to the caller in op order ([`Action::Commit`]). Every `checkpoint_interval_ops`
//! ops replicas sign the chain digest of their log; `quorum` of those make a stable
//! checkpoint, the low watermark moves and older slots are forgotten. A leader that makes
//! no progress, or that is caught equivocating, is replaced by a view change carrying
//! certificates. Two validly signed, conflicting statements from one replica are kept as
//! [`Evidence`] and counted in [`BftMetrics`].
//!
//! This module performs no I/O, reads no clock and draws no randomness: every input
//! carries `now_us`, signing keys are handed in, ed25519 signing is deterministic, and
//! decisions come back as [`Action`]s in a caller-owned buffer. Every message is checked
//! (signer known, strict signature, view, window) before it changes any state; a message
//! that fails is dropped with a typed [`BftError`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod keys;
pub mod message;
mod replica;
pub mod request;
pub mod serve_budget;
pub mod xshard;

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
pub use message::{
    CheckpointCert, CommitCert, Committee, Digest, Evidence, Message, NewView, PreparedCert,
    PreparedEntry, SnapshotStatement, StateCert, ViewChange, Vote, VoteKind, batch_digest,
    chain_digest, quorum_of,
};
pub use replica::{BftReplica, NewViewPlan, Restored, Status, VoteGuard, new_view_plan};
pub use request::{ClientKeys, ProposalCheck, RequestAuthError, RequestStatement, RequestVerifier};

/// Most replicas a BFT group may have (`f = 2` at `n = 7`; replica sets fit a `u8`).
pub const REPLICA_COUNT_MAX: usize = 7;
/// Default ops between checkpoints (`K`).
pub const CHECKPOINT_INTERVAL_OPS_DEFAULT: u64 = 16;
/// Default log window: ops above the low watermark a replica accepts (`L = 2K`, so the
/// leader keeps proposing while the next checkpoint becomes stable).
pub const LOG_WINDOW_OPS_DEFAULT: u64 = 2 * CHECKPOINT_INTERVAL_OPS_DEFAULT;
/// Default [`BftConfig::commits_undurable_ops_max`]: four log windows, far more than a
/// disk keeping up leaves undurable (a group commit takes what waits), so it holds
/// execution back only behind a disk that stalls.
pub const COMMITS_UNDURABLE_OPS_MAX_DEFAULT: u64 = 4 * LOG_WINDOW_OPS_DEFAULT;
/// Largest log window a configuration may ask for (slots are allocated at start-up).
pub const LOG_WINDOW_OPS_LIMIT: u64 = 1_024;
/// Default largest batch a PrePrepare may carry (bytes).
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default time without commit progress, with work pending, before a replica suspects the
/// leader (µs).
pub const PROGRESS_TIMEOUT_US_DEFAULT: u64 = 200_000;
/// Default time a view change may take before the next view is tried (µs); doubles with
/// each failed attempt, up to [`VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT`].
pub const VIEW_CHANGE_TIMEOUT_US_DEFAULT: u64 = 200_000;
/// See [`VIEW_CHANGE_TIMEOUT_US_DEFAULT`].
pub const VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT: u64 = 3_200_000;
/// Default interval at which unanswered votes, proposals and view changes are sent again
/// (µs): the network may drop anything.
pub const RESEND_INTERVAL_US_DEFAULT: u64 = 40_000;
/// Default interval of `Status` reports (µs).
pub const STATUS_INTERVAL_US_DEFAULT: u64 = 60_000;
/// Default most `CommitProof`s one `Status` is answered with, and most committed ops one
/// `StateRequest` asks for (state transfer).
pub const CATCHUP_OPS_MAX_DEFAULT: u64 = 16;
/// Default time a state transfer waits for the answer to a `StateRequest` before it asks
/// the next peer (µs): a silent or lying peer delays a transfer by this much, no more.
pub const STATE_TRANSFER_RETRY_US_DEFAULT: u64 = 100_000;
/// Default rate at which a replica's budget for serving one peer's `StateRequest`s refills
/// (committed ops per second; [`BftConfig::state_serve_ops_per_s`]). Serving costs a
/// journal read and a `StateOps` of up to `catchup_ops_max` batches, asked for by a message
/// of a few bytes: without a budget an authenticated Byzantine peer could make a correct
/// replica read and send its log over and over. An honest requester stays below it: it
/// asks one peer at a time and sends its next request only after it verified `q ≥ 3`
/// Commit signatures per op of the previous answer (and each request's client signature),
/// executed it and, in the runtime, made it durable ([`Action::ServeState`],
/// `request_state_ops`): at 41 µs a signature (the development VM) that is at most about
/// 8,000 ops/s, and a core twice as fast still stays near the rate, its early answers
/// taken from the burst ([`STATE_SERVE_BURST_REQUESTS`]). A group commits far slower:
/// every replica verifies about six signatures per op (~285 µs there, so ~3,500 ops/s at
/// most, a few hundred under the benchmarks' load), so a replica behind still catches up
/// several times faster than the group moves on. A flooding peer gets at most this: what
/// one honest transfer at full speed costs.
pub const STATE_SERVE_OPS_PER_S_DEFAULT: u64 = 16_384;
/// A peer's serve budget holds this many full `StateRequest`s (`catchup_ops_max` ops each)
/// when unspent, and starts full: an honest requester's answers that come back faster than
/// the refill (a fast link, a disk that syncs at once) borrow from it, as do the core's
/// unit tests, whose transfers are delivered at one instant. Four is a few round trips,
/// not a log: a flood gets this burst once, then the refill rate.
pub const STATE_SERVE_BURST_REQUESTS: u64 = 4;
/// A view change for a view further than this above the current one is refused: a
/// Byzantine replica cannot make others verify an unbounded run of views.
pub const VIEW_AHEAD_MAX: u64 = 64;
/// Evidence records kept (the metrics count every one found).
pub const EVIDENCE_KEPT_MAX: usize = 16;
/// Checkpoint votes kept per replica (its latest ones above the low watermark).
pub const CHECKPOINT_VOTES_KEPT_PER_REPLICA: usize = 4;
/// Snapshot checkpoint (`StateCheckpoint`) votes kept per replica (its latest ones above
/// the state certificate held).
pub const STATE_VOTES_KEPT_PER_REPLICA: usize = 2;

const _: () = assert!(REPLICA_COUNT_MAX <= 8);
const _: () = assert!(LOG_WINDOW_OPS_DEFAULT.is_multiple_of(CHECKPOINT_INTERVAL_OPS_DEFAULT));
const _: () = assert!(LOG_WINDOW_OPS_DEFAULT >= 2 * CHECKPOINT_INTERVAL_OPS_DEFAULT);
const _: () = assert!(LOG_WINDOW_OPS_DEFAULT <= LOG_WINDOW_OPS_LIMIT);
const _: () = assert!(VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT >= VIEW_CHANGE_TIMEOUT_US_DEFAULT);
const _: () = assert!(PROGRESS_TIMEOUT_US_DEFAULT >= 4 * RESEND_INTERVAL_US_DEFAULT);
const _: () = assert!(CATCHUP_OPS_MAX_DEFAULT <= LOG_WINDOW_OPS_LIMIT);
// A requester refused for want of budget comes back after a retry interval at the
// earliest: by then the default refill covers a full request many times over.
const _: () = assert!(
    CATCHUP_OPS_MAX_DEFAULT * 1_000_000 / STATE_SERVE_OPS_PER_S_DEFAULT
        < STATE_TRANSFER_RETRY_US_DEFAULT / 16
);
const _: () = assert!(STATE_SERVE_BURST_REQUESTS >= 1);

/// Why a BFT configuration, message or proposal is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BftError {
    /// `n < 3f + 1`: the group cannot tolerate the requested faults.
    #[error(
        "n = {replica_count} replicas cannot tolerate f = {faults_max} Byzantine faults: BFT \
         needs n >= 3f + 1 = {} replicas",
        3 * u32::from(*faults_max) + 1
    )]
    TooFewReplicas {
        /// Replicas configured (`n`).
        replica_count: usize,
        /// Byzantine replicas asked for (`f`).
        faults_max: u8,
    },
    /// More replicas than [`REPLICA_COUNT_MAX`].
    #[error("{0} replicas: at most {REPLICA_COUNT_MAX} per group")]
    TooManyReplicas(usize),
    /// A limit is zero or out of range.
    #[error("limit {0} is out of range")]
    Limit(&'static str),
    /// A public key of the committee is weak (small order).
    #[error("replica {0} has a weak public key")]
    WeakKey(u8),
    /// The replica's signing key is not the committee's key for its index.
    #[error("the signing key is not replica {0}'s key in the cluster file")]
    KeyMismatch(u8),
    /// A signer that is not in the committee.
    #[error("unknown signer {0}")]
    UnknownSigner(u8),
    /// A signature that `verify_strict` refuses.
    #[error("bad {kind:?} signature from replica {replica}")]
    BadSignature {
        /// Claimed signer.
        replica: u8,
        /// What it claimed to sign.
        kind: VoteKind,
    },
    /// A statement for a view this replica is not in (or not in normal status for).
    #[error("message for view {view}; this replica is in view {current}")]
    WrongView {
        /// The message's view.
        view: u64,
        /// This replica's view.
        current: u64,
    },
    /// An op outside the log window `(low, low + log_window_ops]`.
    #[error("op {op} is outside the window ({low}, {high}]")]
    OutOfWindow {
        /// The op.
        op: u64,
        /// Low watermark.
        low: u64,
        /// High watermark.
        high: u64,
    },
    /// A proposal signed by a replica that does not lead its view, or a Prepare signed by
    /// the leader, or a statement of the wrong kind for the message.
    #[error("{0}")]
    WrongSender(&'static str),
    /// Batch bytes that do not hash to the signed digest.
    #[error("op {op}: batch does not match its digest")]
    BatchDigestMismatch {
        /// The op.
        op: u64,
    },
    /// A batch above `batch_bytes_max`.
    #[error("batch of {bytes} bytes is above the limit")]
    BatchTooLarge {
        /// Its size.
        bytes: usize,
    },
    /// A certificate that does not prove what it claims.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(&'static str),
    /// The message conflicts with a validly signed earlier one from the same signer; the
    /// pair is kept as evidence.
    #[error("replica {0} equivocated; evidence kept")]
    Equivocation(u8),
    /// Nothing new (a duplicate, an old op, a proof of something already known).
    #[error("stale message")]
    Stale,
    /// Propose: this replica is not the ready leader of its view.
    #[error("not the ready leader")]
    NotLeader,
    /// Propose: the log window is full until the next checkpoint is stable.
    #[error("log window full")]
    WindowFull,
    /// Propose: an empty batch (the empty batch is the null op).
    #[error("empty batch")]
    EmptyBatch,
    /// A peer's `StateRequest` asks for more ops than its serve budget holds now
    /// ([`BftConfig::state_serve_ops_per_s`]): nothing is served (the requester asks the
    /// next peer after its retry interval, or this one again once the budget refilled).
    #[error("replica {peer} asked for {ops} ops to be served; its serve budget holds fewer")]
    ServeBudgetExhausted {
        /// The requesting peer.
        peer: u8,
        /// Ops the request would have been served.
        ops: u64,
    },
    /// A proposal the leader validly signed whose batch fails the driver's
    /// [`ProposalCheck`] (a request without a valid client signature): the leader's
    /// misbehaviour; no Prepare is signed for it.
    #[error("proposal for op {op} refused: {error}")]
    ProposalRefused {
        /// The op.
        op: u64,
        /// What is wrong with the batch.
        error: RequestAuthError,
    },
}

/// Checks `n >= 3f + 1` and `n <= REPLICA_COUNT_MAX`.
pub fn check_fault_model(replica_count: usize, faults_max: u8) -> Result<(), BftError> {
    if replica_count > REPLICA_COUNT_MAX {
        return Err(BftError::TooManyReplicas(replica_count));
    }
    if replica_count < 3 * usize::from(faults_max) + 1 {
        return Err(BftError::TooFewReplicas {
            replica_count,
            faults_max,
        });
    }
    Ok(())
}

/// A bug the simulator injects on purpose, to show that its checkers catch it. Never set
/// outside tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Prepared with one Prepare fewer and committed with one Commit fewer than a quorum
    /// (`2f` instead of `2f + 1` at `n = 3f + 1`).
    QuorumMinusOne,
    /// The new leader's plan ignores prepared certificates: every op above the checkpoint
    /// becomes a null op, so a batch committed in the old view can be replaced.
    NewViewIgnoresPrepared,
    /// Backups vote for proposals without running the [`ProposalCheck`]: a request no
    /// client signed can commit.
    VotesWithoutProposalCheck,
    /// [`BftReplica::restore`] ignores the vote guard it is given: a restarted replica
    /// starts in view 0 and may sign again what it signed before its crash.
    RestoreIgnoresGuard,
    /// [`BftReplica::restore`] drops the prepared certificates it is given: a restarted
    /// replica's ViewChanges omit what it prepared before its crash.
    RestoreDropsPrepared,
}

/// Identity and limits of one replica of one BFT group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BftConfig {
    /// The group (shard index), signed into every statement.
    pub group: u32,
    /// This replica's index.
    pub replica: u8,
    /// Ops between checkpoints (`K`).
    pub checkpoint_interval_ops: u64,
    /// Ops above the low watermark accepted (`L`, a multiple of `K`, at least `2K`).
    pub log_window_ops: u64,
    /// Largest batch a proposal may carry (bytes).
    pub batch_bytes_max: usize,
    /// Time without progress, with work pending, before the leader is suspected (µs).
    pub progress_timeout_us: u64,
    /// First view-change timeout (µs), doubled per failed attempt.
    pub view_change_timeout_us: u64,
    /// Cap of the doubling (µs).
    pub view_change_timeout_us_max: u64,
    /// Resend interval of unanswered statements (µs).
    pub resend_interval_us: u64,
    /// Status report interval (µs).
    pub status_interval_us: u64,
    /// Most `CommitProof`s per answered `Status`, and most ops per `StateRequest` (at
    /// most [`LOG_WINDOW_OPS_LIMIT`]: the codec's bound on a `StateOps`).
    pub catchup_ops_max: u64,
    /// Time a state transfer waits for a peer's `StateOps` before asking the next peer
    /// (µs).
    pub state_transfer_retry_us: u64,
    /// Committed ops per second this replica serves one peer's `StateRequest`s, refilling a
    /// per-peer budget of [`STATE_SERVE_BURST_REQUESTS`] × `catchup_ops_max` ops; a
    /// request beyond it is refused ([`BftError::ServeBudgetExhausted`],
    /// [`BftMetrics::state_serves_refused`]). See [`STATE_SERVE_OPS_PER_S_DEFAULT`].
    pub state_serve_ops_per_s: u64,
    /// The driver reports which executed ops are durable ([`BftReplica::on_durable`]), and
    /// checkpoint votes are signed only for durable ops (a stable checkpoint then means
    /// `quorum` replicas hold that state on disk). Off: an op counts as durable once
    /// executed (the runtime's driver and the simulator both turn it on).
    pub durability_reported: bool,
    /// With `durability_reported`: most committed ops handed to the driver
    /// ([`Action::Commit`]) and not yet reported durable. Execution waits above it and
    /// goes on at [`BftReplica::on_durable`]. The log window alone did not bound them: a
    /// stable checkpoint `quorum` other replicas certify moves the window while this
    /// replica's disk lags, and nothing else bounded the driver's queue of commits. A replica
    /// held here that falls behind the stable checkpoint catches up by state transfer. See
    /// [`COMMITS_UNDURABLE_OPS_MAX_DEFAULT`].
    pub commits_undurable_ops_max: u64,
    /// Test only: a protocol bug to inject.
    pub bug: Option<InjectedBug>,
}

impl BftConfig {
    /// Defaults for `replica` of `group`.
    pub fn new(group: u32, replica: u8) -> Self {
        Self {
            group,
            replica,
            checkpoint_interval_ops: CHECKPOINT_INTERVAL_OPS_DEFAULT,
            log_window_ops: LOG_WINDOW_OPS_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            progress_timeout_us: PROGRESS_TIMEOUT_US_DEFAULT,
            view_change_timeout_us: VIEW_CHANGE_TIMEOUT_US_DEFAULT,
            view_change_timeout_us_max: VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT,
            resend_interval_us: RESEND_INTERVAL_US_DEFAULT,
            status_interval_us: STATUS_INTERVAL_US_DEFAULT,
            catchup_ops_max: CATCHUP_OPS_MAX_DEFAULT,
            state_transfer_retry_us: STATE_TRANSFER_RETRY_US_DEFAULT,
            state_serve_ops_per_s: STATE_SERVE_OPS_PER_S_DEFAULT,
            durability_reported: false,
            commits_undurable_ops_max: COMMITS_UNDURABLE_OPS_MAX_DEFAULT,
            bug: None,
        }
    }

    /// Ops one peer's serve budget holds when full: [`STATE_SERVE_BURST_REQUESTS`] full
    /// `StateRequest`s.
    pub fn serve_budget_ops(&self) -> u64 {
        STATE_SERVE_BURST_REQUESTS.saturating_mul(self.catchup_ops_max)
    }

    /// Checks every field against the committee.
    pub fn validate(&self, committee: &Committee) -> Result<(), BftError> {
        check_fault_model(usize::from(committee.replica_count()), committee.faults_max)?;
        if self.replica >= committee.replica_count() {
            return Err(BftError::UnknownSigner(self.replica));
        }
        let k = self.checkpoint_interval_ops;
        if k == 0 {
            return Err(BftError::Limit("checkpoint_interval_ops"));
        }
        if self.log_window_ops < 2 * k
            || !self.log_window_ops.is_multiple_of(k)
            || self.log_window_ops > LOG_WINDOW_OPS_LIMIT
        {
            return Err(BftError::Limit("log_window_ops"));
        }
        let nonzero = [
            (self.batch_bytes_max as u64, "batch_bytes_max"),
            (self.progress_timeout_us, "progress_timeout_us"),
            (self.view_change_timeout_us, "view_change_timeout_us"),
            (self.resend_interval_us, "resend_interval_us"),
            (self.status_interval_us, "status_interval_us"),
            (self.catchup_ops_max, "catchup_ops_max"),
            (self.state_transfer_retry_us, "state_transfer_retry_us"),
            (self.state_serve_ops_per_s, "state_serve_ops_per_s"),
            (self.commits_undurable_ops_max, "commits_undurable_ops_max"),
        ];
        for (value, name) in nonzero {
            if value == 0 {
                return Err(BftError::Limit(name));
            }
        }
        if self.catchup_ops_max > LOG_WINDOW_OPS_LIMIT {
            return Err(BftError::Limit("catchup_ops_max"));
        }
        if self.view_change_timeout_us_max < self.view_change_timeout_us {
            return Err(BftError::Limit("view_change_timeout_us_max"));
        }
        Ok(())
    }
}

/// What the core asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `message` to replica `to`.
    Send {
        /// The peer.
        to: u8,
        /// The message.
        message: Message,
    },
    /// Send `message` to every other replica of the group.
    Broadcast {
        /// The message.
        message: Message,
    },
    /// Batch `op` is committed: apply it (ops come strictly in order, each once; an empty
    /// batch is a null op and applies nothing).
    Commit {
        /// The op.
        op: u64,
        /// The view whose certificate committed it.
        view: u64,
        /// `batch_digest(batch)`.
        digest: Digest,
        /// The batch bytes.
        batch: Vec<u8>,
        /// `quorum` Commits for `(view, op, digest)`: the proof the driver journals with
        /// the batch.
        cert: CommitCert,
    },
    /// Make `guard` durable (fsync) before sending anything that follows it, in this list
    /// or a later one (the sends wait; other actions need not): it records what this
    /// replica may have signed, and a restarted replica must never sign a conflicting
    /// statement ([`BftReplica::restore`]). Emitted rarely: a guard reserves votes for two
    /// windows of ops ahead, and once per view change.
    PersistGuard {
        /// The new guard (never lower than an earlier one in any field).
        guard: VoteGuard,
    },
    /// Make this prepared certificate durable before sending this replica's Commit vote
    /// for the op, which follows it (in that Commit, or in a commit certificate sent
    /// later), and before the op, once committed, is durable in the driver's journal (its
    /// certificate may hold that vote, and a restarted replica that executed it must report
    /// it); other sends need not wait for it, and one write may cover many. It holds
    /// this replica's own PrePrepare or Prepare, so write it only once the guards asked for
    /// before it are durable. A restarted replica gets it back through
    /// [`Restored::prepared`], so its ViewChanges report it like a replica that never
    /// crashed. Keep those above the stable checkpoint only.
    PersistPrepared {
        /// The certificate and its batch.
        entry: PreparedEntry,
    },
    /// The group's stable checkpoint `cert` is above this replica's executed log and the
    /// ops below it are gone from its peers' windows. The core fetches the missing ops
    /// itself (`StateRequest` to one peer at a time, rotating on timeout; each op of the
    /// answer verified against its commit certificate and executed as an ordinary
    /// [`Action::Commit`]; the chain checked against `cert` at the end), so a driver may
    /// only log this. A driver that installs state by other means (the simulator copies a
    /// log) calls [`BftReplica::on_state_transferred`] instead. Normal execution waits
    /// meanwhile. Emitted again when a later checkpoint raises the target.
    StateTransfer {
        /// The certificate to reach.
        cert: CheckpointCert,
    },
    /// Peer `to` asked for committed ops `from_op..=to_op` (durable here, at most
    /// `catchup_ops_max`): send it a [`Message::StateOps`] with each op's commit
    /// certificate and batch bytes (empty for a null op), in op order, from `from_op` on,
    /// as many as the driver still holds and as fit in one message. Unsigned and
    /// unchecked by the sender: the receiver verifies every certificate.
    ServeState {
        /// The peer.
        to: u8,
        /// First op asked for.
        from_op: u64,
        /// Last op to send.
        to_op: u64,
    },
    /// A state transfer skips the ops no peer holds in its log any more: fetch the
    /// snapshot `cert` certifies (at journal op `cert.statement.journal_op`) from peer
    /// `from`, check that it restores to `cert.statement.state_digest` before adopting
    /// anything, install it, and call [`BftReplica::on_snapshot_installed`] (or
    /// [`BftReplica::on_snapshot_failed`]: the core asks the next peer). The core sends no
    /// `StateRequest` meanwhile; after the install it fetches the ops above by log.
    FetchSnapshot {
        /// The peer that offered it.
        from: u8,
        /// `quorum` signed votes for the snapshot's statement (verified).
        cert: StateCert,
    },
}

/// Counters of one replica, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BftMetrics {
    /// Batches committed (executed in order), null ops included.
    pub ops_committed: u64,
    /// Messages refused for a bad signature.
    pub bad_signatures: u64,
    /// Messages refused for an unknown signer.
    pub unknown_signers: u64,
    /// Messages refused for their view.
    pub wrong_view: u64,
    /// Messages refused for an op outside the window.
    pub out_of_window: u64,
    /// Messages refused for anything else (certificates, digests, senders).
    pub invalid: u64,
    /// Equivocations detected (each conflicting pair once per slot).
    pub equivocations: u64,
    /// View changes this replica started or joined.
    pub view_changes: u64,
    /// New views installed.
    pub new_views: u64,
    /// Stable checkpoints reached.
    pub checkpoints_stable: u64,
    /// Ops committed from another replica's `CommitProof`.
    pub commit_proofs_applied: u64,
    /// State transfers asked for (each raise of the target counts).
    pub state_transfers: u64,
    /// State transfers completed: the log reached the target checkpoint.
    pub state_transfers_completed: u64,
    /// State transfers whose log, every op certified, did not end on the checkpoint's
    /// chain digest: only possible past `f` faults (the simulator's safety checker fails
    /// on it).
    pub state_transfers_mismatched: u64,
    /// Ops executed from peers' `StateOps` (state transfer, and catch-up below).
    pub state_ops_applied: u64,
    /// Of those, ops a peer served outside a state transfer: ops it restored from its
    /// journal, so it held no `CommitProof` for them.
    pub catchup_ops_applied: u64,
    /// Ranges of restored ops this replica served a peer behind it from its journal
    /// ([`Action::ServeState`] in answer to a `Status`).
    pub catchup_serves: u64,
    /// `StateRequest`s sent (the first and every retry).
    pub state_requests: u64,
    /// Peers' `StateRequest`s refused because the peer's serve budget did not hold the ops
    /// asked for ([`BftError::ServeBudgetExhausted`]): a peer asking faster than
    /// `state_serve_ops_per_s` (a flood; an honest requester stays far below it).
    pub state_serves_refused: u64,
    /// Times execution stopped at [`BftConfig::commits_undurable_ops_max`] committed ops
    /// not yet durable (a disk behind the group).
    pub commits_held_for_durability: u64,
    /// State certificates formed here (`quorum` matching `StateCheckpoint` votes).
    pub state_certs: u64,
    /// Snapshot fetches asked of the driver ([`Action::FetchSnapshot`]).
    pub snapshot_fetches: u64,
    /// Snapshots installed (their restored state had the certified digest).
    pub snapshot_installs: u64,
    /// Snapshot fetches that failed (a silent peer, or bytes that do not restore to the
    /// certified state: each costs one retry with the next peer).
    pub snapshot_fetches_failed: u64,
    /// Progress timeouts that did not suspect the leader: this replica had not heard from
    /// `f + 1` peers since it started, or was catching up.
    pub suspicions_deferred: u64,
    /// Proposals validly signed by their leader and refused by the [`ProposalCheck`]
    /// (requests without a valid client signature): no Prepare was signed for them.
    pub proposals_refused: u64,
}

#[cfg(test)]
mod tests;
