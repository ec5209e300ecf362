//! The BFT driver of one shard (`--fault-model bft`, phase 2 of issue 8): runs the sans-IO
//! [`BftReplica`] core of the shard's replication group on the shard's executor.
//!
//! It owns the group's peer connections (the same authenticated transport as crash-fault
//! mode: one direction per connection, cluster-key MAC on every frame, `Command::Bft`
//! frames whose body is one encoded [`Message`] with its own ed25519 signatures), the
//! core's timers (`timer_loop`), and the hand-over of committed batches to the shard:
//! - **Leader** (the ready leader of its view): the batcher seals client requests from the
//!   shard core as in every mode, encodes the sealed batch ([`batch_encode`]), proposes it
//!   (one signature) and drops it from the core's queue: nothing applies until committed.
//! - **Every replica**: a committed batch (`Action::Commit`) is checked
//!   ([`ShardCore::apply_committed`](crate::core::ShardCore::apply_committed)), staged in the
//!   shard's journal with its commit certificate staged in the certificate journal
//!   (`<data-dir>/bft-certs-<k>/`), both group-committed, then applied; the results of each
//!   client request go to the connection waiting for it on this replica, if any. Every
//!   replica answers its clients: a client accepts a result after `f + 1` identical replies
//!   (`percore_net::client::BftClient`).
//! - Stable checkpoint certificates are journaled too, and the journal may drop segments
//!   only below the op a stable checkpoint certifies (`checkpoint_install`'s retain bound).
//!   The certificate journal is checkpointed at stable checkpoints with the recovery state
//!   of its records as the snapshot ([`CertScan`], `certs_checkpoint`), and drops segments
//!   by the same rule; a restart reads that base and the records after it.
//!
//! Rules (documented in `docs/bft.md` §12): a null op or a committed batch whose bytes are
//! not a batch of this shard journals its certificate only (with the batch's bytes, for
//! state transfer) and applies nothing (every correct replica decides the same from the
//! same bytes, so their journals agree); journal ops count applied batches, certificate
//! records name the BFT op and the journal op.
//!
//! `--bft-test-byzantine` makes this replica misbehave on purpose (tests only): its core
//! stays correct, and what it sends is rewritten here ([`Byzantine`]).
//!
//! **Restart** (`Bft::start` on a non-empty data directory): the shard's journal has been
//! replayed into the state machine by the runtime as in every mode; the certificate journal
//! is read back and cut to the prefix whose batches the journal holds (certificates are
//! made durable before their batches, so it is never behind), the committed ops' digests
//! and the last stable checkpoint certificate restore the core, and the vote guard file
//! (`<data-dir>/bft-guard-<k>`, [`VoteGuard`]) tells it what it must never sign again. The
//! core asks for a higher guard before it sends a vote the guard does not cover
//! (`Action::PersistGuard`); `guard_loop` writes it asynchronously (in place, into the
//! copy of the file that does not hold the latest guard, then `fdatasync`) while every send
//! the core makes after asking waits in a bounded queue until the write is durable. Each
//! prepared certificate the core is about to send a Commit for (`Action::PersistPrepared`)
//! is appended by `prepared_loop`, every one asked for so far in one write, to the prepared
//! certificate log ([`crate::bft_prepared`]); only the sends that carry the Commit vote
//! wait for it, in a queue of their own ([`crate::bft_held`]), and a restart hands the
//! certificates back to the core, whose ViewChanges then report them.
//!
//! **State transfer** (a replica behind its peers' stable checkpoint): the core asks one
//! peer at a time for the missing committed ops (`StateRequest`); a peer's core accepts
//! ([`Action::ServeState`]) and this driver answers in the next batcher turn with a
//! `StateOps` read back from the certificate journal (commit certificates, located from a
//! bounded index of checkpoint positions) and the journal (batches, re-encoded with
//! [`batch_encode`]). The receiving core verifies every commit certificate and executes
//! the ops as ordinary commits, so they are journaled, certified and applied here exactly
//! as if committed live.
//!
//! A peer whose log no longer holds the ops offers its latest state certificate instead
//! (`StateSnapshot`): the requester fetches, verifies and installs that snapshot
//! ([`crate::bft_snapshot`]) and continues by log.
//!
//! **Client authentication**: every request arrives signed by its client (a
//! `SignedRequest` frame; the client's key is listed in the cluster file) and is verified
//! at admission (`serve_request`, typed refusals 1015/1016); the leader proposes each
//! request with its signature ([`batch_encode`]); backups verify every signature before
//! they vote (the core's [`ProposalCheck`], a [`RequestVerifier`] shared with this
//! driver); and a committed batch is applied only if every request in it is signed
//! (checked here, once per replica: what was verified before is remembered).
//!
//! **Transfers between shards** ([`crate::bft_xshard`]): each shard is its own group; the
//! records one group's op sends another (credit legs, acknowledgements) are signed by every
//! replica of the sending group after it applies the op, certified by `q` of them, handed
//! to this node's replica of the receiving group, proposed there as a proven batch, checked
//! by its backups before they vote and by every replica before it applies them.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWriteExt as _;
use glommio::io::{DmaFile, OpenOptions};
use glommio::net::{TcpListener, TcpStream};
pub use percore_engine::bft::request::{BATCH_HEADER_BYTES, batch_decode, batch_encode};
use percore_engine::bft::request::{REQUEST_SIGNATURE_BYTES, RequestAuthError};
use percore_engine::bft::xshard::{ProvenBatch, SignedOrProven};
use percore_engine::bft::{
    self, Action, BftConfig, BftError, BftMetrics, BftReplica, CheckpointCert, ClientKeys,
    CommitCert, Committee, Digest, Message, ProposalCheck, RequestVerifier, Restored, SigningKey,
    VerifyingKey, Vote, VoteGuard, codec,
};
use percore_engine::frame;
use percore_engine::journal::{EntryMeta, SECTOR_BYTES, entry_bytes_padded};
use percore_engine::limits::BATCH_ENTRIES_MAX_LIMIT;
use percore_engine::message::{Command, PeerHeader, PeerKeys, body_checksum};
use percore_engine::session::{REQUEST_DESCRIPTOR_BYTES, RequestDescriptor};
use percore_engine::state_machine::StateMachine;
use percore_net::peer::PeerIdentity;

use crate::bft_held::{HeldSends, Offered};
use crate::bft_prepared::PreparedLog;
use crate::journal::{FsyncPolicy, Journal, JournalConfig};
use crate::metrics::ShardMetrics;
use crate::peer_link::{self, Outbox, PeerLink, PeerProtocol};
use crate::runtime::{LocalNotify, STOP_POLL_MS, Shard};

/// Floor of a shard's BFT frame limit ([`BftMessageLimits::message_bytes_max`], bytes): the
/// fixed limit of earlier versions. It holds every message but the ViewChange and the
/// NewView, whose size grows with the group, the window and the batch
/// ([`codec::view_change_bytes_max`]): a PrePrepare or CommitProof carries one batch, a
/// snapshot chunk 64 KiB, and a `StateOps` is cut to fit when served.
pub const BFT_MESSAGE_BYTES_MIN: usize = 16 << 20;
/// Ceiling of a shard's BFT frame limit (bytes): a configuration whose largest ViewChange or
/// NewView is larger is refused at start ([`BftStartError::MessageTooLarge`]). With the
/// default window that is batches above 2,338 records of 128 bytes at `n = 4`, `f = 1`, and
/// above 1,557 at `n = 7`, `f = 2`.
pub const BFT_MESSAGE_BYTES_LIMIT: usize = 64 << 20;
/// Default bytes queued per peer; raised to hold two largest messages
/// ([`BftMessageLimits::send_queue_bytes`]).
pub const BFT_SEND_QUEUE_BYTES_DEFAULT: usize = 32 << 20;
/// How long a replica holds a client request waiting for its commit before answering
/// busy (ms); the client asks every replica and retries.
pub const BFT_REQUEST_WAIT_MS: u64 = 10_000;
/// Largest certificate record journaled for a commit or checkpoint (bytes): op, journal
/// op, view, digest, the votes, and the batch's client signatures (one per request, a
/// request holding at least one record). A [`CERT_KIND_COMMIT_BYTES`] record holds the
/// batch instead ([`cert_record_bytes_max`]).
pub const CERT_RECORD_BYTES_MAX: usize = 1
    + 3 * 8
    + 32
    + 1
    + bft::REPLICA_COUNT_MAX * codec::VOTE_BYTES
    + BATCH_ENTRIES_MAX_LIMIT * REQUEST_SIGNATURE_BYTES;
/// Staging buffer of the certificate journal (bytes), at least: it grows to hold one
/// [`CERT_KIND_COMMIT_BYTES`] record with the largest batch.
pub const CERT_WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// Commits queued for the batcher before it must have drained some (ops): the core hands
/// over at most this many not yet durable (`BftConfig::commits_undurable_ops_max`, set to
/// it), and a commit leaves the queue before its write is durable.
pub const COMMITTED_QUEUE_OPS: usize = 4 * bft::LOG_WINDOW_OPS_DEFAULT as usize;
/// Checkpoint ops remembered with the journal op they end at (for the retain bound).
pub const CHECKPOINT_OPS_TRACKED: usize = 16;
/// Checkpoints of the certificate journal per segment it fills, at most: it is
/// checkpointed at a stable checkpoint once it holds `segment_bytes /
/// CERT_CHECKPOINTS_PER_SEGMENT` bytes written since its last one (a checkpoint costs a
/// snapshot file and a superblock write, each synced; more often would release nothing
/// more, as segments go whole).
pub const CERT_CHECKPOINTS_PER_SEGMENT: u64 = 4;
/// Initial capacity of the encoded certificate journal base (bytes): its votes, the
/// tracked checkpoint ops and the digests of the ops above the last checkpoint.
const CERT_BASE_BYTES_INITIAL: usize = 4096;
/// Largest number of batches proposed in one batcher turn.
pub const PROPOSALS_PER_TURN_MAX: usize = 64;
/// Checkpoint ops whose certificate-journal position is remembered (state transfer reads
/// a peer's missing ops from the nearest one): with `K` = 16, the last 16,384 ops can be
/// served by log; a replica further behind gets a certified snapshot (`docs/bft.md` §12).
pub const CERT_INDEX_CHECKPOINTS: usize = 1_024;
/// Default journal ops kept below the stable checkpoint for peers that transfer state by
/// log (`--bft-retain-ops`, the BFT counterpart of `--retain-ops`): as many as the
/// certificate index can serve.
pub const BFT_RETAIN_OPS: u64 =
    CERT_INDEX_CHECKPOINTS as u64 * bft::CHECKPOINT_INTERVAL_OPS_DEFAULT;
/// Mixed into the handshake's peers digest: a BFT node and a crash-fault node configured
/// with the same peers refuse each other instead of exchanging messages neither reads.
pub const BFT_PEERS_DIGEST_SALT: u64 = 0x000B_F7BF_7BF7;
/// Certificate record kinds (the `operation` of a certificate-journal entry).
pub const CERT_KIND_COMMIT: u16 = 1;
/// See [`CERT_KIND_COMMIT`].
pub const CERT_KIND_CHECKPOINT: u16 = 2;
/// See [`CERT_KIND_COMMIT`]: a state certificate whose snapshot this replica installed
/// (BFT op, journal op, chain digest, the votes): the base of the ops after it.
pub const CERT_KIND_SNAPSHOT: u16 = 3;
/// See [`CERT_KIND_COMMIT`]: the commit certificate of a committed batch that is not a
/// batch of this shard (applied nothing, journal op 0), followed by the batch's bytes
/// (`length u32 | bytes`), so that peers can serve it by state transfer.
pub const CERT_KIND_COMMIT_BYTES: u16 = 4;
/// Certificate record kind: the commit of a proven batch (other groups' certified outputs,
/// `docs/bft.md` §14), journaled as its stamped records, with the batch's bytes (a commit
/// record, then `length u32 | bytes`, like [`CERT_KIND_COMMIT_BYTES`]) so that state
/// transfer serves the committed bytes, certificates included.
pub const CERT_KIND_PROVEN: u16 = 5;
/// Bytes of one copy of the vote guard (one sector: a single O_DIRECT write in place).
pub const GUARD_SLOT_BYTES: usize = SECTOR_BYTES;
/// Copies of the guard in its file. Writes alternate between them, so a torn write leaves
/// the previous guard intact in the other copy.
pub const GUARD_SLOTS: u64 = 2;
/// Bytes of the vote guard file.
pub const GUARD_FILE_BYTES: usize = GUARD_SLOT_BYTES * GUARD_SLOTS as usize;
/// Bytes of a guard record at the start of its slot: magic, group, replica, sequence, the
/// three views/ops, blake3 checksum (zeros after it).
pub const GUARD_RECORD_BYTES: usize = 8 + 4 + 4 + 8 + 3 * 8 + 32;
/// First bytes of a guard record (format version 2).
pub const GUARD_FILE_MAGIC: [u8; 8] = *b"PCBFTGD2";
/// Bytes of a version-1 guard file (one copy, replaced by rename): read at start, then
/// rewritten in version 2.
pub const GUARD_FILE_V1_BYTES: usize = 8 + 4 + 4 + 3 * 8 + 32;
/// First bytes of a version-1 guard file.
pub const GUARD_FILE_V1_MAGIC: [u8; 8] = *b"PCBFTGD1";
/// Error code: a BFT replica needs a client id (requests are matched across replicas by
/// `(client_id, request_number)`).
pub const ERROR_BFT_NEEDS_CLIENT_ID: u32 = 1013;
/// Error code, no longer sent: versions before transfers between shards were certified
/// (`docs/bft.md` §14) refused a request holding a record that would cross shards with it.
/// The number stays reserved, and clients still map it
/// (`percore_net::client::ClientError::CrossShardRefused`).
pub const ERROR_BFT_CROSS_SHARD: u32 = 1014;
/// Error code: the request's client id has no public key in the cluster file (`client <id>
/// <key>` lines, `percore keygen --clients`). Deterministic: every correct replica refuses.
pub const ERROR_BFT_UNKNOWN_CLIENT: u32 = 1015;
/// Error code: the request is not a `SignedRequest`, or its signature does not verify
/// with its client's key over this group, client id, request number, operation and
/// records ([`bft::RequestStatement`]). Deterministic: every correct replica refuses.
pub const ERROR_BFT_BAD_SIGNATURE: u32 = 1016;
/// Error code: the request's number is behind this replica's session for its client (at or
/// below the highest number applied for the client, no reply kept: older than the reply
/// window). It was applied before, or is a stale duplicate (typically one that waited in
/// the socket of a replica that was paused while the client moved on); no correct leader
/// proposes it again, so it is answered at once rather than waited for.
pub const ERROR_BFT_STALE_REQUEST: u32 = 1017;

const _: () = assert!(BFT_MESSAGE_BYTES_MIN < BFT_SEND_QUEUE_BYTES_DEFAULT);
const _: () = assert!(BFT_MESSAGE_BYTES_MIN <= BFT_MESSAGE_BYTES_LIMIT);
const _: () = assert!(codec::SNAPSHOT_CHUNK_BYTES_MAX < BFT_MESSAGE_BYTES_MIN);
// A peer connection's send buffer is at most `u32::MAX` bytes (`percore_net::peer`).
const _: () = assert!(
    2 * (percore_engine::message::PEER_HEADER_BYTES + BFT_MESSAGE_BYTES_LIMIT) <= u32::MAX as usize
);
const _: () = assert!(CERT_RECORD_BYTES_MAX <= CERT_WRITE_BUFFER_BYTES);
const _: () = assert!(GUARD_RECORD_BYTES <= GUARD_SLOT_BYTES);
const _: () = assert!(COMMITTED_QUEUE_OPS >= bft::LOG_WINDOW_OPS_DEFAULT as usize);

/// Which faults a replication group tolerates (`--fault-model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultModel {
    /// Crash faults: Viewstamped Replication, `2f + 1` replicas (`docs/protocol.md`).
    #[default]
    Crash,
    /// Byzantine faults: PBFT-shaped, `n >= 3f + 1` replicas, ed25519-signed votes
    /// (`docs/bft.md`).
    Bft,
}

/// A test-only Byzantine behaviour (`--bft-test-byzantine`): the replica runs the correct
/// core with its real key, and this driver rewrites what it sends. Never use in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Byzantine {
    /// As leader, a second validly signed proposal (another batch) to some peers, with
    /// matching votes; as backup, votes for that other digest to those peers. Answers
    /// clients at once with made-up results.
    Equivocate,
    /// Sends nothing to peers and answers no client.
    Silent,
    /// Correct, except that every snapshot chunk it serves to a peer fetching a certified
    /// snapshot has a flipped byte.
    CorruptSnapshot,
    /// Admits client requests that correct replicas refuse (records of another shard) and,
    /// as leader, proposes them: signed by their client, they are voted for and committed,
    /// and applied by no correct replica. Answers no client.
    InvalidBatch,
    /// Validly signed proposals and votes for digests that are not the batch's. Answers
    /// clients at once with made-up results.
    WrongDigest,
    /// As leader, adds to each proposal a request no client signed: the first request's
    /// first record with its id changed, under that client's id and a new request number,
    /// with the original signature (so a change after signing). Otherwise correct, and
    /// answers clients honestly.
    ForgeRequest,
    /// As leader, replaces each proven batch it proposes by one whose first leg is made
    /// up: the certified records altered, re-certified with its own key alone under `q`
    /// replica indices; holding no proof, it makes one up from nothing once per view (a
    /// zeroed leg claimed from the next group, certified the same way). Otherwise correct,
    /// and answers clients honestly.
    ForgeLeg,
    /// As leader, adds to each proposal the first request of the proposal it made
    /// [`REPLAY_REQUEST_BEHIND`] proposals before, of the same operation: a genuine signed
    /// request, committed long ago, proposed again (`docs/bft.md` §13). Otherwise correct,
    /// and answers clients honestly.
    ReplayRequest,
}

/// [`Byzantine::ReplayRequest`]: how many proposals back the replayed request was first
/// proposed (more than the session's reply window, so that a client's requests have
/// moved past it).
pub const REPLAY_REQUEST_BEHIND: usize = 8;

/// One signed request kept by [`Byzantine::ReplayRequest`] (test only).
struct KeptRequest {
    operation: u16,
    descriptor: RequestDescriptor,
    records: Vec<u8>,
    signature: [u8; REQUEST_SIGNATURE_BYTES],
}

impl Byzantine {
    fn lies_to_clients(self) -> bool {
        !matches!(
            self,
            Byzantine::Silent | Byzantine::CorruptSnapshot | Byzantine::InvalidBatch
        )
    }

    /// Whether the client path is the correct one (only proposals are rewritten).
    fn serves_clients_correctly(self) -> bool {
        matches!(
            self,
            Byzantine::ForgeRequest | Byzantine::ForgeLeg | Byzantine::ReplayRequest
        )
    }
}

/// How a node runs BFT replication: its identity, keys and every replica's peer address.
#[derive(Clone)]
pub struct BftSettings {
    /// This node's replica index.
    pub replica: u8,
    /// Peer address of every replica, in replica order (shard `k` on the port plus `k`).
    pub peers: Vec<SocketAddr>,
    /// The shared cluster key (authenticates connections; signatures authenticate votes),
    /// and the key accepted during a key rotation.
    pub keys: PeerKeys,
    /// This replica's ed25519 secret key.
    pub secret_key: SigningKey,
    /// Every replica's public key, in replica order.
    pub public_keys: Vec<VerifyingKey>,
    /// Byzantine replicas tolerated (`f`).
    pub faults_max: u8,
    /// The clients allowed to submit requests (client id `c` has the `c`-th key).
    pub clients: ClientKeys,
    /// Bytes queued per peer, at least (raised to hold two largest messages:
    /// [`BftMessageLimits::send_queue_bytes`]).
    pub send_queue_bytes: usize,
    /// Test only: misbehave.
    pub byzantine: Option<Byzantine>,
    /// Journal ops kept below the stable checkpoint for peers that transfer state by log
    /// ([`BFT_RETAIN_OPS`] by default; tests lower it to make peers' logs run out).
    pub retain_ops: u64,
    /// Ops whose outputs to other groups can be unsettled at once: the state machine's
    /// bound on messages in flight (the ledger's `credit_legs_in_flight_max`, each op with
    /// an unacknowledged leg holding at least one). Sizes the outputs collector
    /// (`bft_xshard`).
    pub outputs_legs_max: usize,
}

impl std::fmt::Debug for BftSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BftSettings")
            .field("replica", &self.replica)
            .field("peers", &self.peers)
            .field("faults_max", &self.faults_max)
            .field("clients", &self.clients.len())
            .field("byzantine", &self.byzantine)
            .finish_non_exhaustive()
    }
}

impl BftSettings {
    /// The address shard `shard` of `replica` listens on for peers.
    pub fn peer_address(&self, replica: u8, shard: usize) -> SocketAddr {
        peer_link::peer_address(&self.peers, replica, shard)
    }

    /// Replicas in each group (`n`).
    pub fn replica_count(&self) -> u8 {
        self.peers.len() as u8
    }

    /// Checks the settings against each other: `n >= 3f + 1`, one public key per peer,
    /// the secret key is this replica's, at least one client.
    pub fn check(&self) -> Result<(), BftStartError> {
        if self.clients.is_empty() {
            return Err(BftStartError::NoClients);
        }
        if self.public_keys.len() != self.peers.len() {
            return Err(BftStartError::KeyCount {
                keys: self.public_keys.len(),
                peers: self.peers.len(),
            });
        }
        bft::check_fault_model(self.peers.len(), self.faults_max)?;
        if self.public_keys.get(usize::from(self.replica)) != Some(&self.secret_key.verifying_key())
        {
            return Err(BftError::KeyMismatch(self.replica).into());
        }
        Ok(())
    }
}

/// Why a BFT shard cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BftStartError {
    /// The fault model or keys are refused by the core.
    #[error(transparent)]
    Core(#[from] BftError),
    /// The cluster file lists no client key: every request would be refused.
    #[error(
        "the cluster key file lists no clients (`client <id> <public key>` lines): no \
         request could be accepted; write keys with `percore keygen --clients N`"
    )]
    NoClients,
    /// The cluster file lists another number of replicas than `--peers`.
    #[error("the cluster key file lists {keys} replicas and --peers {peers}")]
    KeyCount {
        /// Public keys in the cluster file.
        keys: usize,
        /// Peers configured.
        peers: usize,
    },
    /// The journal holds ops but there is no vote guard file: the directory was written by
    /// a version that could not restart BFT replicas, and what this replica signed is
    /// unknown.
    #[error(
        "the journal holds {ops} ops but {path} is missing: what this replica signed before is \
         unknown, so it cannot restart safely; start it with an empty --data-dir"
    )]
    GuardMissing {
        /// Ops found.
        ops: u64,
        /// The guard file expected.
        path: std::path::PathBuf,
    },
    /// The vote guard file cannot be read or fails its checks.
    #[error("vote guard file {path}: {reason}")]
    Guard {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The prepared certificate log cannot be read or fails its checks.
    #[error("prepared certificate log: {0}")]
    Prepared(#[from] crate::bft_prepared::PreparedLogError),
    /// The certificate journal and the journal do not fit together.
    #[error("certificate journal: {0}")]
    Recovery(&'static str),
    /// The certificate journal's checkpoint (its base, [`CertScan`]) cannot be decoded, is
    /// another group's, or does not fit its checkpoint or itself.
    #[error("certificate journal base: {0}")]
    CertBase(&'static str),
    /// The certificate journal's base covers journal ops the journal does not hold: the
    /// certificate journal is checkpointed only once its batches are durable, so the
    /// journal lost ops it had made durable (or belongs to another data directory).
    #[error(
        "the certificate journal's base ends at journal op {base_journal_op}, above the \
         journal's durable head {journal_op_durable}: the journal lost durable batches"
    )]
    CertBaseAhead {
        /// The last journal op the base covers.
        base_journal_op: u64,
        /// The journal's durable head.
        journal_op_durable: u64,
    },
    /// The certificate journal could not be opened.
    #[error("certificate journal: {0}")]
    CertJournal(#[from] crate::journal::JournalError),
    /// The cross-shard committees or queues could not be built.
    #[error("transfers between shards: {0}")]
    XShard(#[from] bft::xshard::XShardError),
    /// The largest ViewChange or NewView of this group and batch size is above
    /// [`BFT_MESSAGE_BYTES_LIMIT`]: it could not be sent, and a view change under full load
    /// could never complete.
    #[error(
        "in a BFT group of {replica_count} replicas with batches of up to {batch_records} \
         records, a NewView can take {bytes} bytes, above the {limit}-byte frame limit, and a \
         view change could not complete: set --batch-entries-max to at most \
         {records_fitting} (or --batch-bytes-max to at most {batch_bytes_fitting})"
    )]
    MessageTooLarge {
        /// Replicas in the group (`n`).
        replica_count: usize,
        /// Records of the largest batch (the journal's batch cap).
        batch_records: usize,
        /// The largest ViewChange or NewView (bytes).
        bytes: usize,
        /// [`BFT_MESSAGE_BYTES_LIMIT`] (bytes).
        limit: usize,
        /// The largest `--batch-entries-max` that fits (records).
        records_fitting: usize,
        /// The largest `--batch-bytes-max` that fits (bytes of records).
        batch_bytes_fitting: usize,
    },
}

/// Largest batch a BFT core of a shard accepts (bytes), whose journal entries carry at most
/// `body_bytes_max` bytes of records of `record_bytes` and their request descriptors: the
/// batch header, the body, and a client signature per request (each request at least one
/// record and its descriptor).
pub fn batch_bytes_max_of(body_bytes_max: usize, record_bytes: usize) -> usize {
    let requests_max = body_bytes_max / (record_bytes + REQUEST_DESCRIPTOR_BYTES);
    BATCH_HEADER_BYTES + body_bytes_max + requests_max * REQUEST_SIGNATURE_BYTES
}

/// The sizes of one shard's BFT messages and peer queues, fixed at start from its group,
/// window and largest batch ([`BftMessageLimits::new`]).
///
/// Memory at the defaults (`n = 4`, `f = 1`, `L` = 32, batches of 1,000 records of 128
/// bytes: 224,008 bytes): `message_bytes_max` is the largest NewView, 28,722,790 bytes
/// (27.4 MiB; the fixed 16 MiB before could not carry it). Per shard that is one receive
/// buffer per peer (`vec![0; message_bytes_max]`: zeroed by the allocator, its pages
/// touched only as large messages arrive), 82 MiB of address space for 3 peers (48 MiB
/// before); and per peer an outbox, a spare buffer and a connection send buffer of
/// `send_queue_bytes` each (54.8 MiB; 32 MiB before), reserved at start and at connect and
/// touched as they fill. At `n = 7`, `f = 2` the largest NewView is 43,146,384 bytes
/// (41.1 MiB): 6 receive buffers, 247 MiB of address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BftMessageLimits {
    /// Largest encoded BFT message sent or accepted (bytes): the largest ViewChange or
    /// NewView ([`codec::view_change_bytes_max`]), at least [`BFT_MESSAGE_BYTES_MIN`]. A
    /// larger one is not sent (counted as dropped) and not received.
    pub message_bytes_max: usize,
    /// Bytes queued per peer: the configured size, raised to two largest frames (a
    /// ViewChange and the NewView after it).
    pub send_queue_bytes: usize,
    /// Encoded bytes of every held send together ([`HeldSends`]): at least
    /// [`crate::bft_held::HELD_BYTES_MAX`] and two largest messages (a leader's ViewChange
    /// and NewView both wait for the guard asked for with them).
    pub held_bytes_max: usize,
}

impl BftMessageLimits {
    /// The limits of a group of `replica_count` replicas tolerating `faults_max`, with a
    /// window of `log_window_ops` and batches of at most `batch_bytes_max` bytes holding at
    /// most `batch_records` records of `record_bytes`, queuing at least
    /// `send_queue_bytes` per peer. Refused when the largest ViewChange or NewView is above
    /// [`BFT_MESSAGE_BYTES_LIMIT`], naming the largest batch that fits.
    pub fn new(
        (replica_count, faults_max, log_window_ops): (usize, u8, u64),
        (batch_bytes_max, batch_records, record_bytes): (usize, usize, usize),
        send_queue_bytes: usize,
    ) -> Result<Self, BftStartError> {
        let bound = |batch_bytes_max| {
            codec::view_change_bytes_max(replica_count, faults_max, log_window_ops, batch_bytes_max)
                .largest()
        };
        let bytes = bound(batch_bytes_max);
        if bytes > BFT_MESSAGE_BYTES_LIMIT {
            // The bound grows with the batch: the largest batch that fits, by bisection
            // (at most 64 steps).
            let (mut fits, mut above) = (0, batch_bytes_max);
            while above - fits > 1 {
                let middle = fits + (above - fits) / 2;
                if bound(middle) <= BFT_MESSAGE_BYTES_LIMIT {
                    fits = middle;
                } else {
                    above = middle;
                }
            }
            let records_fitting = fits.saturating_sub(BATCH_HEADER_BYTES)
                / (record_bytes + REQUEST_DESCRIPTOR_BYTES + REQUEST_SIGNATURE_BYTES);
            return Err(BftStartError::MessageTooLarge {
                replica_count,
                batch_records,
                bytes,
                limit: BFT_MESSAGE_BYTES_LIMIT,
                records_fitting,
                batch_bytes_fitting: records_fitting * record_bytes,
            });
        }
        let message_bytes_max = bytes.max(BFT_MESSAGE_BYTES_MIN);
        let limits = Self {
            message_bytes_max,
            send_queue_bytes: send_queue_bytes
                .max(2 * (percore_engine::message::PEER_HEADER_BYTES + message_bytes_max)),
            held_bytes_max: crate::bft_held::HELD_BYTES_MAX.max(2 * message_bytes_max),
        };
        debug_assert!(limits.message_bytes_max <= BFT_MESSAGE_BYTES_LIMIT);
        Ok(limits)
    }
}

/// A committed op waiting for the batcher to journal and apply it.
struct Committed {
    op: u64,
    view: u64,
    digest: Digest,
    batch: Vec<u8>,
    cert: CommitCert,
    /// A proven batch that passed its check when staged (applied as internal records).
    proven: Option<ProvenBatch>,
    /// The prepared request of this op (`HeldSends::prepared_for_commit`): its journal
    /// write waits for it (`commit_journals`).
    prepared: u64,
}

/// One record of the certificate journal, as read back at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// [`CERT_KIND_COMMIT`] or [`CERT_KIND_CHECKPOINT`].
    pub kind: u16,
    /// The BFT op.
    pub op: u64,
    /// The journal op of the batch (0: a null op or an invalid batch; for a checkpoint,
    /// the journal op it ends at if known).
    pub journal_op: u64,
    /// The view of the commit certificate (0 for a checkpoint).
    pub view: u64,
    /// The batch digest (commit) or the chain digest (checkpoint).
    pub digest: Digest,
    /// The certificate's votes.
    pub votes: Vec<Vote>,
    /// The batch bytes ([`CERT_KIND_COMMIT_BYTES`] and [`CERT_KIND_PROVEN`]; empty
    /// otherwise).
    pub batch: Vec<u8>,
    /// A commit of a signed batch ([`CERT_KIND_COMMIT`]): its client signatures, as the
    /// batch carried them (the shard journal keeps records and descriptors only; these
    /// make the batch whole again to serve it). Empty for checkpoints and in records
    /// written before client authentication.
    pub signatures: Vec<u8>,
}

impl CertRecord {
    /// Parses a record's bytes (see `stage_cert`).
    pub fn decode(kind: u16, bytes: &[u8]) -> Option<CertRecord> {
        let number = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        let digest: Digest = bytes.get(24..56)?.try_into().ok()?;
        let (votes, used) = codec::decode_votes(bytes.get(56..)?).ok()?;
        let rest = bytes.get(56 + used..)?;
        let (batch, signatures) = if kind == CERT_KIND_COMMIT_BYTES || kind == CERT_KIND_PROVEN {
            let length = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            (
                (rest.len() == 4 + length).then(|| rest[4..].to_vec())?,
                Vec::new(),
            )
        } else if rest.len().is_multiple_of(REQUEST_SIGNATURE_BYTES) {
            (Vec::new(), rest.to_vec())
        } else {
            return None;
        };
        Some(CertRecord {
            kind,
            op: number(0)?,
            journal_op: number(8)?,
            view: number(16)?,
            digest,
            votes,
            batch,
            signatures,
        })
    }
}

/// Largest certificate record for batches of at most `batch_bytes_max` bytes: a
/// [`CERT_KIND_COMMIT_BYTES`] record holding the largest batch.
pub fn cert_record_bytes_max(batch_bytes_max: usize) -> usize {
    CERT_RECORD_BYTES_MAX + 4 + batch_bytes_max
}

/// The certificate journal of `shard` beside its journal `journal_dir`:
/// `<data-dir>/bft-certs-<shard>/` (a data directory holding one is a BFT replica's).
pub fn certs_dir(journal_dir: &Path, shard: usize) -> PathBuf {
    journal_dir
        .parent()
        .unwrap_or(journal_dir)
        .join(format!("bft-certs-{shard}"))
}

/// What the certificate journal restores, with the journal's durable head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecovery {
    /// The certificate journal op of the last record that stays; those after it certify
    /// batches the journal lost and are cut.
    pub cert_op_kept: u64,
    /// The last stable checkpoint certificate and the digests of the ops after it.
    pub low_cert: Option<CheckpointCert>,
    /// See [`Restored::digests`].
    pub digests: Vec<Digest>,
    /// `(checkpoint op, journal op it ends at)` of the last checkpoint ops.
    pub checkpoint_ops: Vec<(u64, u64)>,
    /// The installed snapshot the digests follow, `(op, chain digest)`, if one is above
    /// `low_cert` ([`BftReplica::restore_above`]).
    pub base: Option<(u64, Digest)>,
    /// The records read up to `cert_op_kept`: the running shard goes on from it.
    pub scan: CertScan,
}

/// The fields of a certificate record that recovery reads ([`CertScan::step`]).
#[derive(Debug, Clone, Copy)]
pub struct CertEntry<'a> {
    /// See [`CertRecord::kind`].
    pub kind: u16,
    /// See [`CertRecord::op`].
    pub op: u64,
    /// See [`CertRecord::journal_op`].
    pub journal_op: u64,
    /// See [`CertRecord::digest`].
    pub digest: Digest,
    /// See [`CertRecord::votes`].
    pub votes: &'a [Vote],
}

impl CertRecord {
    /// The fields recovery reads.
    pub fn entry(&self) -> CertEntry<'_> {
        CertEntry {
            kind: self.kind,
            op: self.op,
            journal_op: self.journal_op,
            digest: self.digest,
            votes: &self.votes,
        }
    }
}

/// Magic of an encoded [`CertScan`] (the certificate journal's checkpoint snapshot).
pub const CERT_SCAN_MAGIC: u64 = 0x5043_4345_5254_5331; // "PCCERTS1"
/// Ops of [`CertScan::above`] an encoded scan may hold: the log window bounds them in a
/// running replica; this bounds what a decoder accepts.
pub const CERT_SCAN_ABOVE_MAX: usize = 1 << 20;

/// The certificate journal read up to one record: what recovery restores from the records
/// up to it. The running shard keeps one, fed every record it journals (`stage_cert`), and
/// checkpoints the certificate journal at its last record with its encoding
/// ([`CertScan::encode`]) as the snapshot: a restart decodes that base and reads only the
/// records after it ([`recover_certs_from`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertScan {
    /// Certificate journal op of the last record read (0: none).
    pub cert_op: u64,
    /// The last committed BFT op read.
    pub op: u64,
    /// The last journal op read.
    pub journal_op: u64,
    /// The chain digest at `op`.
    pub chain: Digest,
    /// `(op, chain digest)` of the last checkpoint record (`(0, genesis)`: none).
    pub low: (u64, Digest),
    /// The last checkpoint record's certificate.
    pub low_cert: Option<CheckpointCert>,
    /// See [`CertRecovery::base`].
    pub base: Option<(u64, Digest)>,
    /// `(op, batch digest, chain digest)` of the ops above `base`, or else above `low`.
    pub above: Vec<(u64, Digest, Digest)>,
    /// See [`CertRecovery::checkpoint_ops`]: at most [`CHECKPOINT_OPS_TRACKED`].
    pub checkpoint_ops: VecDeque<(u64, u64)>,
}

impl Default for CertScan {
    fn default() -> Self {
        Self::genesis()
    }
}

impl CertScan {
    /// An empty certificate journal.
    pub fn genesis() -> Self {
        CertScan {
            cert_op: 0,
            op: 0,
            journal_op: 0,
            chain: bft::message::CHAIN_GENESIS,
            low: (0, bft::message::CHAIN_GENESIS),
            low_cert: None,
            base: None,
            above: Vec::with_capacity(COMMITTED_QUEUE_OPS),
            checkpoint_ops: VecDeque::with_capacity(CHECKPOINT_OPS_TRACKED),
        }
    }

    /// Reads the next record against a journal whose durable head is `journal_op_durable`:
    /// `Ok(true)` if it stays, `Ok(false)` if it and every record after it are cut (its
    /// batch is not in the journal; nothing changes), an error if the records do not fit
    /// together (nothing changes either).
    pub fn step(
        &mut self,
        record: CertEntry<'_>,
        journal_op_durable: u64,
        checkpoint_interval_ops: u64,
    ) -> Result<bool, BftStartError> {
        match record.kind {
            CERT_KIND_COMMIT_BYTES if record.journal_op != 0 => {
                return Err(BftStartError::Recovery(
                    "a record of batch bytes names a journal op",
                ));
            }
            CERT_KIND_PROVEN if record.journal_op == 0 => {
                return Err(BftStartError::Recovery(
                    "a record of a proven batch names no journal op",
                ));
            }
            CERT_KIND_SNAPSHOT => {
                // Made durable before the journal switched to the snapshot: a journal
                // that did not switch yet is below it, and the record is cut.
                if record.journal_op > journal_op_durable || record.op <= self.op {
                    return Ok(false);
                }
                self.op = record.op;
                self.journal_op = record.journal_op;
                self.chain = record.digest;
                self.above.clear();
                self.base = Some((record.op, record.digest));
                self.checkpoint_op_push(record.op, record.journal_op);
            }
            CERT_KIND_COMMIT | CERT_KIND_COMMIT_BYTES | CERT_KIND_PROVEN => {
                if record.op != self.op + 1 {
                    return Err(BftStartError::Recovery(
                        "commit records are not consecutive",
                    ));
                }
                if record.journal_op != 0 {
                    if record.journal_op > journal_op_durable {
                        return Ok(false);
                    }
                    if record.journal_op != self.journal_op + 1 {
                        return Err(BftStartError::Recovery("journal ops are not consecutive"));
                    }
                    self.journal_op = record.journal_op;
                }
                self.chain = bft::chain_digest(&self.chain, record.op, &record.digest);
                self.op = record.op;
                self.above.push((record.op, record.digest, self.chain));
                if record.op.is_multiple_of(checkpoint_interval_ops) {
                    self.checkpoint_op_push(record.op, self.journal_op);
                }
            }
            CERT_KIND_CHECKPOINT => {
                if record.op > self.op {
                    return Ok(false);
                }
                let chain_at = self
                    .above
                    .iter()
                    .find(|(op, _, _)| *op == record.op)
                    .map(|(_, _, chain)| *chain)
                    .or(self
                        .base
                        .filter(|(op, _)| *op == record.op)
                        .map(|(_, chain)| chain));
                if chain_at != Some(record.digest) {
                    return Err(BftStartError::Recovery(
                        "a checkpoint certificate does not match the committed ops",
                    ));
                }
                self.above.retain(|(op, _, _)| *op > record.op);
                self.base = self.base.filter(|(op, _)| *op > record.op);
                self.low = (record.op, record.digest);
                self.low_cert = Some(CheckpointCert {
                    votes: record.votes.to_vec(),
                });
            }
            _ => return Err(BftStartError::Recovery("unknown record kind")),
        }
        self.cert_op += 1;
        Ok(true)
    }

    fn checkpoint_op_push(&mut self, op: u64, journal_op: u64) {
        if self.checkpoint_ops.len() == CHECKPOINT_OPS_TRACKED {
            self.checkpoint_ops.pop_front();
        }
        self.checkpoint_ops.push_back((op, journal_op));
    }

    /// Appends the encoding of this scan for `group` to `out`: magic, group, `cert_op`,
    /// `op`, `journal_op`, `chain`, `low`, the low certificate's votes (a flag, then
    /// [`codec::encode_votes`]), `base` (a flag, op, digest), `checkpoint_ops` and `above`
    /// (each a `u32` count, then the items), integers little-endian.
    pub fn encode(&self, group: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(&CERT_SCAN_MAGIC.to_le_bytes());
        out.extend_from_slice(&group.to_le_bytes());
        for value in [self.cert_op, self.op, self.journal_op] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&self.chain);
        out.extend_from_slice(&self.low.0.to_le_bytes());
        out.extend_from_slice(&self.low.1);
        out.push(u8::from(self.low_cert.is_some()));
        if let Some(cert) = &self.low_cert {
            codec::encode_votes(&cert.votes, out);
        }
        let (flag, (base_op, base_chain)) = match self.base {
            Some(base) => (1, base),
            None => (0, (0, [0; 32])),
        };
        out.push(flag);
        out.extend_from_slice(&base_op.to_le_bytes());
        out.extend_from_slice(&base_chain);
        out.extend_from_slice(&(self.checkpoint_ops.len() as u32).to_le_bytes());
        for (op, journal_op) in &self.checkpoint_ops {
            out.extend_from_slice(&op.to_le_bytes());
            out.extend_from_slice(&journal_op.to_le_bytes());
        }
        out.extend_from_slice(&(self.above.len() as u32).to_le_bytes());
        for (op, digest, _) in &self.above {
            out.extend_from_slice(&op.to_le_bytes());
            out.extend_from_slice(digest);
        }
    }

    /// Decodes [`CertScan::encode`]'s bytes of `group`, checking that they fit together:
    /// the ops above consecutive from the base (or the last checkpoint), chained to `chain`
    /// at `op`. Refuses anything else with [`BftStartError::CertBase`].
    pub fn decode(bytes: &[u8], group: u32) -> Result<CertScan, BftStartError> {
        let refused = BftStartError::CertBase;
        let mut reader = ScanReader { bytes };
        if reader.u64()? != CERT_SCAN_MAGIC {
            return Err(refused("not a certificate journal base"));
        }
        if reader.take(4)? != group.to_le_bytes() {
            return Err(refused("the base of another group"));
        }
        let mut scan = CertScan {
            cert_op: reader.u64()?,
            op: reader.u64()?,
            journal_op: reader.u64()?,
            chain: reader.digest()?,
            low: (reader.u64()?, reader.digest()?),
            ..CertScan::genesis()
        };
        scan.low_cert = match reader.take(1)?[0] {
            0 => None,
            1 => {
                let (votes, used) = codec::decode_votes(reader.bytes)
                    .map_err(|_| refused("the checkpoint certificate cannot be decoded"))?;
                reader.take(used)?;
                Some(CheckpointCert { votes })
            }
            _ => return Err(refused("a flag is neither 0 nor 1")),
        };
        let flag = reader.take(1)?[0];
        let base = (reader.u64()?, reader.digest()?);
        scan.base = match flag {
            0 => None,
            1 => Some(base),
            _ => return Err(refused("a flag is neither 0 nor 1")),
        };
        let count = reader.count(CHECKPOINT_OPS_TRACKED)?;
        for _ in 0..count {
            let point = (reader.u64()?, reader.u64()?);
            scan.checkpoint_ops.push_back(point);
        }
        let count = reader.count(CERT_SCAN_ABOVE_MAX)?;
        // The ops above start after the base, or else the last checkpoint.
        let (mut op, mut chain) = scan.base.unwrap_or(scan.low);
        for _ in 0..count {
            let (above_op, digest) = (reader.u64()?, reader.digest()?);
            if above_op != op + 1 {
                return Err(refused("the ops above the checkpoint are not consecutive"));
            }
            op = above_op;
            chain = bft::chain_digest(&chain, op, &digest);
            scan.above.push((op, digest, chain));
        }
        if !reader.bytes.is_empty() {
            return Err(refused("trailing bytes"));
        }
        if (op, chain) != (scan.op, scan.chain) || scan.cert_op == 0 {
            return Err(refused(
                "the ops above the checkpoint do not chain to its head",
            ));
        }
        Ok(scan)
    }
}

/// Reads the fields of an encoded [`CertScan`].
struct ScanReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ScanReader<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8], BftStartError> {
        if self.bytes.len() < length {
            return Err(BftStartError::CertBase("short"));
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64, BftStartError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn digest(&mut self) -> Result<Digest, BftStartError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }

    fn count(&mut self, max: usize) -> Result<usize, BftStartError> {
        let count = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        if count > max {
            return Err(BftStartError::CertBase("a count is out of range"));
        }
        Ok(count)
    }
}

/// Reads the certificate journal's records against a journal whose durable head is
/// `journal_op_durable`: ops must be consecutive from 1, journal ops consecutive from 1,
/// checkpoint certificates must match the chain of the ops before them. Records whose batch
/// the journal does not hold (certificates are made durable first) and all after them are
/// left out. A journal holding batches no kept record certifies is refused.
pub fn recover_certs(
    records: &[CertRecord],
    journal_op_durable: u64,
    checkpoint_interval_ops: u64,
) -> Result<CertRecovery, BftStartError> {
    recover_certs_from(
        CertScan::genesis(),
        records,
        journal_op_durable,
        checkpoint_interval_ops,
    )
}

/// [`recover_certs`] from a base: `scan` is the certificate journal read up to its
/// checkpoint, and `records` the records after it. A base above the journal's durable head
/// is refused ([`BftStartError::CertBaseAhead`]): the certificate journal is checkpointed
/// only at records whose batches the journal holds, and cannot cut records below its
/// checkpoint.
pub fn recover_certs_from(
    mut scan: CertScan,
    records: &[CertRecord],
    journal_op_durable: u64,
    checkpoint_interval_ops: u64,
) -> Result<CertRecovery, BftStartError> {
    if scan.journal_op > journal_op_durable {
        return Err(BftStartError::CertBaseAhead {
            base_journal_op: scan.journal_op,
            journal_op_durable,
        });
    }
    for record in records {
        if !scan.step(record.entry(), journal_op_durable, checkpoint_interval_ops)? {
            break;
        }
    }
    if scan.journal_op != journal_op_durable {
        return Err(BftStartError::Recovery(
            "the journal holds batches whose commit certificates are not in the certificate \
             journal (written by a version that journaled batches first?)",
        ));
    }
    Ok(CertRecovery {
        cert_op_kept: scan.cert_op,
        low_cert: scan.low_cert.clone(),
        digests: scan.above.iter().map(|(_, digest, _)| *digest).collect(),
        checkpoint_ops: scan.checkpoint_ops.iter().copied().collect(),
        base: scan.base,
        scan,
    })
}

/// Encodes guard record `sequence` of `group`'s `replica` into `slot` (one
/// [`GUARD_SLOT_BYTES`] copy; zeros after the record).
pub fn guard_slot_encode(
    group: u32,
    replica: u8,
    sequence: u64,
    guard: &VoteGuard,
    slot: &mut [u8],
) {
    assert_eq!(slot.len(), GUARD_SLOT_BYTES);
    slot.fill(0);
    slot[..8].copy_from_slice(&GUARD_FILE_MAGIC);
    slot[8..12].copy_from_slice(&group.to_le_bytes());
    slot[12] = replica;
    for (index, value) in [
        sequence,
        guard.vote_view,
        guard.vote_op_max,
        guard.view_change_view,
    ]
    .into_iter()
    .enumerate()
    {
        slot[16 + 8 * index..24 + 8 * index].copy_from_slice(&value.to_le_bytes());
    }
    let checksum = bft::batch_digest(&slot[..GUARD_RECORD_BYTES - 32]);
    slot[GUARD_RECORD_BYTES - 32..GUARD_RECORD_BYTES].copy_from_slice(&checksum);
}

/// Decodes one copy: `Ok(None)` when it holds no intact record (never written, or torn by
/// a crash mid-write), an error when an intact record names another group or replica.
pub fn guard_slot_decode(
    slot: &[u8],
    group: u32,
    replica: u8,
) -> Result<Option<(u64, VoteGuard)>, &'static str> {
    if slot.len() < GUARD_RECORD_BYTES
        || slot[..8] != GUARD_FILE_MAGIC
        || bft::batch_digest(&slot[..GUARD_RECORD_BYTES - 32])[..]
            != slot[GUARD_RECORD_BYTES - 32..GUARD_RECORD_BYTES]
    {
        return Ok(None);
    }
    if slot[8..12] != group.to_le_bytes() || slot[12] != replica || slot[13..16] != [0; 3] {
        return Err("written for another group or replica");
    }
    let number = |index: usize| {
        u64::from_le_bytes(
            slot[16 + 8 * index..24 + 8 * index]
                .try_into()
                .expect("8 bytes"),
        )
    };
    let guard = VoteGuard {
        vote_view: number(1),
        vote_op_max: number(2),
        view_change_view: number(3),
    };
    Ok(Some((number(0), guard)))
}

/// Decodes a vote guard file: the intact copy with the highest sequence, or a version-1
/// file. A file with no intact copy is refused (what this replica signed is unknown).
pub fn guard_decode(bytes: &[u8], group: u32, replica: u8) -> Result<VoteGuard, &'static str> {
    if bytes.len() == GUARD_FILE_V1_BYTES && bytes[..8] == GUARD_FILE_V1_MAGIC {
        return guard_decode_v1(bytes, group, replica);
    }
    if bytes.len() != GUARD_FILE_BYTES {
        return Err("not a vote guard file (wrong size)");
    }
    let mut latest: Option<(u64, VoteGuard)> = None;
    for slot in bytes.chunks_exact(GUARD_SLOT_BYTES) {
        if let Some((sequence, guard)) = guard_slot_decode(slot, group, replica)?
            && latest.is_none_or(|(newest, _)| sequence > newest)
        {
            latest = Some((sequence, guard));
        }
    }
    latest
        .map(|(_, guard)| guard)
        .ok_or("neither copy of the vote guard is intact")
}

/// Decodes a version-1 vote guard file (one copy: magic, group, replica, the three
/// views/ops, blake3 checksum).
fn guard_decode_v1(bytes: &[u8], group: u32, replica: u8) -> Result<VoteGuard, &'static str> {
    debug_assert!(bytes.len() == GUARD_FILE_V1_BYTES && bytes[..8] == GUARD_FILE_V1_MAGIC);
    if bft::batch_digest(&bytes[..GUARD_FILE_V1_BYTES - 32])[..]
        != bytes[GUARD_FILE_V1_BYTES - 32..]
    {
        return Err("checksum mismatch");
    }
    if bytes[8..12] != group.to_le_bytes() || bytes[12] != replica || bytes[13..16] != [0; 3] {
        return Err("written for another group or replica");
    }
    let number = |index: usize| {
        u64::from_le_bytes(
            bytes[16 + 8 * index..24 + 8 * index]
                .try_into()
                .expect("8 bytes"),
        )
    };
    Ok(VoteGuard {
        vote_view: number(0),
        vote_op_max: number(1),
        view_change_view: number(2),
    })
}

/// Creates the vote guard file with `guard` in both copies (sequences 0 and 1): a
/// temporary file, `fsync`, rename over any older file, `fsync` of the directory (no
/// `fsync`s under `--fsync never`). Plain `std::fs`, once at start before the shard serves
/// anything; later writes go in place ([`GuardFile::write`]).
pub fn guard_create(
    path: &std::path::Path,
    group: u32,
    replica: u8,
    guard: &VoteGuard,
    fsync: FsyncPolicy,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut bytes = vec![0u8; GUARD_FILE_BYTES];
    for (sequence, slot) in bytes.chunks_exact_mut(GUARD_SLOT_BYTES).enumerate() {
        guard_slot_encode(group, replica, sequence as u64, guard, slot);
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&bytes)?;
    if fsync.is_durable() {
        file.sync_all()?;
    }
    drop(file);
    std::fs::rename(&temporary, path)?;
    if fsync.is_durable()
        && let Some(dir) = path.parent()
    {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The open vote guard file of one shard. Each write puts the next sequence into the copy
/// that does not hold the latest guard, in place: one O_DIRECT sector write and one
/// `fdatasync`, no rename and no directory `fsync`. A crash mid-write can tear only that
/// copy; the other still holds the previous guard, which covers every vote sent so far,
/// because sends made after the core asked for the new guard wait for this write
/// (`guard_loop`).
pub struct GuardFile {
    file: DmaFile,
    group: u32,
    replica: u8,
    /// The sequence of the latest guard written.
    sequence: u64,
    fsync: FsyncPolicy,
}

impl std::fmt::Debug for GuardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardFile")
            .field("group", &self.group)
            .field("replica", &self.replica)
            .field("sequence", &self.sequence)
            .field("fsync", &self.fsync)
            .finish_non_exhaustive()
    }
}

impl GuardFile {
    /// Creates the file holding `guard` ([`guard_create`]) and opens it for writes in
    /// place.
    pub async fn create(
        path: &std::path::Path,
        group: u32,
        replica: u8,
        guard: &VoteGuard,
        fsync: FsyncPolicy,
    ) -> std::io::Result<GuardFile> {
        guard_create(path, group, replica, guard, fsync)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(path)
            .await
            .map_err(std::io::Error::from)?;
        // Written through io_uring: a later process waits out what is in flight at a crash.
        crate::io_fence::hold(&file)?;
        Ok(GuardFile {
            file,
            group,
            replica,
            sequence: GUARD_SLOTS - 1,
            fsync,
        })
    }

    /// Makes `guard` durable (the file then reads back as `guard`).
    pub async fn write(&mut self, guard: &VoteGuard) -> std::io::Result<()> {
        let sequence = self.sequence + 1;
        // Rare (about once per window of ops and once per view change): a fresh DMA buffer
        // each time rather than one kept for the shard's lifetime.
        let mut buffer = self.file.alloc_dma_buffer(GUARD_SLOT_BYTES);
        guard_slot_encode(
            self.group,
            self.replica,
            sequence,
            guard,
            buffer.as_bytes_mut(),
        );
        let offset = (sequence % GUARD_SLOTS) * GUARD_SLOT_BYTES as u64;
        let written = self
            .file
            .write_at(buffer, offset)
            .await
            .map_err(std::io::Error::from)?;
        if written != GUARD_SLOT_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short vote guard write: {written} of {GUARD_SLOT_BYTES} bytes"),
            ));
        }
        if self.fsync.is_durable() {
            self.file.fdatasync().await.map_err(std::io::Error::from)?;
        }
        self.sequence = sequence;
        Ok(())
    }
}

/// BFT state of one shard, shared by its tasks (borrows never cross an await).
pub(crate) struct Bft {
    pub(crate) settings: BftSettings,
    pub(crate) replica: RefCell<BftReplica>,
    pub(crate) outboxes: Box<[Outbox]>,
    identity: PeerIdentity,
    pub(crate) actions: RefCell<Vec<Action>>,
    committed: RefCell<VecDeque<Committed>>,
    /// The batcher's turn: commits taken from `committed`, staged and then applied.
    applying: RefCell<Vec<(Committed, Option<u64>)>>,
    /// The highest BFT op applied to the state machine (the core commits ahead of it).
    applied_op: Cell<u64>,
    encoded: RefCell<Vec<u8>>,
    /// The certificate journal; the batcher takes it out while it awaits.
    pub(crate) certs: RefCell<Option<Journal>>,
    /// Snapshot checkpoints and certified snapshot fetches (`bft_snapshot`).
    pub(crate) snapshot: RefCell<crate::bft_snapshot::SnapshotState>,
    cert_record: RefCell<Vec<u8>>,
    /// The low watermark whose certificate was last journaled.
    low_journaled: Cell<u64>,
    /// `(bft op, journal op)` at recent checkpoint ops.
    checkpoint_ops: RefCell<VecDeque<(u64, u64)>>,
    /// `(bft op, certificate journal op of its commit record)` at checkpoint ops (and
    /// `(0, 0)`, the genesis, or the certificate journal's base after a restart): where
    /// serving a state transfer starts reading.
    cert_index: RefCell<VecDeque<(u64, u64)>>,
    /// The certificate journal read up to its last staged record (`stage_cert` feeds it):
    /// the base of its next checkpoint. `None` once a record did not fit (the journal is
    /// then no longer checkpointed, and a restart reads it as before).
    cert_scan: RefCell<Option<CertScan>>,
    /// Scratch for the encoded base of a certificate journal checkpoint.
    cert_base: RefCell<Vec<u8>>,
    /// Certificate journal bytes written since its last checkpoint (or replayed at start).
    cert_bytes_unchecked: Cell<u64>,
    /// The stable checkpoint at the certificate journal's last checkpoint (or at start).
    cert_checkpoint_low: Cell<u64>,
    /// State transfer requests to serve in the next batcher turn, one per peer (a later
    /// request replaces an earlier one): `(from_op, to_op)`.
    serve_requests: RefCell<[Option<(u64, u64)>; bft::REPLICA_COUNT_MAX]>,
    /// Evidence records already logged (the core keeps the first `EVIDENCE_KEPT_MAX`).
    evidence_logged: Cell<usize>,
    metrics_seen: Cell<BftMetrics>,
    /// Test only: alternate digests of the equivocating leader's proposals.
    alternates: RefCell<VecDeque<((u64, u64), Digest)>>,
    byzantine_counter: Cell<u64>,
    /// Client request signatures, verified and remembered; the core checks proposals
    /// with the same verifier ([`SharedVerifier`]).
    verifier: Rc<RefCell<RequestVerifier>>,
    /// `verifier.verifies()` last exported.
    verifies_seen: Cell<u64>,
    /// The signature of the request each connection slot submitted: `(client id, request
    /// number)` and the signature (the leader proposes each request with it).
    signatures: RefCell<Box<[Option<SubmittedSignature>]>>,
    /// Leader: scratch for a proposal (the sealed batch's parts, record origins, and the
    /// signed batch's parts).
    proposal: RefCell<ProposalScratch>,
    /// The vote guard file (`guard_loop` takes it) and the prepared certificate log
    /// (`prepared_loop` takes it).
    guard_file: RefCell<Option<GuardFile>>,
    prepared_log: RefCell<Option<PreparedLog>>,
    /// Prepared certificates the core asked to persist (`Action::PersistPrepared`), not
    /// yet in a write: at most one per op of the window and view, so bounded by the core.
    prepared_wanted: RefCell<Vec<bft::PreparedEntry>>,
    /// The stable checkpoint whose certificate is durable in the certificate journal:
    /// prepared certificates at or below it may go.
    low_durable: Cell<u64>,
    /// The latest guard the core asked for (`Action::PersistGuard`); `guard_loop`'s
    /// wake-up.
    guard_requested: Cell<VoteGuard>,
    guard_wanted: LocalNotify,
    /// `prepared_loop`'s wake-up: a prepared request, or a guard write landed.
    prepared_wake: LocalNotify,
    /// The batcher's wake-up while its journal write waits for a prepared write.
    prepared_landed: LocalNotify,
    /// The numbers of the guard and prepared requests (asked for, durable) and the sends
    /// that wait for them.
    held: RefCell<HeldSends>,
    /// Transfers between shards: outputs this replica signs, and proofs for its group.
    pub(crate) xshard: crate::bft_xshard::XShard,
    /// The largest message and the queue sizes, fixed at start.
    limits: BftMessageLimits,
}

/// A verified request's identity and signature, kept for the leader's proposal.
type SubmittedSignature = ((u128, u64), [u8; REQUEST_SIGNATURE_BYTES]);

/// Buffers the leader builds a signed proposal in, allocated at start.
struct ProposalScratch {
    records: Vec<u8>,
    requests: Vec<u8>,
    origins: Vec<crate::core::Origin>,
    signed_records: Vec<u8>,
    signed_requests: Vec<u8>,
    signatures: Vec<u8>,
    /// [`Byzantine::ReplayRequest`] only: the first request of each of the last
    /// [`REPLAY_REQUEST_BEHIND`] proposals, oldest first.
    replay: VecDeque<KeptRequest>,
}

/// The verifier as the core's proposal check: the driver and the core share one, so what
/// either verified is not verified again.
struct SharedVerifier(Rc<RefCell<RequestVerifier>>);

impl ProposalCheck for SharedVerifier {
    fn check_proposal(&mut self, batch: &[u8], digest: &Digest) -> Result<(), RequestAuthError> {
        self.0.borrow_mut().check_batch(batch, digest)
    }
}

impl Bft {
    /// Opens the certificate journal and builds the core of `shard`'s group: fresh on an
    /// empty data directory, else restored from the certificate journal (cut to what the
    /// replayed journal holds) and the vote guard file.
    ///
    /// The shard has `connections_max` client connection slots and records of
    /// `record_bytes`, whose leader-assigned fields `normalize` resets
    /// (`StateMachine::unprepare`) before client signatures are checked.
    pub(crate) async fn start(
        settings: BftSettings,
        shard: usize,
        journal: &Journal,
        ((cluster_id, settings_digest), (connections_max, record_bytes)): (
            (u128, u64),
            (usize, usize),
        ),
        (shards, records_max): (usize, usize),
        normalize: bft::request::RecordNormalizer,
        now_us: u64,
    ) -> Result<Self, BftStartError> {
        settings.check()?;
        let main = journal.config();
        // A batch larger than the largest valid one (what the journal holds, and a client
        // signature per request, each request at least one record and its descriptor) is
        // refused before it is prepared; every batch committed fits a certificate record.
        let batch_bytes_max = batch_bytes_max_of(main.body_bytes_max, record_bytes);
        let mut config = BftConfig::new(shard as u32, settings.replica);
        config.durability_reported = true;
        // The core hands over no more undurable commits than the queue holds.
        config.commits_undurable_ops_max = COMMITTED_QUEUE_OPS as u64;
        config.batch_bytes_max = batch_bytes_max;
        // Frames and queues hold the largest ViewChange and NewView of this group (or it
        // is refused here, before the certificate journal is opened).
        let limits = BftMessageLimits::new(
            (
                settings.peers.len(),
                settings.faults_max,
                config.log_window_ops,
            ),
            (
                batch_bytes_max,
                main.body_bytes_max / (record_bytes + REQUEST_DESCRIPTOR_BYTES),
                record_bytes,
            ),
            settings.send_queue_bytes,
        )?;
        let certs_config = JournalConfig {
            dir: certs_dir(&main.dir, shard),
            shard: shard as u32,
            cluster_id,
            segment_bytes: main.segment_bytes,
            body_bytes_max: cert_record_bytes_max(batch_bytes_max),
            fsync: main.fsync,
            write_buffer_bytes: CERT_WRITE_BUFFER_BYTES.max(
                percore_engine::journal::entry_bytes_padded(cert_record_bytes_max(batch_bytes_max)),
            ),
        };
        // The records after the certificate journal's checkpoint, and its snapshot: the
        // base they continue ([`CertScan`]).
        let mut records: Vec<CertRecord> = Vec::new();
        let mut undecodable = false;
        let mut base_read: Option<(u64, Vec<u8>)> = None;
        let mut cert_bytes_unchecked = 0;
        let (mut certs, _) = Journal::open_checkpointed(
            certs_config,
            crate::journal::JournalOptions::default(),
            |meta, bytes| {
                base_read = Some((meta.op, bytes.to_vec()));
                Ok(())
            },
            |entry| {
                cert_bytes_unchecked += entry_bytes_padded(entry.records().len()) as u64;
                match CertRecord::decode(entry.meta.operation, entry.records()) {
                    Some(record) => records.push(record),
                    None => undecodable = true,
                }
            },
        )
        .await?;
        if undecodable {
            return Err(BftStartError::Recovery("a record cannot be decoded"));
        }
        let base_scan = match base_read {
            None => None,
            Some((cert_op, bytes)) => {
                let scan = CertScan::decode(&bytes, shard as u32)?;
                if scan.cert_op != cert_op {
                    return Err(BftStartError::CertBase(
                        "the base does not end at the certificate journal's checkpoint",
                    ));
                }
                Some(scan)
            }
        };
        let base_cert_op = base_scan.as_ref().map_or(0, |scan| scan.cert_op);
        if certs.op_durable() != base_cert_op + records.len() as u64 {
            return Err(BftStartError::CertBase(
                "the records read back do not follow the certificate journal's checkpoint",
            ));
        }
        let guard_path = main
            .dir
            .parent()
            .unwrap_or(&main.dir)
            .join(format!("bft-guard-{shard}"));
        let committee = Committee::new(
            shard as u32,
            settings.faults_max,
            settings.public_keys.clone(),
        )?;
        let key = settings.secret_key.clone();
        let guard = guard_read(&guard_path, shard as u32, settings.replica)?;
        let (prepared_log, prepared) = PreparedLog::open(
            &crate::bft_prepared::prepared_dir(&main.dir, shard),
            shard as u32,
            settings.replica,
            main.fsync,
        )
        .await?;
        let (mut replica, recovery) = match guard {
            None if journal.op_durable() == 0 && certs.op_durable() == 0 => {
                (BftReplica::new(config, committee, key, now_us)?, None)
            }
            None => {
                return Err(BftStartError::GuardMissing {
                    ops: journal.op_durable().max(certs.op_durable()),
                    path: guard_path,
                });
            }
            Some(guard) => {
                if let Some(scan) = &base_scan {
                    tracing::info!(
                        shard,
                        replica = settings.replica,
                        cert_op = scan.cert_op,
                        op = scan.op,
                        journal_op = scan.journal_op,
                        low = scan.low.0,
                        records_after = records.len(),
                        "BFT certificate journal restarts from its base"
                    );
                }
                let recovery = recover_certs_from(
                    base_scan.clone().unwrap_or_default(),
                    &records,
                    journal.op_durable(),
                    config.checkpoint_interval_ops,
                )?;
                if recovery.cert_op_kept < certs.op_durable() {
                    certs.truncate_after(recovery.cert_op_kept).await?;
                }
                let prepared_count = prepared.len();
                let restored = Restored {
                    low_cert: recovery.low_cert.clone(),
                    digests: recovery.digests.clone(),
                    guard,
                    prepared,
                };
                let replica = BftReplica::restore_above(
                    config,
                    committee,
                    key,
                    now_us,
                    recovery.base,
                    restored,
                )?;
                tracing::info!(
                    shard,
                    replica = settings.replica,
                    commit_op = replica.commit_op(),
                    low = replica.low(),
                    view = replica.view(),
                    journal_op = journal.op_durable(),
                    records_cut = base_cert_op + records.len() as u64 - recovery.cert_op_kept,
                    prepared = prepared_count,
                    ?guard,
                    "BFT replica restarts: it signs nothing its vote guard covers"
                );
                (replica, Some(recovery))
            }
        };
        let verifier = Rc::new(RefCell::new(RequestVerifier::new(
            shard as u32,
            settings.clients.clone(),
            record_bytes,
            Some(normalize),
        )));
        let xshard = crate::bft_xshard::XShard::new(
            &settings,
            (shard as u32, shards as u32),
            (record_bytes, records_max),
        )?;
        // Every proven batch the leader can build fits the core's largest batch (and so a
        // certificate record).
        if xshard.proven_batch_bytes_max(settings.peers.len()) > batch_bytes_max {
            return Err(bft::xshard::XShardError::OutOfRange(
                "largest proven batch above the largest batch",
            )
            .into());
        }
        // A proposal is a client-signed batch or a batch of other groups' certified outputs
        // for this group (`docs/bft.md` §14); backups vote for nothing else.
        let check = SignedOrProven::new(
            SharedVerifier(verifier.clone()),
            xshard.groups().clone(),
            shard as u32,
            record_bytes,
            xshard.records_max(),
        )?;
        replica.set_proposal_check(Box::new(check));
        let records_max = BATCH_ENTRIES_MAX_LIMIT;
        let proposal = ProposalScratch {
            records: Vec::with_capacity(records_max * record_bytes),
            requests: Vec::with_capacity(records_max * REQUEST_DESCRIPTOR_BYTES),
            origins: Vec::with_capacity(records_max),
            signed_records: Vec::with_capacity((records_max + 1) * record_bytes),
            signed_requests: Vec::with_capacity((records_max + 1) * REQUEST_DESCRIPTOR_BYTES),
            signatures: Vec::with_capacity((records_max + 1) * REQUEST_SIGNATURE_BYTES),
            replay: VecDeque::new(),
        };
        // Rewritten at every start (both copies intact, version 2): from here on the
        // guard is written in place.
        let guard_file = GuardFile::create(
            &guard_path,
            shard as u32,
            settings.replica,
            &replica.guard(),
            main.fsync,
        )
        .await
        .map_err(|error| BftStartError::Guard {
            path: guard_path.clone(),
            reason: error.to_string(),
        })?;
        let low_journaled = replica.low();
        let replica_guard = replica.guard();
        // Serving starts at a checkpoint op's record, or at the base (the records before
        // it are not read back).
        let mut cert_index = VecDeque::with_capacity(CERT_INDEX_CHECKPOINTS);
        cert_index.push_back(
            base_scan
                .as_ref()
                .map_or((0, 0), |scan| (scan.op, scan.cert_op)),
        );
        let records_kept = recovery.as_ref().map_or(0, |recovery| {
            (recovery.cert_op_kept - base_cert_op) as usize
        });
        for (index, record) in records[..records_kept].iter().enumerate() {
            let commit = matches!(
                record.kind,
                CERT_KIND_COMMIT | CERT_KIND_COMMIT_BYTES | CERT_KIND_PROVEN
            );
            if (commit && record.op.is_multiple_of(config.checkpoint_interval_ops))
                || record.kind == CERT_KIND_SNAPSHOT
            {
                if cert_index.len() == CERT_INDEX_CHECKPOINTS {
                    cert_index.pop_front();
                }
                cert_index.push_back((record.op, base_cert_op + index as u64 + 1));
            }
        }
        let mut checkpoint_ops = VecDeque::with_capacity(CHECKPOINT_OPS_TRACKED);
        checkpoint_ops.extend(
            recovery
                .iter()
                .flat_map(|recovery| &recovery.checkpoint_ops),
        );
        let outboxes = Outbox::for_peers(
            settings.replica_count(),
            settings.replica,
            limits.send_queue_bytes,
        );
        let identity = PeerIdentity {
            cluster_id,
            group: shard as u32,
            replica: settings.replica,
            replica_count: settings.replica_count(),
            peers_digest: crate::config::PeersDigest::of(&settings.peers).0 ^ BFT_PEERS_DIGEST_SALT,
            settings_digest,
        };
        tracing::info!(
            shard,
            replica = settings.replica,
            n = settings.replica_count(),
            f = settings.faults_max,
            byzantine = ?settings.byzantine,
            message_bytes_max = limits.message_bytes_max,
            "BFT replica starts"
        );
        if let Some(behaviour) = settings.byzantine {
            tracing::warn!(
                shard,
                ?behaviour,
                "TEST ONLY: this replica is Byzantine on purpose (--bft-test-byzantine)"
            );
        }
        let cert_scan = recovery.map_or_else(CertScan::genesis, |recovery| recovery.scan);
        assert_eq!(cert_scan.cert_op, certs.op_durable());
        let snapshot =
            crate::bft_snapshot::SnapshotState::new(replica.commit_op(), replica.commit_chain());
        let replica_commit_op = replica.commit_op();
        Ok(Self {
            replica: RefCell::new(replica),
            outboxes,
            identity,
            actions: RefCell::new(Vec::with_capacity(4 * bft::LOG_WINDOW_OPS_DEFAULT as usize)),
            committed: RefCell::new(VecDeque::with_capacity(COMMITTED_QUEUE_OPS)),
            applying: RefCell::new(Vec::with_capacity(COMMITTED_QUEUE_OPS)),
            applied_op: Cell::new(replica_commit_op),
            encoded: RefCell::new(Vec::with_capacity(limits.message_bytes_max)),
            certs: RefCell::new(Some(certs)),
            cert_record: RefCell::new(Vec::with_capacity(cert_record_bytes_max(batch_bytes_max))),
            low_journaled: Cell::new(low_journaled),
            snapshot: RefCell::new(snapshot),
            cert_index: RefCell::new(cert_index),
            cert_scan: RefCell::new(Some(cert_scan)),
            cert_base: RefCell::new(Vec::with_capacity(CERT_BASE_BYTES_INITIAL)),
            cert_bytes_unchecked: Cell::new(cert_bytes_unchecked),
            cert_checkpoint_low: Cell::new(low_journaled),
            serve_requests: RefCell::new([None; bft::REPLICA_COUNT_MAX]),
            checkpoint_ops: RefCell::new(checkpoint_ops),
            evidence_logged: Cell::new(0),
            metrics_seen: Cell::new(BftMetrics::default()),
            alternates: RefCell::new(VecDeque::with_capacity(
                bft::LOG_WINDOW_OPS_DEFAULT as usize,
            )),
            byzantine_counter: Cell::new(0),
            verifier,
            verifies_seen: Cell::new(0),
            signatures: RefCell::new(vec![None; connections_max].into_boxed_slice()),
            proposal: RefCell::new(proposal),
            guard_requested: Cell::new(replica_guard),
            guard_file: RefCell::new(Some(guard_file)),
            prepared_log: RefCell::new(Some(prepared_log)),
            prepared_wanted: RefCell::new(Vec::with_capacity(bft::LOG_WINDOW_OPS_DEFAULT as usize)),
            low_durable: Cell::new(low_journaled),
            guard_wanted: LocalNotify::default(),
            prepared_wake: LocalNotify::default(),
            prepared_landed: LocalNotify::default(),
            held: RefCell::new(HeldSends::with_bytes_max(limits.held_bytes_max)),
            xshard,
            settings,
            limits,
        })
    }

    /// Whether this replica leads its group in a normal view with room in its window, and
    /// its state machine applied the ops of the view's NewView plan: a batch is stamped
    /// from the applied state plus this leader's own proposals, and the plan's ops are not
    /// its own (stamped before them, its timestamps could fall below theirs; every replica's
    /// ledger would then record them as the last committed timestamp plus one, not as
    /// stamped). With nothing left to apply, the state is
    /// current whatever `applied_op` says (a snapshot installed moves it without an apply).
    /// A queue borrowed elsewhere is being worked on: not empty.
    pub(crate) fn is_ready_leader(&self) -> bool {
        let replica = self.replica.borrow();
        let drained = self
            .committed
            .try_borrow()
            .is_ok_and(|committed| committed.is_empty())
            && self
                .applying
                .try_borrow()
                .is_ok_and(|applying| applying.is_empty());
        let applied = self.applied_op.get() >= replica.plan_op_max() || drained;
        replica.is_ready_leader() && applied
    }

    /// Whether committed ops wait for the batcher to journal them.
    pub(crate) fn commits_queued(&self) -> bool {
        !self.committed.borrow().is_empty()
    }

    /// The current view.
    pub(crate) fn view(&self) -> u64 {
        self.replica.borrow().view()
    }
}

/// Reads the vote guard file, `None` if there is none.
fn guard_read(
    path: &std::path::Path,
    group: u32,
    replica: u8,
) -> Result<Option<VoteGuard>, BftStartError> {
    let failed = |reason: String| BftStartError::Guard {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read(path) {
        Ok(bytes) => guard_decode(&bytes, group, replica)
            .map(Some)
            .map_err(|reason| failed(reason.into())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(failed(error.to_string())),
    }
}

/// Binds the peer listener of `shard`.
pub(crate) fn bind(settings: &BftSettings, shard: usize) -> std::io::Result<TcpListener> {
    let address = settings.peer_address(settings.replica, shard);
    TcpListener::bind(address).map_err(std::io::Error::from)
}

/// Spawns the peer listener, one sender per peer and the timer task; they end once the
/// shard is `finished`.
pub(crate) fn spawn_tasks<S>(shard: &Rc<Shard<S>>, listener: TcpListener) -> Vec<glommio::Task<()>>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut tasks = vec![glommio::spawn_local(peer_link::accept_loop::<S, Peers>(
        shard.clone(),
        listener,
    ))];
    for peer in 0..bft.settings.replica_count() {
        if peer != bft.settings.replica {
            tasks.push(glommio::spawn_local(peer_link::sender_loop::<S, Peers>(
                shard.clone(),
                peer,
            )));
        }
    }
    tasks.push(glommio::spawn_local(timer_loop(shard.clone())));
    tasks.push(glommio::spawn_local(guard_loop(shard.clone())));
    tasks.push(glommio::spawn_local(prepared_loop(shard.clone())));
    tasks
}

/// The BFT protocol on the shared peer transport.
struct Peers;

impl<S> PeerProtocol<S> for Peers
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    const NAME: &'static str = "BFT peer";

    fn link(shard: &Shard<S>) -> PeerLink<'_> {
        let state = bft_of(shard);
        PeerLink {
            identity: &state.identity,
            keys: &state.settings.keys,
            peers: &state.settings.peers,
            outboxes: &state.outboxes,
            send_queue_bytes: state.limits.send_queue_bytes,
            frame_bytes_max: state.limits.message_bytes_max,
            signing: Some(percore_net::peer::ReplicaSigning {
                key: &state.settings.secret_key,
                replicas: &state.settings.public_keys,
            }),
        }
    }

    fn received(shard: &Shard<S>, from: u8, header: &PeerHeader, body: &[u8]) {
        match header.command() {
            Ok(Command::Bft) => message_received(shard, from, body),
            Ok(Command::BftOutputs) => crate::bft_xshard::frame_received(shard, from, body),
            _ => {}
        }
    }
}

fn bft_of<S: StateMachine>(shard: &Shard<S>) -> &Bft {
    shard.bft.as_ref().expect("BFT shard")
}

/// One authenticated BFT frame from `from`: decode, hand to the core, run its actions.
fn message_received<S>(shard: &Shard<S>, from: u8, body: &[u8])
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    ShardMetrics::add(&shard.metrics.bft_messages_received_total, 1);
    let message = match codec::decode(body) {
        Ok(message) => message,
        Err(error) => {
            ShardMetrics::add(&shard.metrics.bft_messages_refused_total, 1);
            tracing::debug!(shard = shard.index, peer = from, %error, "BFT message undecodable");
            return;
        }
    };
    let message = match message {
        // Snapshot file transfer: between drivers, never the core's.
        Message::SnapshotRequest { journal_op, offset } => {
            crate::bft_snapshot::request_received(shard, from, journal_op, offset);
            return;
        }
        Message::SnapshotChunk {
            journal_op,
            offset,
            file_bytes,
            bytes,
        } => {
            crate::bft_snapshot::chunk_received(
                shard,
                from,
                (journal_op, offset, file_bytes),
                &bytes,
            );
            return;
        }
        message => message,
    };
    let now_us = shard.now_us();
    let mut actions = bft.actions.borrow_mut();
    actions.clear();
    let started = Instant::now();
    let outcome = bft
        .replica
        .borrow_mut()
        .on_message(now_us, from, message, &mut actions);
    ShardMetrics::add(
        &shard.metrics.bft_core_us_total,
        started.elapsed().as_micros() as u64,
    );
    match outcome {
        Ok(()) | Err(BftError::Stale) => {}
        Err(
            error @ BftError::ProposalRefused {
                error: RequestAuthError::Proven(_),
                ..
            },
        ) => {
            ShardMetrics::add(&shard.metrics.bft_messages_refused_total, 1);
            tracing::warn!(
                shard = shard.index,
                peer = from,
                view = bft.view(),
                %error,
                "BFT leader proposed outputs of another group that no quorum of it \
                 certified: no vote; the leader is suspected if the op does not commit"
            );
        }
        Err(error @ BftError::ProposalRefused { .. }) => {
            ShardMetrics::add(&shard.metrics.bft_messages_refused_total, 1);
            tracing::warn!(
                shard = shard.index,
                peer = from,
                view = bft.view(),
                %error,
                "BFT leader proposed a request no client signed: no vote; the leader is \
                 suspected if the op does not commit"
            );
        }
        Err(error) => {
            ShardMetrics::add(&shard.metrics.bft_messages_refused_total, 1);
            tracing::debug!(shard = shard.index, peer = from, %error, "BFT message refused");
        }
    }
    run_actions(shard, &mut actions);
}

/// Executes (and drains) the core's actions: sends (rewritten when Byzantine), queues
/// commits for the batcher (their batches and certificates move, uncopied), reports
/// state-transfer requests, starts snapshot fetches; then logs new evidence.
pub(crate) fn run_actions<S: StateMachine>(shard: &Shard<S>, actions: &mut Vec<Action>) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut committed_any = false;
    let mut serve_requested = false;
    for action in actions.drain(..) {
        match action {
            Action::Send { to, message } => send(shard, &[to], &message),
            Action::Broadcast { message } => {
                let me = bft.settings.replica;
                let mut others = [0u8; bft::REPLICA_COUNT_MAX];
                let mut count = 0;
                for peer in (0..bft.settings.replica_count()).filter(|peer| *peer != me) {
                    others[count] = peer;
                    count += 1;
                }
                send(shard, &others[..count], &message);
            }
            Action::Commit {
                op,
                view,
                digest,
                batch,
                cert,
            } => {
                let mut committed = bft.committed.borrow_mut();
                debug_assert!(
                    committed.len() < COMMITTED_QUEUE_OPS,
                    "the core hands over at most commits_undurable_ops_max undurable commits"
                );
                // This op's prepared certificate, if this replica voted, was asked for
                // before (`PersistPrepared` comes ahead of the Commit).
                let prepared = bft.held.borrow_mut().prepared_for_commit(op);
                committed.push_back(Committed {
                    op,
                    view,
                    digest,
                    batch,
                    cert,
                    proven: None,
                    prepared,
                });
                committed_any = true;
            }
            Action::PersistGuard { guard } => {
                // `guard_loop` writes it; every send from here on waits for it (`send`).
                bft.guard_requested.set(guard);
                bft.held.borrow_mut().request_guard();
                bft.guard_wanted.notify();
            }
            Action::PersistPrepared { entry } => {
                // Written by `prepared_loop` with every other one asked for before its next
                // write; the Commits from here on (this op's first) wait for it (`send`).
                let op = entry.cert.pre_prepare.op;
                bft.prepared_wanted.borrow_mut().push(entry);
                bft.held.borrow_mut().request_prepared(op);
                bft.prepared_wake.notify();
            }
            Action::StateTransfer { cert } => {
                ShardMetrics::add(&shard.metrics.bft_state_transfers_total, 1);
                tracing::info!(
                    shard = shard.index,
                    op = cert.op(),
                    commit_op = bft.replica.borrow().commit_op(),
                    "BFT state transfer: this replica is behind its peers' stable checkpoint; \
                     fetching the committed ops and their commit certificates from peers"
                );
            }
            Action::ServeState { to, from_op, to_op } => {
                bft.serve_requests.borrow_mut()[usize::from(to)] = Some((from_op, to_op));
                serve_requested = true;
            }
            Action::FetchSnapshot { from, cert } => {
                crate::bft_snapshot::start(shard, from, &cert);
            }
        }
    }
    log_evidence(shard);
    if committed_any || serve_requested {
        shard.batcher.notify();
    }
}

/// Logs each new piece of equivocation evidence the core holds, once.
fn log_evidence<S: StateMachine>(shard: &Shard<S>) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let replica = bft.replica.borrow();
    let evidence = replica.evidence();
    for record in &evidence[bft.evidence_logged.get().min(evidence.len())..] {
        tracing::warn!(
            shard = shard.index,
            replica = record.replica(),
            kind = ?record.first.kind,
            view = record.first.view,
            op = record.first.op,
            first = %hex(&record.first.digest),
            second = %hex(&record.second.digest),
            "BFT equivocation: two validly signed conflicting statements; evidence kept"
        );
    }
    bft.evidence_logged.set(evidence.len());
}

fn hex(digest: &Digest) -> String {
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Sends `message` to `tos`, or holds it back while a write it depends on is not durable
/// ([`HeldSends`]): every message the core makes waits for the vote guard it asked for
/// before it (a vote never reaches a peer before the guard that covers it), and one that
/// carries this replica's Commit vote also waits for the prepared certificates asked for
/// before it. The driver's own snapshot transfer messages leave at once.
pub(crate) fn send<S: StateMachine>(shard: &Shard<S>, tos: &[u8], message: &Message) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    // The core addresses replicas of the group only; one outside it (a core bug) is
    // dropped and counted, never used as an index.
    if tos.iter().any(|&to| to >= bft.settings.replica_count()) {
        debug_assert!(false, "a send to a replica outside the group: {tos:?}");
        ShardMetrics::add(
            &shard.metrics.replication_messages_dropped_total,
            tos.len() as u64,
        );
        return;
    }
    let peers = tos.iter().fold(0, |peers, to| peers | 1 << to);
    let offered = bft.held.borrow_mut().offer(peers, message);
    match offered {
        Offered::SendNow => send_now(shard, tos, message),
        Offered::Held => {}
        Offered::Dropped => ShardMetrics::add(
            &shard.metrics.replication_messages_dropped_total,
            tos.len() as u64,
        ),
    }
}

/// Sends every held send whose writes are durable, oldest first.
fn release_held<S: StateMachine>(shard: &Shard<S>) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    loop {
        // The borrow ends before the send (a Byzantine rewrite reads the core, not this).
        let next = bft.held.borrow_mut().pop_ready();
        let Some(send) = next else { break };
        let (tos, count) = send.tos();
        send_now(shard, &tos[..count], &send.message);
    }
}

/// Makes the vote guards the core asks for durable, one write at a time (a write covers
/// every request before it), and then lets out the sends held for them. Its own task,
/// beside `prepared_loop`, so that a guard write (which every vote may wait for) is never
/// queued behind a prepared certificate append (which only Commits wait for). The executor
/// never blocks on the disk.
async fn guard_loop<S>(shard: Rc<Shard<S>>)
where
    S: StateMachine + 'static,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut file = bft
        .guard_file
        .borrow_mut()
        .take()
        .expect("one guard task per shard");
    let mut guard_written = bft.guard_requested.get();
    while !shard.finished.get() {
        let guard = bft.guard_requested.get();
        let (sequence, durable) = bft.held.borrow().guard();
        if sequence == durable {
            futures_lite::future::or(
                bft.guard_wanted.wait(),
                glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)),
            )
            .await;
            continue;
        }
        if guard != guard_written {
            if let Err(error) = file.write(&guard).await {
                // Sending votes the guard does not cover could make this replica
                // contradict itself after a restart.
                panic!(
                    "shard {}: BFT vote guard write failed, stopping: {error}",
                    shard.index
                );
            }
            guard_written = guard;
            ShardMetrics::add(&shard.metrics.bft_guard_writes_total, 1);
            tracing::debug!(shard = shard.index, ?guard, "BFT vote guard persisted");
        }
        bft.held.borrow_mut().guard_landed(sequence);
        // A prepared append may have waited for this guard.
        bft.prepared_wake.notify();
        release_held(&shard);
    }
}

/// Appends the prepared certificates the core asks for to the prepared certificate log,
/// every one asked for so far in one write (one `fdatasync` covers many Commits), once the
/// guard covering the votes they hold is durable ([`HeldSends::prepared_may_write`]), and
/// then lets out the Commits held for them.
async fn prepared_loop<S>(shard: Rc<Shard<S>>)
where
    S: StateMachine + 'static,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut prepared_log = bft
        .prepared_log
        .borrow_mut()
        .take()
        .expect("one prepared certificate task per shard");
    let mut prepared = Vec::with_capacity(bft::LOG_WINDOW_OPS_DEFAULT as usize);
    while !shard.finished.get() {
        let ((sequence, durable), may_write) = {
            let held = bft.held.borrow();
            (held.prepared(), held.prepared_may_write())
        };
        if sequence == durable || !may_write {
            futures_lite::future::or(
                bft.prepared_wake.wait(),
                glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)),
            )
            .await;
            continue;
        }
        // Everything asked for up to `sequence` (the borrow ends before the await).
        std::mem::swap(&mut prepared, &mut *bft.prepared_wanted.borrow_mut());
        debug_assert!(!prepared.is_empty(), "one certificate per prepared request");
        let low = bft.low_durable.get();
        if let Err(error) = prepared_log.append(&prepared, low).await {
            // A Commit whose prepared certificate is not durable could leave a committed
            // op unreported by this replica after a restart.
            panic!(
                "shard {}: BFT prepared certificate write failed, stopping: {error}",
                shard.index
            );
        }
        ShardMetrics::add(
            &shard.metrics.bft_prepared_persisted_total,
            prepared.len() as u64,
        );
        prepared.clear();
        bft.held.borrow_mut().prepared_landed(sequence);
        bft.prepared_landed.notify();
        release_held(&shard);
    }
}

/// Encodes `message` (each Byzantine variant once) and queues it for `tos`.
fn send_now<S: StateMachine>(shard: &Shard<S>, tos: &[u8], message: &Message) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    match bft.settings.byzantine {
        // Corrupts only the snapshot chunks it serves (`bft_snapshot::serve`), or proposes
        // requests correct replicas refuse (`serve_request`) or forged ones (`propose`).
        None
        | Some(
            Byzantine::CorruptSnapshot
            | Byzantine::InvalidBatch
            | Byzantine::ForgeRequest
            | Byzantine::ForgeLeg
            | Byzantine::ReplayRequest,
        ) => push(shard, tos, message),
        Some(Byzantine::Silent) => {}
        Some(Byzantine::WrongDigest) => {
            let wrong = byzantine_digest(bft);
            push(shard, tos, &resigned(bft, message, |_| wrong));
        }
        Some(Byzantine::Equivocate) => {
            // Peers with an even index get the alternate version.
            let (alternate_set, rest): (Vec<u8>, Vec<u8>) = tos.iter().partition(|to| *to % 2 == 0);
            push(shard, &rest, message);
            if !alternate_set.is_empty() {
                let alternate = equivocation(bft, message);
                push(shard, &alternate_set, &alternate);
            }
        }
    }
}

fn push<S: StateMachine>(shard: &Shard<S>, tos: &[u8], message: &Message) {
    if tos.is_empty() {
        return;
    }
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut encoded = bft.encoded.borrow_mut();
    encoded.clear();
    if codec::encoded_bytes(message) > bft.limits.message_bytes_max {
        ShardMetrics::add(
            &shard.metrics.replication_messages_dropped_total,
            tos.len() as u64,
        );
        tracing::warn!(
            shard = shard.index,
            kind = message.name(),
            "BFT message too large: not sent"
        );
        return;
    }
    codec::encode(message, &mut encoded);
    let (view, status) = {
        let replica = bft.replica.borrow();
        let status = match replica.status() {
            bft::Status::Normal => 1,
            bft::Status::ViewChange => 2,
        };
        (replica.view(), status)
    };
    let mut header = PeerHeader::new(
        Command::Bft,
        shard.index as u32,
        view,
        bft.settings.replica,
        status,
    );
    header.checksum_body = body_checksum(&encoded);
    for to in tos {
        let queued = bft.outboxes[usize::from(*to)].send(
            header,
            &encoded,
            &shard.metrics.replication_messages_dropped_total,
        );
        ShardMetrics::add(&shard.metrics.bft_messages_sent_total, u64::from(queued));
    }
}

/// A digest no correct replica signs (test-only Byzantine behaviours).
fn byzantine_digest(bft: &Bft) -> Digest {
    let counter = bft.byzantine_counter.get() + 1;
    bft.byzantine_counter.set(counter);
    bft::batch_digest(&counter.to_le_bytes())
}

/// `message` with its own signed statement re-signed for `digest(vote)` (proposals keep
/// their batch, so the digest no longer matches it unless the caller changed the batch).
fn resigned(bft: &Bft, message: &Message, digest: impl Fn(&Vote) -> Digest) -> Message {
    let key = &bft.settings.secret_key;
    let group = bft.identity.group;
    let sign = |vote: &Vote| {
        Vote::sign(
            key,
            group,
            vote.kind,
            vote.replica,
            vote.view,
            vote.op,
            digest(vote),
        )
    };
    match message {
        Message::PrePrepare { vote, batch } => Message::PrePrepare {
            vote: sign(vote),
            batch: batch.clone(),
        },
        Message::Prepare { vote, pre_prepare } => Message::Prepare {
            vote: sign(vote),
            pre_prepare: *pre_prepare,
        },
        Message::Commit(vote) => Message::Commit(sign(vote)),
        other => other.clone(),
    }
}

/// The equivocating replica's second version of `message`: another batch for its own
/// proposals (remembered per `(view, op)`), and votes for that digest.
fn equivocation(bft: &Bft, message: &Message) -> Message {
    if let Message::PrePrepare { vote, batch } = message {
        let batch = alternate_batch(batch);
        let digest = bft::batch_digest(&batch);
        let mut alternates = bft.alternates.borrow_mut();
        if alternates.len() == alternates.capacity() {
            alternates.pop_front();
        }
        alternates.push_back(((vote.view, vote.op), digest));
        let key = &bft.settings.secret_key;
        let vote = Vote::sign(
            key,
            bft.identity.group,
            vote.kind,
            vote.replica,
            vote.view,
            vote.op,
            digest,
        );
        return Message::PrePrepare { vote, batch };
    }
    let alternates = bft.alternates.borrow();
    resigned(bft, message, |vote| {
        alternates
            .iter()
            .find(|(slot, _)| *slot == (vote.view, vote.op))
            .map_or_else(|| bft::batch_digest(&vote.digest), |(_, digest)| *digest)
    })
}

/// Another batch every client signed (test only, [`Byzantine::Equivocate`]): `batch` with
/// its first request once more at the end (a retry inside the batch, which the session
/// table answers without applying it twice), so correct backups vote for either version.
fn alternate_batch(batch: &[u8]) -> Vec<u8> {
    let Some(parts) = batch_decode(batch).filter(|parts| !parts.signatures.is_empty()) else {
        return [batch, b"equivocation"].concat();
    };
    let descriptor = |bytes: &[u8]| bytemuck::pod_read_unaligned::<RequestDescriptor>(bytes);
    let descriptors = parts.requests.chunks_exact(REQUEST_DESCRIPTOR_BYTES);
    let record_count: usize = descriptors
        .map(|bytes| descriptor(bytes).record_count as usize)
        .sum();
    let record_bytes = parts.records.len() / record_count.max(1);
    let mut first = descriptor(&parts.requests[..REQUEST_DESCRIPTOR_BYTES]);
    let start = first.record_start as usize * record_bytes;
    let end = start + first.record_count as usize * record_bytes;
    let records = [parts.records, &parts.records[start..end]].concat();
    first.record_start = record_count as u32;
    let requests = [parts.requests, bytemuck::bytes_of(&first)].concat();
    let signatures = [
        parts.signatures,
        &parts.signatures[..REQUEST_SIGNATURE_BYTES],
    ]
    .concat();
    let mut alternate = Vec::new();
    batch_encode(
        parts.operation,
        &records,
        &requests,
        &signatures,
        &mut alternate,
    );
    alternate
}

/// The core's timers: resends, status reports, leader suspicion, view-change timeouts.
async fn timer_loop<S>(shard: Rc<Shard<S>>)
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    while !shard.finished.get() {
        let now_us = shard.now_us();
        // Client requests and other groups' proofs waiting here are work the leader owes.
        let waiting = shard
            .connections
            .borrow()
            .iter()
            .any(|slot| slot.active && slot.bft_waiting.is_some())
            || bft.xshard.pending();
        {
            let mut actions = bft.actions.borrow_mut();
            actions.clear();
            let started = Instant::now();
            {
                let mut replica = bft.replica.borrow_mut();
                replica.set_pending(now_us, waiting);
                replica.on_tick(now_us, &mut actions);
            }
            ShardMetrics::add(
                &shard.metrics.bft_core_us_total,
                started.elapsed().as_micros() as u64,
            );
            run_actions(&shard, &mut actions);
        }
        crate::bft_xshard::tick(&shard);
        publish(&shard);
        // A replica that no longer leads drops what clients submitted while it did: they
        // wait for the commit from the new leader (which holds the request too).
        if !bft.is_ready_leader() && bft.replica.borrow().leader() != bft.settings.replica {
            shard.core.borrow_mut().abort_unsealed(|_| {});
        }
        shard.batcher.notify();
        let deadline = bft
            .replica
            .borrow()
            .poll_timeout()
            .min(bft.xshard.poll_timeout().unwrap_or(u64::MAX))
            .min(crate::bft_snapshot::serve_retry_at_us(&shard).unwrap_or(u64::MAX));
        let wait_us = deadline
            .saturating_sub(shard.now_us())
            .clamp(1_000, STOP_POLL_MS * 1_000);
        glommio::timer::sleep(Duration::from_micros(wait_us)).await;
    }
}

/// Publishes the core's state and counters (deltas since the last publish).
fn publish<S: StateMachine>(shard: &Shard<S>) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let replica = bft.replica.borrow();
    let metrics = &shard.metrics;
    ShardMetrics::set(&metrics.bft_view, replica.view());
    ShardMetrics::set(
        &metrics.bft_status,
        match (replica.status(), replica.state_transfer()) {
            (_, Some(_)) => 3,
            (bft::Status::Normal, None) => 1,
            (bft::Status::ViewChange, None) => 2,
        },
    );
    ShardMetrics::set(&metrics.bft_is_leader, u64::from(replica.is_ready_leader()));
    ShardMetrics::set(
        &metrics.replica_is_leader,
        u64::from(replica.is_ready_leader()),
    );
    ShardMetrics::set(&metrics.bft_commit_op, replica.commit_op());
    ShardMetrics::set(&metrics.bft_low_op, replica.low());
    ShardMetrics::set(&metrics.bft_evidence_kept, replica.evidence().len() as u64);
    let now = *replica.metrics();
    let seen = bft.metrics_seen.replace(now);
    // The core counts; the node exports what it counted since the last turn.
    let counters = [
        (
            &metrics.bft_equivocations_total,
            now.equivocations,
            seen.equivocations,
        ),
        (
            &metrics.bft_bad_signatures_total,
            now.bad_signatures,
            seen.bad_signatures,
        ),
        (
            &metrics.bft_view_changes_total,
            now.view_changes,
            seen.view_changes,
        ),
        (
            &metrics.bft_suspicions_deferred_total,
            now.suspicions_deferred,
            seen.suspicions_deferred,
        ),
        (
            &metrics.bft_checkpoints_stable_total,
            now.checkpoints_stable,
            seen.checkpoints_stable,
        ),
        (
            &metrics.bft_commit_proofs_applied_total,
            now.commit_proofs_applied,
            seen.commit_proofs_applied,
        ),
        (
            &metrics.bft_state_ops_applied_total,
            now.state_ops_applied,
            seen.state_ops_applied,
        ),
        (
            &metrics.bft_catchup_ops_applied_total,
            now.catchup_ops_applied,
            seen.catchup_ops_applied,
        ),
        (
            &metrics.bft_catchup_serves_total,
            now.catchup_serves,
            seen.catchup_serves,
        ),
        (
            &metrics.bft_state_transfers_completed_total,
            now.state_transfers_completed,
            seen.state_transfers_completed,
        ),
        (
            &metrics.bft_state_requests_total,
            now.state_requests,
            seen.state_requests,
        ),
        (
            &metrics.bft_state_serves_refused_total,
            now.state_serves_refused,
            seen.state_serves_refused,
        ),
        (
            &metrics.bft_commits_held_for_durability_total,
            now.commits_held_for_durability,
            seen.commits_held_for_durability,
        ),
        (
            &metrics.bft_state_certs_total,
            now.state_certs,
            seen.state_certs,
        ),
        (
            &metrics.bft_proposals_refused_total,
            now.proposals_refused,
            seen.proposals_refused,
        ),
    ];
    for (counter, now, seen) in counters {
        ShardMetrics::add(counter, now.saturating_sub(seen));
    }
    let verifies = bft.verifier.borrow().verifies();
    let verifies_seen = bft.verifies_seen.replace(verifies);
    ShardMetrics::add(
        &metrics.bft_client_signatures_verified_total,
        verifies - verifies_seen,
    );
    drop(replica);
    crate::bft_xshard::publish(shard);
}

/// One batcher turn of a BFT shard: propose (leader), then journal and apply what
/// committed, then install a checkpoint the follower wrote. Returns whether anything
/// happened.
pub(crate) async fn bft_turn<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let mut progressed = propose(shard);
    progressed |= journal_and_apply(shard, journal).await;
    progressed |= serve_state(shard, journal).await;
    progressed |= crate::bft_snapshot::step(shard, journal).await;
    let retain_from_op = retain_from_op(shard);
    if let Some(meta) = crate::runtime::checkpoint_install(shard, journal, retain_from_op).await {
        crate::bft_snapshot::snapshot_written(shard, &meta);
        progressed = true;
    }
    progressed |= certs_checkpoint(shard, journal).await;
    shard.core.borrow().publish_pool_metrics();
    progressed
}

/// Leader: seals what clients submitted and proposes each batch, every request with its
/// client's signature; the core keeps nothing of it (it applies once committed, like every
/// replica).
fn propose<S>(shard: &Shard<S>) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut proposed = 0;
    // Other groups' certified outputs first: their origins wait for the acknowledgements.
    while proposed < PROPOSALS_PER_TURN_MAX && crate::bft_xshard::propose_proven(shard) {
        proposed += 1;
    }
    let mut batch = Vec::new();
    while proposed < PROPOSALS_PER_TURN_MAX && bft.is_ready_leader() {
        let now_us = shard.now_us();
        let operation = {
            let mut core = shard.core.borrow_mut();
            core.observe_depth();
            if core.poll_seal(now_us).is_none() {
                break;
            }
            let mut scratch = bft.proposal.borrow_mut();
            let scratch = &mut *scratch;
            let sealed = core.sealed_batch(0).expect("just sealed");
            let operation = sealed.operation;
            scratch.records.clear();
            scratch.records.extend_from_slice(sealed.records);
            scratch.requests.clear();
            scratch.requests.extend_from_slice(sealed.requests);
            scratch.origins.clear();
            let op_last = core.op_last();
            core.truncate_queued(op_last, |origin| scratch.origins.push(origin));
            operation
        };
        let forged = signed_proposal::<S>(bft, operation, &mut batch);
        if batch.is_empty() {
            continue;
        }
        if !forged {
            // Built from requests verified at admission: nothing to verify at execution.
            bft.verifier
                .borrow_mut()
                .note_checked(bft::batch_digest(&batch));
        }
        let mut actions = bft.actions.borrow_mut();
        actions.clear();
        let started = Instant::now();
        let outcome =
            bft.replica
                .borrow_mut()
                .propose(now_us, std::mem::take(&mut batch), &mut actions);
        let elapsed_us = started.elapsed().as_micros() as u64;
        ShardMetrics::add(&shard.metrics.bft_core_us_total, elapsed_us);
        ShardMetrics::add(&shard.metrics.bft_sign_us_total, elapsed_us);
        match outcome {
            Ok(op) => {
                ShardMetrics::add(&shard.metrics.bft_proposals_total, 1);
                tracing::debug!(shard = shard.index, op, "BFT proposed");
            }
            Err(error) => tracing::warn!(shard = shard.index, %error, "BFT proposal refused"),
        }
        shard.commit_gap_work_waiting(now_us);
        run_actions(shard, &mut actions);
        proposed += 1;
    }
    proposed > 0
}

/// Builds the proposal of the sealed batch in `bft.proposal` into `batch`: each request
/// with the signature its connection submitted it with. A request whose signature is gone
/// (its connection moved on to another request) is left out; the client sends it again.
/// Empty if none is left. Returns whether a forged request was added (test only,
/// [`Byzantine::ForgeRequest`]).
fn signed_proposal<S: StateMachine>(bft: &Bft, operation: u16, batch: &mut Vec<u8>) -> bool {
    let record_bytes = size_of::<S::Record>();
    let signatures = bft.signatures.borrow();
    let mut scratch = bft.proposal.borrow_mut();
    let scratch = &mut *scratch;
    scratch.signed_records.clear();
    scratch.signed_requests.clear();
    scratch.signatures.clear();
    batch.clear();
    for descriptor in scratch.requests.chunks_exact(REQUEST_DESCRIPTOR_BYTES) {
        let mut descriptor: RequestDescriptor = bytemuck::pod_read_unaligned(descriptor);
        let key = (descriptor.client_id, descriptor.request_number);
        let submitted = match scratch.origins.get(descriptor.record_start as usize) {
            Some(crate::core::Origin::Local { connection, .. }) => {
                signatures.get(usize::from(*connection)).copied().flatten()
            }
            _ => None,
        };
        let Some((_, signature)) = submitted.filter(|(submitted, _)| *submitted == key) else {
            continue;
        };
        let start = descriptor.record_start as usize * record_bytes;
        let end = start + descriptor.record_count as usize * record_bytes;
        descriptor.record_start = (scratch.signed_records.len() / record_bytes) as u32;
        scratch
            .signed_records
            .extend_from_slice(&scratch.records[start..end]);
        scratch
            .signed_requests
            .extend_from_slice(bytemuck::bytes_of(&descriptor));
        scratch.signatures.extend_from_slice(&signature);
    }
    if scratch.signed_requests.is_empty() {
        return false;
    }
    let forged = bft.settings.byzantine == Some(Byzantine::ForgeRequest);
    if forged {
        forge_request(scratch, record_bytes);
    }
    if bft.settings.byzantine == Some(Byzantine::ReplayRequest) {
        replay_request(scratch, operation, record_bytes);
    }
    batch_encode(
        operation,
        &scratch.signed_records,
        &scratch.signed_requests,
        &scratch.signatures,
        batch,
    );
    forged
}

/// Test only ([`Byzantine::ForgeRequest`]): appends a request no client signed, the first
/// request's first record with its first 16 bytes (the ledger's transfer id) changed,
/// under the first request's client id and a request number it never used, carrying that
/// request's signature.
fn forge_request(scratch: &mut ProposalScratch, record_bytes: usize) {
    let first: RequestDescriptor =
        bytemuck::pod_read_unaligned(&scratch.signed_requests[..REQUEST_DESCRIPTOR_BYTES]);
    let mut record = scratch.signed_records[..record_bytes].to_vec();
    record[15.min(record_bytes - 1)] ^= 0x40;
    let forged = RequestDescriptor {
        client_id: first.client_id,
        request_number: first.request_number + (1 << 40),
        record_start: (scratch.signed_records.len() / record_bytes) as u32,
        record_count: 1,
    };
    scratch.signed_records.extend_from_slice(&record);
    scratch
        .signed_requests
        .extend_from_slice(bytemuck::bytes_of(&forged));
    let signature: [u8; REQUEST_SIGNATURE_BYTES] = scratch.signatures[..REQUEST_SIGNATURE_BYTES]
        .try_into()
        .expect("one signature per request");
    scratch.signatures.extend_from_slice(&signature);
}

/// Test only ([`Byzantine::ReplayRequest`]): keeps this proposal's first request and
/// appends the one kept [`REPLAY_REQUEST_BEHIND`] proposals ago, if it is of the same
/// operation and fits the scratch buffers (a proposal it takes over the batch cap is
/// refused by the backups like any other).
fn replay_request(scratch: &mut ProposalScratch, operation: u16, record_bytes: usize) {
    let first: RequestDescriptor =
        bytemuck::pod_read_unaligned(&scratch.signed_requests[..REQUEST_DESCRIPTOR_BYTES]);
    let start = first.record_start as usize * record_bytes;
    let end = start + first.record_count as usize * record_bytes;
    scratch.replay.push_back(KeptRequest {
        operation,
        descriptor: first,
        records: scratch.signed_records[start..end].to_vec(),
        signature: scratch.signatures[..REQUEST_SIGNATURE_BYTES]
            .try_into()
            .expect("one signature per request"),
    });
    if scratch.replay.len() <= REPLAY_REQUEST_BEHIND {
        return;
    }
    let kept = scratch.replay.pop_front().expect("more than kept");
    let fits = scratch.signed_records.len() + kept.records.len()
        <= scratch.signed_records.capacity()
        && scratch.signed_requests.len() < scratch.signed_requests.capacity();
    if kept.operation != operation || !fits {
        return;
    }
    tracing::info!(
        client_id = kept.descriptor.client_id,
        request_number = kept.descriptor.request_number,
        "TEST ONLY: this leader proposes an old signed request again"
    );
    let replayed = RequestDescriptor {
        record_start: (scratch.signed_records.len() / record_bytes) as u32,
        ..kept.descriptor
    };
    scratch.signed_records.extend_from_slice(&kept.records);
    scratch
        .signed_requests
        .extend_from_slice(bytemuck::bytes_of(&replayed));
    scratch.signatures.extend_from_slice(&kept.signature);
}

/// Stages every committed batch that is a batch of this shard in the journal and every
/// certificate in the certificate journal, group-commits both, then applies and answers.
async fn journal_and_apply<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let Some(mut certs) = bft.certs.borrow_mut().take() else {
        return false;
    };
    let staged = stage_committed(shard, journal, &mut certs).await;
    let low_staged = stage_checkpoint(shard, &mut certs).await;
    if staged || low_staged {
        let prepared = prepared_max(&bft.applying.borrow());
        commit_journals(shard, &mut certs, journal, prepared).await;
        ShardMetrics::add(&shard.metrics.journal_commits_total, 1);
    }
    *bft.certs.borrow_mut() = Some(certs);
    if low_staged {
        bft.low_durable.set(bft.low_journaled.get());
    }
    if staged {
        let durable_op = bft
            .applying
            .borrow()
            .last()
            .map_or(0, |(committed, _)| committed.op);
        apply_staged(shard);
        // Checkpoint votes are signed only for ops durable here.
        let mut actions = bft.actions.borrow_mut();
        actions.clear();
        bft.replica
            .borrow_mut()
            .on_durable(shard.now_us(), durable_op, &mut actions);
        run_actions(shard, &mut actions);
    }
    staged || low_staged
}

/// Stages the queued commits; returns whether any was taken.
/// Makes what is staged in the certificate journal and the journal durable, certificates
/// first: after a crash the certificate journal is never behind the journal (recovery
/// cuts certificates whose batch was lost, `recover_certs`). The journal write waits for
/// the prepared certificates asked for up to request `prepared`: a committed op durable in
/// the journal is executed after a restart, and if its commit certificate holds this
/// replica's own Commit, that vote made the op committed here (and answered its clients),
/// so the replica's later ViewChanges must report the op's prepared certificate as if the
/// Commit had been sent (section 7 of `docs/bft.md` counts it among the `f + 1`).
async fn commit_journals<S: StateMachine>(
    shard: &Shard<S>,
    certs: &mut Journal,
    journal: &mut Journal,
    prepared: u64,
) {
    if let Err(error) = certs.commit().await {
        panic!(
            "shard {}: BFT certificate journal write failed, stopping: {error}",
            shard.index
        );
    }
    let bft = shard.bft.as_ref().expect("BFT shard");
    // `prepared_loop` runs until the batcher has stopped (`finished` is set after it), and
    // the guard write it may wait for likewise: this ends.
    while bft.held.borrow().prepared().1 < prepared {
        futures_lite::future::or(
            bft.prepared_landed.wait(),
            glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)),
        )
        .await;
    }
    if let Err(error) = journal.commit().await {
        panic!(
            "shard {}: BFT journal write failed, stopping: {error}",
            shard.index
        );
    }
}

async fn stage_committed<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    certs: &mut Journal,
) -> bool {
    let bft = shard.bft.as_ref().expect("BFT shard");
    // Taken out while this awaits; put back before returning.
    let mut applying = std::mem::take(&mut *bft.applying.borrow_mut());
    debug_assert!(applying.is_empty());
    let mut journal_op = journal.op_staged();
    loop {
        // The queue's borrow ends here: receivers push to it while this awaits.
        let next = bft.committed.borrow_mut().pop_front();
        let Some(mut committed) = next else { break };
        let proven = crate::bft_xshard::is_proven(&committed.batch);
        if proven && !applying.is_empty() {
            // Its records are stamped from the state every earlier op leaves: it is staged
            // first in the next turn, once the ops staged here are applied.
            bft.committed.borrow_mut().push_front(committed);
            break;
        }
        let mut signatures: &[u8] = &[];
        let journaled = if proven {
            let ops = (&mut journal_op, prepared_max(&applying));
            stage_proven_batch(shard, journal, certs, &mut committed, ops).await
        } else {
            let checked = check_client_batch(shard, &committed);
            signatures = checked.map_or(&[][..], |(parts, _)| parts.signatures);
            match checked {
                Some((parts, entries)) => {
                    let meta = (parts.operation, entries);
                    let staged = (parts.records, parts.requests);
                    let prepared = prepared_max(&applying);
                    let ops = (&mut journal_op, prepared);
                    stage_entry(shard, journal, certs, meta, staged, ops).await;
                    Some(journal_op)
                }
                None => None,
            }
        };
        if journaled.is_none() {
            let counter = if committed.batch.is_empty() {
                &shard.metrics.bft_null_ops_total
            } else {
                &shard.metrics.bft_batches_invalid_total
            };
            ShardMetrics::add(counter, 1);
        }
        // A committed batch that is not one of this shard's keeps its bytes in its record;
        // so does a proven batch (its journal entry holds the stamped records only).
        let (kind, bytes): (u16, &[u8]) = if journaled.is_none() && !committed.batch.is_empty() {
            (CERT_KIND_COMMIT_BYTES, &committed.batch)
        } else if journaled.is_some() && proven {
            (CERT_KIND_PROVEN, &committed.batch)
        } else {
            (CERT_KIND_COMMIT, &[])
        };
        stage_cert(
            shard,
            certs,
            (kind, bytes),
            (committed.op, journaled.unwrap_or(0)),
            (committed.view, committed.digest),
            (&committed.cert.commits, signatures),
        )
        .await;
        let op = committed.op;
        crate::bft_snapshot::note_staged(shard, op, &committed.digest, journal_op);
        applying.push((committed, journaled));
        if op.is_multiple_of(bft.replica.borrow().config().checkpoint_interval_ops) {
            let mut ops = bft.checkpoint_ops.borrow_mut();
            if ops.len() == ops.capacity() {
                ops.pop_front();
            }
            ops.push_back((op, journal_op));
            let mut index = bft.cert_index.borrow_mut();
            if index.len() == CERT_INDEX_CHECKPOINTS {
                index.pop_front();
            }
            index.push_back((op, certs.op_staged()));
        }
    }
    let taken = !applying.is_empty();
    *bft.applying.borrow_mut() = applying;
    taken
}

/// The highest prepared request of the ops staged so far (`Committed::prepared`): a
/// journal write of them waits for it (`commit_journals`).
fn prepared_max(applying: &[(Committed, Option<u64>)]) -> u64 {
    applying
        .iter()
        .map(|(committed, _)| committed.prepared)
        .max()
        .unwrap_or(0)
}

/// The checks of a committed client batch: every request signed by its client, and a
/// batch of this shard ([`crate::core::ShardCore::check_committed`]). `None` (logged) if
/// it fails; the records and descriptors are then left in the core's scratch.
fn check_client_batch<'a, S: StateMachine>(
    shard: &Shard<S>,
    committed: &'a Committed,
) -> Option<(bft::request::BatchParts<'a>, usize)> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let parts = batch_decode(&committed.batch)?;
    // Every request a client signed, or nothing of the batch applies (a committed batch
    // checked here before, when voting or proposing, is not checked again).
    let authenticated = bft
        .verifier
        .borrow_mut()
        .check_batch(&committed.batch, &committed.digest);
    if let Err(error) = authenticated {
        tracing::warn!(shard = shard.index, op = committed.op, %error, "BFT committed batch skipped: not signed by its clients");
        return None;
    }
    let check =
        shard
            .core
            .borrow_mut()
            .check_committed(parts.operation, parts.records, parts.requests);
    match check {
        Ok(entries) => Some((parts, entries)),
        Err(error) => {
            tracing::warn!(shard = shard.index, op = committed.op, %error, "BFT committed batch skipped");
            None
        }
    }
}

/// A committed proven batch: checked ([`crate::bft_xshard::stage_proven`]: certificates,
/// records of this shard, stamped) and staged as the next journal op with its stamped
/// records, or `None` (logged) if it fails. Keeps the decoded batch in `committed` for
/// the apply.
async fn stage_proven_batch<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    certs: &mut Journal,
    committed: &mut Committed,
    (journal_op, prepared): (&mut u64, u64),
) -> Option<u64> {
    let (batch, entries) = match crate::bft_xshard::stage_proven(shard, &committed.batch) {
        Ok(checked) => checked,
        Err(error) => {
            tracing::warn!(shard = shard.index, op = committed.op, %error, "BFT committed proven batch skipped");
            return None;
        }
    };
    // The stamped records are copied out of the core's scratch: staging may await.
    let records = shard.core.borrow().checked_records(entries).to_vec();
    let meta = (batch.operation, entries);
    let ops = (&mut *journal_op, prepared);
    stage_entry(shard, journal, certs, meta, (&records, &[]), ops).await;
    committed.proven = Some(batch);
    Some(*journal_op)
}

/// Stages one batch of `entries` records of `operation` as the next journal op (view 0:
/// the view whose certificate commits a batch may differ between replicas, committed in
/// view v at some and by the re-proposal of a later view at others, and the journals must
/// be identical; the certificate journal keeps each replica's view).
async fn stage_entry<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    certs: &mut Journal,
    (operation, entries): (u16, usize),
    (records, requests): (&[u8], &[u8]),
    (journal_op, prepared): (&mut u64, u64),
) {
    if journal.staged_bytes() + entry_bytes_padded(records.len() + requests.len())
        > journal.write_buffer_bytes()
    {
        // As in `journal_and_apply`: certificates first, and the journal write waits for
        // the prepared requests of the ops staged so far (`prepared`, their highest).
        commit_journals(shard, certs, journal, prepared).await;
    }
    *journal_op += 1;
    let meta = EntryMeta {
        shard: shard.index as u32,
        view: 0,
        op: *journal_op,
        operation,
        entry_count: entries as u32,
        record_bytes: size_of::<S::Record>() as u32,
        request_count: (requests.len() / REQUEST_DESCRIPTOR_BYTES) as u32,
    };
    if let Err(error) = journal.stage_parts(meta, records, requests) {
        panic!("shard {}: journal refused a batch: {error}", shard.index);
    }
}

/// Answers the state transfer requests the core accepted ([`Action::ServeState`]): each
/// peer gets one `StateOps` with the committed ops it asked for, read back from the
/// certificate journal (commit certificates) and the journal (batches). Returns whether
/// any was served.
async fn serve_state<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) -> bool {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let requests = std::mem::take(&mut *bft.serve_requests.borrow_mut());
    if requests.iter().all(Option::is_none) {
        return false;
    }
    let Some(mut certs) = bft.certs.borrow_mut().take() else {
        return false;
    };
    for (to, request) in requests.iter().enumerate() {
        let Some((from_op, to_op)) = *request else {
            continue;
        };
        let ops = read_state_ops(shard, journal, &mut certs, from_op, to_op).await;
        if ops.is_empty()
            && let Some(cert) = snapshot_offer(shard, journal, from_op)
        {
            tracing::debug!(
                shard = shard.index,
                peer = to,
                from_op,
                snapshot_op = cert.op(),
                "BFT state transfer: ops gone from the log; snapshot offered"
            );
            send(shard, &[to as u8], &Message::StateSnapshot(cert));
            continue;
        }
        ShardMetrics::add(&shard.metrics.bft_state_ops_served_total, ops.len() as u64);
        tracing::debug!(
            shard = shard.index,
            peer = to,
            from_op,
            to_op,
            served = ops.len(),
            "BFT state transfer: ops served"
        );
        send(shard, &[to as u8], &Message::StateOps(ops));
    }
    *bft.certs.borrow_mut() = Some(certs);
    true
}

/// The state certificate to offer a peer whose transfer needs op `from_op`, which this
/// replica's log no longer holds: the latest one, if it covers `from_op` and its snapshot
/// file is still here (the journal's checkpoint or the one before).
fn snapshot_offer<S: StateMachine>(
    shard: &Shard<S>,
    journal: &Journal,
    from_op: u64,
) -> Option<bft::StateCert> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let replica = bft.replica.borrow();
    let cert = replica.state_cert()?;
    let superblock = journal.superblock();
    let journal_op = cert.statement.journal_op;
    let retained =
        journal_op == superblock.checkpoint.op || journal_op == superblock.checkpoint_previous.op;
    (cert.op() >= from_op && retained).then(|| cert.clone())
}

/// This replica's log now starts at BFT op `op` (journal op `journal_op`), an installed
/// snapshot whose record is certificate-journal op `cert_op`: serving and retention start
/// there.
pub(crate) fn note_base(bft: &Bft, op: u64, journal_op: u64, cert_op: u64) {
    let mut index = bft.cert_index.borrow_mut();
    if index.len() == CERT_INDEX_CHECKPOINTS {
        index.pop_front();
    }
    index.push_back((op, cert_op));
    let mut ops = bft.checkpoint_ops.borrow_mut();
    if ops.len() == ops.capacity() {
        ops.pop_front();
    }
    ops.push_back((op, journal_op));
}

/// Reads committed ops `from_op..=to_op` with their commit certificates, in op order,
/// stopping early at an op this replica cannot serve: before the oldest indexed
/// checkpoint, a batch the journal released (checkpointed), a committed batch that was not
/// a batch of this shard (its bytes are not kept), or the message size limit. Whatever is
/// read is checked again (record order, batch digest); the receiver verifies everything.
async fn read_state_ops<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    certs: &mut Journal,
    from_op: u64,
    to_op: u64,
) -> Vec<(CommitCert, Vec<u8>)> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut ops = Vec::new();
    let start = bft
        .cert_index
        .borrow()
        .iter()
        .rev()
        .find(|(op, _)| *op < from_op)
        .copied();
    // The records after the start must still be in the certificate journal (it releases
    // what lies `--bft-retain-ops` below the stable checkpoint).
    let Some((mut bft_op, mut cert_op)) =
        start.filter(|(_, cert_op)| *cert_op + 1 >= certs.op_first())
    else {
        tracing::info!(
            shard = shard.index,
            from_op,
            "BFT state transfer: ops older than the certificate index asked for; not served"
        );
        return ops;
    };
    let null = bft::batch_digest(&[]);
    let mut entry = Vec::new();
    let mut batch_entry = Vec::new();
    let mut bytes = 3;
    while bft_op < to_op && cert_op < certs.op_durable() {
        cert_op += 1;
        let record = match certs.read_entry(cert_op, &mut entry).await {
            Ok(()) => percore_engine::journal::decode_entry(&entry, certs.config().body_bytes_max)
                .ok()
                .and_then(|decoded| CertRecord::decode(decoded.meta.operation, decoded.records())),
            Err(_) => None,
        };
        let Some(record) = record else {
            tracing::warn!(
                shard = shard.index,
                cert_op,
                "BFT state transfer: certificate record unreadable"
            );
            break;
        };
        if record.kind == CERT_KIND_SNAPSHOT {
            // The log restarts above an installed snapshot: ops at or below it are not here.
            if record.op >= from_op {
                break;
            }
            bft_op = record.op;
            continue;
        }
        if !matches!(
            record.kind,
            CERT_KIND_COMMIT | CERT_KIND_COMMIT_BYTES | CERT_KIND_PROVEN
        ) {
            continue;
        }
        if record.op != bft_op + 1 {
            tracing::warn!(
                shard = shard.index,
                cert_op,
                op = record.op,
                "BFT state transfer: certificate records out of order"
            );
            break;
        }
        bft_op = record.op;
        if bft_op < from_op {
            continue;
        }
        let batch = if record.kind == CERT_KIND_COMMIT_BYTES || record.kind == CERT_KIND_PROVEN {
            if bft::batch_digest(&record.batch) != record.digest {
                tracing::warn!(
                    shard = shard.index,
                    op = bft_op,
                    "BFT state transfer: journaled batch does not match its certificate"
                );
                break;
            }
            record.batch.clone()
        } else if record.journal_op == 0 {
            if record.digest != null {
                break; // journaled by an older version without the bytes
            }
            Vec::new()
        } else {
            let read = read_batch(
                journal,
                record.journal_op,
                &record.signatures,
                &mut batch_entry,
            );
            let Some(batch) = read.await else {
                break;
            };
            if bft::batch_digest(&batch) != record.digest {
                tracing::warn!(
                    shard = shard.index,
                    op = bft_op,
                    "BFT state transfer: journaled batch does not match its certificate"
                );
                break;
            }
            batch
        };
        let op_bytes = 1 + record.votes.len() * codec::VOTE_BYTES + 4 + batch.len();
        if bytes + op_bytes > bft.limits.message_bytes_max {
            break;
        }
        bytes += op_bytes;
        ops.push((
            CommitCert {
                commits: record.votes,
            },
            batch,
        ));
    }
    ops
}

/// The batch bytes a journal entry was staged from ([`batch_encode`] of its operation,
/// records and request descriptors, with the client `signatures` its certificate record
/// kept), if the journal still holds it.
async fn read_batch(
    journal: &mut Journal,
    journal_op: u64,
    signatures: &[u8],
    entry: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    if journal_op < journal.op_first() || journal_op > journal.op_durable() {
        return None;
    }
    journal.read_entry(journal_op, entry).await.ok()?;
    let decoded =
        percore_engine::journal::decode_entry(entry, journal.config().body_bytes_max).ok()?;
    let mut batch = Vec::new();
    if signatures.len() / REQUEST_SIGNATURE_BYTES != decoded.meta.request_count as usize
        && !signatures.is_empty()
    {
        return None;
    }
    batch_encode(
        decoded.meta.operation,
        decoded.records(),
        decoded.requests(),
        signatures,
        &mut batch,
    );
    Some(batch)
}

/// Stages a certificate record: kind, BFT op, journal op (0: none), view, digest, votes,
/// and then for [`CERT_KIND_COMMIT_BYTES`] and [`CERT_KIND_PROVEN`] the batch (`length u32 |
/// bytes`), otherwise the
/// batch's client signatures (a journaled signed batch only).
pub(crate) async fn stage_cert<S: StateMachine>(
    shard: &Shard<S>,
    certs: &mut Journal,
    (kind, batch): (u16, &[u8]),
    (op, journal_op): (u64, u64),
    (view, digest): (u64, Digest),
    (votes, signatures): (&[Vote], &[u8]),
) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    // Taken out while this awaits; put back before returning.
    let mut record = std::mem::take(&mut *bft.cert_record.borrow_mut());
    record.clear();
    for value in [op, journal_op, view] {
        record.extend_from_slice(&value.to_le_bytes());
    }
    record.extend_from_slice(&digest);
    codec::encode_votes(votes, &mut record);
    if kind == CERT_KIND_COMMIT_BYTES || kind == CERT_KIND_PROVEN {
        record.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        record.extend_from_slice(batch);
    } else {
        record.extend_from_slice(signatures);
    }
    debug_assert!(record.len() <= certs.config().body_bytes_max);
    if certs.staged_bytes() + entry_bytes_padded(record.len()) > certs.write_buffer_bytes()
        && let Err(error) = certs.commit().await
    {
        panic!(
            "shard {}: certificate journal write failed, stopping: {error}",
            shard.index
        );
    }
    let meta = EntryMeta {
        shard: shard.index as u32,
        view,
        op: certs.op_staged() + 1,
        operation: kind,
        entry_count: record.len() as u32,
        record_bytes: 1,
        request_count: 0,
    };
    if let Err(error) = certs.stage(meta, &record) {
        panic!(
            "shard {}: certificate journal refused a record: {error}",
            shard.index
        );
    }
    bft.cert_bytes_unchecked
        .set(bft.cert_bytes_unchecked.get() + entry_bytes_padded(record.len()) as u64);
    *bft.cert_record.borrow_mut() = record;
    ShardMetrics::add(&shard.metrics.bft_certs_journaled_total, 1);
    let interval = bft.replica.borrow().config().checkpoint_interval_ops;
    let mut scan = bft.cert_scan.borrow_mut();
    if let Some(live) = scan.as_mut() {
        let entry = CertEntry {
            kind,
            op,
            journal_op,
            digest,
            votes,
        };
        // Nothing journaled is cut while running: every batch is staged with its record.
        match live.step(entry, u64::MAX, interval) {
            Ok(true) => debug_assert_eq!(live.cert_op, certs.op_staged()),
            outcome => {
                tracing::warn!(
                    shard = shard.index,
                    op,
                    kind,
                    ?outcome,
                    "certificate record does not continue the ones before it: the \
                     certificate journal is no longer checkpointed"
                );
                *scan = None;
            }
        }
    }
}

/// Checkpoints the certificate journal at its last record once a stable checkpoint
/// moved and it holds enough new bytes ([`CERT_CHECKPOINTS_PER_SEGMENT`]): the snapshot
/// is its base ([`CertScan::encode`]), which a restart reads instead of the records up to
/// it, and the journal releases its segments below the previous base and below the record
/// serving a peer `--bft-retain-ops` below the stable checkpoint starts at
/// (`certs_retain_from_op`), as the journal does with its own. Only records whose
/// batches the journal holds durably are covered (every staged record and batch is
/// durable between turns). The released files are removed by a task of their own.
/// Returns whether it checkpointed.
async fn certs_checkpoint<S: StateMachine>(shard: &Shard<S>, journal: &Journal) -> bool {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let low = bft.low_durable.get();
    if low <= bft.cert_checkpoint_low.get() {
        return false;
    }
    let Some(mut certs) = bft.certs.borrow_mut().take() else {
        return false;
    };
    let due = bft.cert_bytes_unchecked.get()
        >= certs.config().segment_bytes / CERT_CHECKPOINTS_PER_SEGMENT
        && certs.op_staged() == certs.op_durable()
        && certs.op_durable() > certs.checkpoint_op();
    let mut base = std::mem::take(&mut *bft.cert_base.borrow_mut());
    base.clear();
    let cert_op = match bft.cert_scan.borrow().as_ref() {
        Some(scan)
            if due
                && scan.cert_op == certs.op_durable()
                && scan.journal_op <= journal.op_durable() =>
        {
            scan.encode(shard.index as u32, &mut base);
            Some(scan.cert_op)
        }
        _ => None,
    };
    let Some(cert_op) = cert_op else {
        *bft.cert_base.borrow_mut() = base;
        *bft.certs.borrow_mut() = Some(certs);
        return false;
    };
    let retain_from_op = certs_retain_from_op(bft, low);
    let digest = *blake3::hash(&base).as_bytes();
    let done = certs
        .checkpoint_keeping_files(cert_op, &base, digest, retain_from_op)
        .await;
    let done = done.unwrap_or_else(|error| {
        panic!(
            "shard {}: certificate journal checkpoint at {cert_op} failed, stopping: {error}",
            shard.index
        )
    });
    let dir = certs.config().dir.clone();
    *bft.certs.borrow_mut() = Some(certs);
    *bft.cert_base.borrow_mut() = base;
    bft.cert_checkpoint_low.set(low);
    bft.cert_bytes_unchecked.set(0);
    ShardMetrics::add(
        &shard.metrics.bft_cert_segments_released_total,
        done.segments_released,
    );
    tracing::debug!(
        shard = shard.index,
        cert_op,
        low,
        retain_from_op,
        segments_released = done.segments_released,
        op_first = done.op_first,
        "certificate journal checkpoint"
    );
    if done.segments_released > 0 || done.snapshot_stale_op > 0 {
        let segments = done.segments_below - done.segments_released..done.segments_below;
        let index = shard.index;
        glommio::spawn_local(async move {
            if let Err(error) =
                crate::journal::remove_released(&dir, segments, done.snapshot_stale_op).await
            {
                // Left for the next checkpoint, which removes from the oldest file on.
                tracing::warn!(shard = index, %error, "certificate journal files not removed");
            }
        })
        .detach();
    }
    true
}

/// The lowest certificate journal op to keep with the stable checkpoint at `low`: the
/// first record read when serving a peer `--bft-retain-ops` below it (from the index entry
/// at or below that op; the oldest one if the full index no longer reaches that far, and
/// everything while a younger index does not, as after a restart).
fn certs_retain_from_op(bft: &Bft, low: u64) -> u64 {
    let target = low.saturating_sub(bft.settings.retain_ops);
    let index = bft.cert_index.borrow();
    let oldest = index
        .front()
        .filter(|_| index.len() == CERT_INDEX_CHECKPOINTS);
    let entry = index.iter().rev().find(|(op, _)| *op <= target).or(oldest);
    entry.map_or(1, |(_, cert_op)| cert_op + 1)
}

/// Stages the stable checkpoint certificate if the low watermark moved since the last one
/// journaled.
async fn stage_checkpoint<S: StateMachine>(shard: &Shard<S>, certs: &mut Journal) -> bool {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let (op, digest, votes) = {
        let replica = bft.replica.borrow();
        let Some(cert) = replica.low_cert() else {
            return false;
        };
        if cert.op() <= bft.low_journaled.get() {
            return false;
        }
        // Never ahead of the commit records: a checkpoint at or above a commit still queued
        // (a proven batch waits for the next turn, `stage_committed`) waits too, or recovery
        // would stop at it and find the journal ahead of its certificates.
        if bft
            .committed
            .borrow()
            .front()
            .is_some_and(|queued| queued.op <= cert.op())
        {
            return false;
        }
        (cert.op(), cert.digest(), cert.votes.clone())
    };
    bft.low_journaled.set(op);
    let journal_op = journal_op_at(bft, op).unwrap_or(0);
    stage_cert(
        shard,
        certs,
        (CERT_KIND_CHECKPOINT, &[]),
        (op, journal_op),
        (0, digest),
        (&votes, &[]),
    )
    .await;
    true
}

/// The journal op a BFT checkpoint op ends at, if still remembered.
fn journal_op_at(bft: &Bft, op: u64) -> Option<u64> {
    bft.checkpoint_ops
        .borrow()
        .iter()
        .find(|(checkpoint, _)| *checkpoint == op)
        .map(|(_, journal_op)| *journal_op)
}

/// The lowest journal op the journal must keep: what no stable checkpoint certifies yet,
/// and `--bft-retain-ops` ([`BFT_RETAIN_OPS`]) below it for peers that transfer state
/// (subject to the journal's own snapshots).
fn retain_from_op<S: StateMachine>(shard: &Shard<S>) -> u64 {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let low = bft.low_journaled.get();
    if low == 0 {
        return 1;
    }
    journal_op_at(bft, low).map_or(1, |journal_op| {
        (journal_op + 1)
            .saturating_sub(bft.settings.retain_ops)
            .max(1)
    })
}

/// Applies what this turn journaled and answers the clients waiting on this replica.
fn apply_staged<S>(shard: &Shard<S>)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut applying = bft.applying.borrow_mut();
    for (committed, journal_op) in applying.drain(..) {
        bft.applied_op.set(bft.applied_op.get().max(committed.op));
        if let Some(journal_op) = journal_op {
            apply_one(shard, &committed, journal_op);
        }
        // At a snapshot op, the legs in flight now (right after it: a null op or a skipped
        // batch changes nothing) are signed from state.
        if snapshot_due(shard, committed.op) {
            let core = shard.core.borrow();
            let journal_op = core.op_last();
            if journal_op > 0 {
                crate::bft_xshard::produce_in_flight(shard, &core, journal_op);
            }
        }
    }
    shard.commit_gap_advanced();
}

/// Whether BFT op `op` is a snapshot op of this shard (`bft_snapshot::note_staged` asks
/// the checkpoint follower for a snapshot there): every replica picks the same ones.
fn snapshot_due<S: StateMachine>(shard: &Shard<S>, op: u64) -> bool {
    let interval = shard
        .config
        .journal
        .as_ref()
        .map_or(0, |journal| journal.checkpoint_interval_ops);
    interval > 0
        && crate::checkpoint::checkpoint_due(op, shard.index, shard.config.cores.len(), interval)
}

/// Applies one journaled committed op and answers its clients.
fn apply_one<S>(shard: &Shard<S>, committed: &Committed, journal_op: u64)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    if let Some(batch) = &committed.proven {
        crate::bft_xshard::apply_proven(shard, journal_op, batch);
        return;
    }
    let parts = batch_decode(&committed.batch).expect("checked before journaling");
    let mut core = shard.core.borrow_mut();
    let applied = core.apply_committed(
        journal_op,
        parts.operation,
        parts.records,
        parts.requests,
        |request, results| {
            answer(shard, request.client_id, request.request_number, results);
        },
    );
    applied.expect("checked before journaling");
    // Credit legs for other shards: signed here, certified by the group, delivered.
    crate::bft_xshard::produce(shard, &mut core, journal_op);
}

/// A client request as the runtime read it: envelope, operation, records, and the
/// client's signature (a `SignedRequest` frame's trailer).
pub(crate) type ClientRequest<'a, S> = (
    &'a frame::Envelope,
    <S as StateMachine>::Operation,
    &'a [<S as StateMachine>::Record],
    Option<&'a [u8; REQUEST_SIGNATURE_BYTES]>,
);

/// Hands `results` to the connection on this replica waiting for `(client_id,
/// request_number)`, if any.
fn answer<S: StateMachine>(
    shard: &Shard<S>,
    client_id: u128,
    request_number: u64,
    results: &[S::Result],
) {
    let mut connections = shard.connections.borrow_mut();
    let Some(index) = connections
        .iter()
        .position(|slot| slot.active && slot.bft_waiting == Some((client_id, request_number)))
    else {
        return;
    };
    let slot = &mut connections[index];
    if slot.remaining as usize != results.len() {
        return;
    }
    slot.results[..results.len()].copy_from_slice(results);
    slot.remaining = 0;
    slot.bft_waiting = None;
    drop(connections);
    shard.connection_done[index].notify();
}

/// Answers the connections waiting for a request that is applied here without a commit
/// of this replica's (an installed snapshot holds it), from the session table: they would
/// otherwise wait for a commit that never comes here, with work pending.
pub(crate) fn answer_applied<S: StateMachine>(shard: &Shard<S>) {
    let waiting: Vec<((u128, u64), u32)> = shard
        .connections
        .borrow()
        .iter()
        .filter(|slot| slot.active)
        .filter_map(|slot| slot.bft_waiting.map(|key| (key, slot.remaining)))
        .collect();
    for ((client_id, request_number), count) in waiting {
        let results = shard
            .core
            .borrow()
            .state_machine()
            .session_reply(client_id, request_number, count)
            .map(<[S::Result]>::to_vec);
        if let Some(results) = results {
            answer(shard, client_id, request_number, &results);
        }
    }
}

/// Serves one client request on a BFT replica: a replayed request is answered from the
/// session table; otherwise the connection waits for the request's commit, and while this
/// replica is the ready leader the request goes into its core to be proposed (again in
/// each view it leads). Returns after writing the reply.
pub(crate) async fn serve_request<S>(
    shard: &Rc<Shard<S>>,
    slot: usize,
    stream: &mut TcpStream,
    request: ClientRequest<'_, S>,
    reply: &mut [u8],
) -> std::io::Result<()>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let (envelope, operation, records, signature) = request;
    let count = records.len();
    let key = (envelope.client_id, envelope.request_number);
    if let Some(behaviour) = bft
        .settings
        .byzantine
        .filter(|behaviour| !behaviour.serves_clients_correctly())
    {
        // Test only: a made-up answer at once (or none), then the request takes its normal
        // course here (proposed if this replica leads) without a real answer.
        if behaviour.lies_to_clients() {
            let mut lies: Vec<S::Result> = vec![bytemuck::Zeroable::zeroed(); count];
            bytemuck::cast_slice_mut::<S::Result, u8>(&mut lies).fill(0x5a);
            let bytes = frame::encode_reply(reply, envelope, &lies);
            stream.write_all(&reply[..bytes]).await?;
        }
        if envelope.client_id != 0
            && count > 0
            && count <= shard.core.borrow().request_records_max()
        {
            if let Some(signature) = signature {
                bft.signatures.borrow_mut()[slot] = Some((key, *signature));
            }
            wait_for_commit(shard, slot, key, operation, records).await;
        }
        return Ok(());
    }
    let refusal = if envelope.client_id == 0 {
        Some(ERROR_BFT_NEEDS_CLIENT_ID)
    } else if count == 0 || count > shard.core.borrow().request_records_max() {
        Some(crate::runtime::ERROR_TOO_MANY_RECORDS)
    } else if records
        .iter()
        .any(|record| S::route(operation, record, shard.shards as u32) as usize != shard.index)
    {
        Some(crate::runtime::ERROR_WRONG_SHARD)
    } else {
        authenticate(shard, envelope, records, signature)
    };
    if let Some(code) = refusal {
        let bytes = frame::encode_error_reply(reply, envelope, code);
        return stream.write_all(&reply[..bytes]).await;
    }
    let signature = signature.expect("authenticated");
    bft.signatures.borrow_mut()[slot] = Some((key, *signature));
    let replayed = {
        let core = shard.core.borrow();
        core.state_machine()
            .session_reply(key.0, key.1, count as u32)
            .map(|results| frame::encode_reply(reply, envelope, results))
    };
    if let Some(bytes) = replayed {
        return stream.write_all(&reply[..bytes]).await;
    }
    let answered =
        !is_stale(shard, key, count) && wait_for_commit(shard, slot, key, operation, records).await;
    let bytes = if answered {
        let connections = shard.connections.borrow();
        frame::encode_reply(reply, envelope, &connections[slot].results[..count])
    } else if is_stale(shard, key, count) {
        ShardMetrics::add(&shard.metrics.bft_stale_requests_total, 1);
        frame::encode_error_reply(reply, envelope, ERROR_BFT_STALE_REQUEST)
    } else {
        frame::encode_error_reply(reply, envelope, crate::runtime::ERROR_SERVER_BUSY)
    };
    stream.write_all(&reply[..bytes]).await
}

/// Whether request `key` of `count` records is behind this replica's session for its
/// client ([`StateMachine::session_stale`], [`ERROR_BFT_STALE_REQUEST`]).
fn is_stale<S: StateMachine>(shard: &Shard<S>, key: (u128, u64), count: usize) -> bool {
    shard
        .core
        .borrow()
        .state_machine()
        .session_stale(key.0, key.1, count as u32)
}

/// Admission: the request's signature by its client, or the refusal code (1015: the client
/// id has no key; 1016: unsigned, or the signature does not verify).
fn authenticate<S: StateMachine>(
    shard: &Shard<S>,
    envelope: &frame::Envelope,
    records: &[S::Record],
    signature: Option<&[u8; REQUEST_SIGNATURE_BYTES]>,
) -> Option<u32> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut verifier = bft.verifier.borrow_mut();
    let statement = verifier.statement(
        envelope.client_id,
        envelope.request_number,
        envelope.operation,
        bytemuck::cast_slice(records),
    );
    let outcome = match signature {
        Some(signature) => verifier.verify_request(&statement, signature),
        None if verifier.clients().key(envelope.client_id).is_none() => {
            Err(RequestAuthError::UnknownClient {
                client_id: envelope.client_id,
            })
        }
        None => Err(RequestAuthError::BadSignature {
            client_id: envelope.client_id,
            request_number: envelope.request_number,
        }),
    };
    let code = match outcome {
        Ok(()) => return None,
        Err(RequestAuthError::UnknownClient { .. }) => ERROR_BFT_UNKNOWN_CLIENT,
        Err(_) => ERROR_BFT_BAD_SIGNATURE,
    };
    ShardMetrics::add(&shard.metrics.bft_client_requests_refused_total, 1);
    tracing::debug!(
        shard = shard.index,
        client_id = envelope.client_id,
        request_number = envelope.request_number,
        code,
        "BFT client request refused: not authenticated"
    );
    Some(code)
}

/// `StateMachine::unprepare` on every record of `records` (a
/// [`bft::request::RecordNormalizer`]): in place when they are aligned for `S::Record`,
/// else one copy at a time.
pub(crate) fn unprepare<S: StateMachine>(operation: u16, records: &mut [u8]) {
    let Some(operation) = S::client_operation(operation) else {
        return;
    };
    match bytemuck::try_cast_slice_mut::<u8, S::Record>(records) {
        Ok(typed) => typed
            .iter_mut()
            .for_each(|record| S::unprepare(operation, record)),
        Err(_) => {
            for record in records.chunks_exact_mut(size_of::<S::Record>()) {
                let mut typed: S::Record = bytemuck::pod_read_unaligned(record);
                S::unprepare(operation, &mut typed);
                record.copy_from_slice(bytemuck::bytes_of(&typed));
            }
        }
    }
}

/// Waits until the request `key` commits here (true) or the wait times out or the node
/// stops (false); submits it to the core in each view this replica leads.
async fn wait_for_commit<S>(
    shard: &Rc<Shard<S>>,
    slot: usize,
    key: (u128, u64),
    operation: S::Operation,
    records: &[S::Record],
) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let generation = {
        let mut connections = shard.connections.borrow_mut();
        connections[slot].remaining = records.len() as u32;
        connections[slot].bft_waiting = Some(key);
        connections[slot].generation
    };
    bft.replica.borrow_mut().set_pending(shard.now_us(), true);
    let deadline = Instant::now() + Duration::from_millis(BFT_REQUEST_WAIT_MS);
    let mut submitted_view = None;
    let origin = |index: u32| crate::core::Origin::Local {
        connection: slot as u16,
        generation,
        index,
    };
    loop {
        if shard.connections.borrow()[slot].remaining == 0 {
            return true;
        }
        // Stale: the client's session here moved past it while this replica caught up
        // (it will not be proposed again); the caller answers it. A stopping replica owes
        // nothing: the client asks every replica (`finished` alone came only after every
        // connection had ended, so a stop waited out the whole deadline).
        if Instant::now() >= deadline
            || shard.stopping()
            || shard.finished.get()
            || is_stale(shard, key, records.len())
        {
            let mut connections = shard.connections.borrow_mut();
            connections[slot].bft_waiting = None;
            connections[slot].remaining = 0;
            return false;
        }
        let view = bft.view();
        if bft.is_ready_leader() && submitted_view != Some(view) {
            let submitted = shard
                .core
                .borrow_mut()
                .submit_request(operation, records, origin, key.0, key.1);
            match submitted {
                Ok(()) => {
                    submitted_view = Some(view);
                    ShardMetrics::add(&shard.metrics.session_requests_total, 1);
                }
                Err(_) => ShardMetrics::add(&shard.metrics.pool_exhausted_total, 1),
            }
            shard.batcher.notify();
        }
        futures_lite::future::or(
            shard.connection_done[slot].wait(),
            glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS / 5)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_malformed_ones_are_refused() {
        let mut batch = Vec::new();
        batch_encode(7, &[1; 256], &[2; 64], &[3; 128], &mut batch);
        let parts = batch_decode(&batch).expect("decodes");
        assert_eq!(
            (
                parts.operation,
                parts.records,
                parts.requests,
                parts.signatures
            ),
            (7, &[1u8; 256][..], &[2u8; 64][..], &[3u8; 128][..])
        );
        assert_eq!(batch_decode(&batch[..7]), None, "short header");
        assert_eq!(batch_decode(&batch[..100]), None, "records cut");
        assert_eq!(batch_decode(&batch[..BATCH_HEADER_BYTES + 256 + 10]), None);
        batch[2] = 7;
        assert_eq!(batch_decode(&batch), None, "unknown format");
        assert_eq!(batch_decode(&[]), None, "the null op is no batch");
    }

    /// A guard file image holding `first` (sequence 6, slot 0) and `second` (sequence 7,
    /// slot 1).
    fn guard_file_image(first: &VoteGuard, second: &VoteGuard) -> Vec<u8> {
        let mut bytes = vec![0u8; GUARD_FILE_BYTES];
        let (slot0, slot1) = bytes.split_at_mut(GUARD_SLOT_BYTES);
        guard_slot_encode(0, 2, 6, first, slot0);
        guard_slot_encode(0, 2, 7, second, slot1);
        bytes
    }

    #[test]
    fn certificate_records_keep_client_signatures_and_read_older_records() {
        let votes = vec![Vote::sign(
            &SigningKey::from_bytes(&[1; 32]),
            0,
            bft::VoteKind::Commit,
            0,
            2,
            9,
            [4; 32],
        )];
        let mut bytes = Vec::new();
        for value in [9u64, 5, 2] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes.extend_from_slice(&[4; 32]);
        codec::encode_votes(&votes, &mut bytes);
        // Written before client authentication: no signatures.
        let older = CertRecord::decode(CERT_KIND_COMMIT, &bytes).expect("older record");
        assert_eq!((older.op, older.journal_op, older.view), (9, 5, 2));
        assert!(older.signatures.is_empty());
        bytes.extend_from_slice(&[6; 2 * REQUEST_SIGNATURE_BYTES]);
        let signed = CertRecord::decode(CERT_KIND_COMMIT, &bytes).expect("signed record");
        assert_eq!(signed.votes, votes);
        assert_eq!(signed.signatures, vec![6; 2 * REQUEST_SIGNATURE_BYTES]);
        bytes.push(0);
        assert_eq!(
            CertRecord::decode(CERT_KIND_COMMIT, &bytes),
            None,
            "partial signature"
        );
    }

    #[test]
    fn vote_guard_files_round_trip_and_torn_or_damaged_copies_are_handled() {
        let older = VoteGuard {
            vote_view: 3,
            vote_op_max: 96,
            view_change_view: 3,
        };
        let newer = VoteGuard {
            view_change_view: 4,
            ..older
        };
        let bytes = guard_file_image(&older, &newer);
        assert_eq!(
            guard_decode(&bytes, 0, 2),
            Ok(newer),
            "the higher sequence wins"
        );
        let mut swapped = bytes.clone();
        let (slot0, slot1) = swapped.split_at_mut(GUARD_SLOT_BYTES);
        guard_slot_encode(0, 2, 9, &newer, slot0);
        guard_slot_encode(0, 2, 8, &older, slot1);
        assert_eq!(
            guard_decode(&swapped, 0, 2),
            Ok(newer),
            "whichever slot holds it"
        );
        assert!(guard_decode(&bytes, 0, 1).is_err(), "another replica's");
        assert!(guard_decode(&bytes, 1, 2).is_err(), "another group's");
        assert!(guard_decode(&bytes[1..], 0, 2).is_err(), "short");
        // A write torn anywhere in the record of the newest copy: the older one is read.
        for index in [0, 12, 13, 20, 40, GUARD_RECORD_BYTES - 1] {
            let mut torn = bytes.clone();
            torn[GUARD_SLOT_BYTES + index] ^= 1;
            assert_eq!(guard_decode(&torn, 0, 2), Ok(older), "byte {index}");
        }
        let mut unwritten = bytes.clone();
        unwritten[GUARD_SLOT_BYTES..].fill(0);
        assert_eq!(
            guard_decode(&unwritten, 0, 2),
            Ok(older),
            "a copy never written"
        );
        let mut both = bytes.clone();
        both[20] ^= 1;
        both[GUARD_SLOT_BYTES + 20] ^= 1;
        assert!(guard_decode(&both, 0, 2).is_err(), "no intact copy");
        // Version 1 (one copy) is still read at start.
        let mut v1 = [0u8; GUARD_FILE_V1_BYTES];
        v1[..8].copy_from_slice(&GUARD_FILE_V1_MAGIC);
        v1[12] = 2;
        for (index, value) in [3u64, 96, 4].into_iter().enumerate() {
            v1[16 + 8 * index..24 + 8 * index].copy_from_slice(&value.to_le_bytes());
        }
        let checksum = bft::batch_digest(&v1[..GUARD_FILE_V1_BYTES - 32]);
        v1[GUARD_FILE_V1_BYTES - 32..].copy_from_slice(&checksum);
        assert_eq!(guard_decode(&v1, 0, 2), Ok(newer));
        v1[30] ^= 1;
        assert!(guard_decode(&v1, 0, 2).is_err(), "damaged version 1");
    }

    #[test]
    fn vote_guard_file_is_written_in_place_and_a_torn_write_leaves_the_previous_guard() {
        let dir = std::env::temp_dir().join(format!("percore-guard-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bft-guard-0");
        let inner = path.clone();
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(move || async move {
                let path = inner;
                let first = VoteGuard {
                    vote_view: 1,
                    vote_op_max: 64,
                    view_change_view: 1,
                };
                let mut file = GuardFile::create(&path, 0, 2, &first, FsyncPolicy::Always)
                    .await
                    .unwrap();
                assert_eq!(guard_read(&path, 0, 2).unwrap(), Some(first));
                let mut guard = first;
                for round in 0..5 {
                    let previous = guard;
                    guard.vote_op_max += 32;
                    guard.view_change_view += round % 2;
                    file.write(&guard).await.unwrap();
                    assert_eq!(guard_read(&path, 0, 2).unwrap(), Some(guard));
                    assert_eq!(
                        std::fs::metadata(&path).unwrap().len(),
                        GUARD_FILE_BYTES as u64
                    );
                    // Tear the copy just written: the previous guard is read back.
                    let mut bytes = std::fs::read(&path).unwrap();
                    let slot = (file.sequence % GUARD_SLOTS) as usize * GUARD_SLOT_BYTES;
                    bytes[slot + 30] ^= 0xff;
                    assert_eq!(guard_decode(&bytes, 0, 2), Ok(previous), "round {round}");
                }
            })
            .unwrap()
            .join()
            .unwrap();
        // A restart rewrites both copies (renamed into place) with the guard read.
        let guard = guard_read(&path, 0, 2).unwrap().unwrap();
        guard_create(&path, 0, 2, &guard, FsyncPolicy::Always).unwrap();
        assert_eq!(guard_read(&path, 0, 2).unwrap(), Some(guard));
        assert!(guard_read(&path, 0, 1).is_err(), "another replica's");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(guard_read(&path, 0, 2).unwrap(), None);
    }

    fn commit(op: u64, journal_op: u64) -> CertRecord {
        CertRecord {
            kind: CERT_KIND_COMMIT,
            op,
            journal_op,
            view: 0,
            digest: bft::batch_digest(&op.to_le_bytes()),
            votes: Vec::new(),
            batch: Vec::new(),
            signatures: Vec::new(),
        }
    }

    #[test]
    fn certificate_recovery_cuts_what_the_journal_lost_and_refuses_gaps() {
        // Ops 1..=5; op 3 a null op; journal ops 1..=4.
        let records: Vec<CertRecord> = [(1, 1), (2, 2), (3, 0), (4, 3), (5, 4)]
            .into_iter()
            .map(|(op, journal_op)| commit(op, journal_op))
            .collect();
        let all = recover_certs(&records, 4, 16).unwrap();
        assert_eq!(all.cert_op_kept, 5);
        assert_eq!(all.digests.len(), 5);
        assert_eq!(all.low_cert, None);
        // The journal lost its last batch (certificates are written first): cut op 5.
        let cut = recover_certs(&records, 3, 16).unwrap();
        assert_eq!(cut.cert_op_kept, 4);
        assert_eq!(cut.digests, all.digests[..4]);
        // A journal ahead of its certificates, or a gap, is refused.
        assert!(recover_certs(&records[..3], 3, 16).is_err());
        let gap = [commit(1, 1), commit(3, 2)];
        assert!(recover_certs(&gap, 2, 16).is_err());
        // A checkpoint record must match the chain of the ops before it.
        let mut chain = bft::message::CHAIN_GENESIS;
        for record in &records[..4] {
            chain = bft::chain_digest(&chain, record.op, &record.digest);
        }
        let mut checkpoint = CertRecord {
            kind: CERT_KIND_CHECKPOINT,
            op: 4,
            journal_op: 3,
            view: 0,
            digest: chain,
            votes: Vec::new(),
            batch: Vec::new(),
            signatures: Vec::new(),
        };
        let mut with_checkpoint = records.clone();
        with_checkpoint.insert(4, checkpoint.clone());
        let recovered = recover_certs(&with_checkpoint, 4, 4).unwrap();
        assert_eq!(recovered.cert_op_kept, 6);
        assert_eq!(
            recovered.digests,
            all.digests[4..],
            "only ops above the checkpoint"
        );
        assert_eq!(recovered.checkpoint_ops, vec![(4, 3)]);
        checkpoint.digest[0] ^= 1;
        with_checkpoint[4] = checkpoint;
        assert!(recover_certs(&with_checkpoint, 4, 4).is_err());
    }

    #[test]
    fn records_of_batch_bytes_round_trip_and_recover_as_commits() {
        let vote = bft::Vote::sign(
            &SigningKey::from_bytes(&[1; 32]),
            0,
            bft::VoteKind::Commit,
            0,
            2,
            3,
            bft::batch_digest(b"not a batch"),
        );
        let mut bytes = Vec::new();
        for value in [3u64, 0, 2] {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes.extend_from_slice(&vote.digest);
        codec::encode_votes(&[vote], &mut bytes);
        let plain = CertRecord::decode(CERT_KIND_COMMIT, &bytes).expect("a commit record");
        assert!(plain.batch.is_empty());
        assert_eq!(CertRecord::decode(CERT_KIND_COMMIT_BYTES, &bytes), None);
        bytes.extend_from_slice(&11u32.to_le_bytes());
        bytes.extend_from_slice(b"not a batch");
        let record = CertRecord::decode(CERT_KIND_COMMIT_BYTES, &bytes).expect("bytes record");
        assert_eq!(record.batch, b"not a batch");
        assert_eq!(record.votes, vec![vote]);
        assert_eq!(
            CertRecord::decode(CERT_KIND_COMMIT, &bytes),
            None,
            "trailing bytes"
        );
        assert_eq!(
            CertRecord::decode(CERT_KIND_COMMIT_BYTES, &bytes[..bytes.len() - 1]),
            None,
            "short"
        );
        // Recovered like a commit record with journal op 0.
        let records = vec![commit(1, 1), commit(2, 2), record.clone(), commit(4, 3)];
        let recovered = recover_certs(&records, 3, 16).unwrap();
        assert_eq!(recovered.cert_op_kept, 4);
        assert_eq!(recovered.digests[2], record.digest);
        let mut wrong = records.clone();
        wrong[2].journal_op = 3;
        assert!(recover_certs(&wrong, 3, 16).is_err());
    }

    #[test]
    fn certificate_recovery_restarts_the_log_at_an_installed_snapshot() {
        // Ops 1..=2 (journal ops 1..=2), then a snapshot at op 40 (journal op 30), then
        // ops 41..=42 (journal ops 31..=32), and a checkpoint at 42.
        let snapshot = CertRecord {
            kind: CERT_KIND_SNAPSHOT,
            op: 40,
            journal_op: 30,
            view: 0,
            digest: [9; 32],
            votes: Vec::new(),
            batch: Vec::new(),
            signatures: Vec::new(),
        };
        let records = vec![
            commit(1, 1),
            commit(2, 2),
            snapshot.clone(),
            commit(41, 31),
            commit(42, 32),
        ];
        let recovered = recover_certs(&records, 32, 16).unwrap();
        assert_eq!(recovered.cert_op_kept, 5);
        assert_eq!(recovered.base, Some((40, [9; 32])));
        assert_eq!(recovered.digests.len(), 2, "the ops above the snapshot");
        assert_eq!(recovered.low_cert, None);
        assert_eq!(recovered.checkpoint_ops, vec![(40, 30)]);
        // A crash after the record, before the journal switched: the journal is below the
        // snapshot and the record (and all after it) is cut.
        let cut = recover_certs(&records, 2, 16).unwrap();
        assert_eq!(cut.cert_op_kept, 2);
        assert_eq!(cut.base, None);
        // A checkpoint at the snapshot's op matches its chain; above it, the ops' chain.
        let mut at_base = records[..3].to_vec();
        at_base.push(CertRecord {
            kind: CERT_KIND_CHECKPOINT,
            digest: [9; 32],
            ..snapshot.clone()
        });
        let recovered = recover_certs(&at_base, 30, 16).unwrap();
        assert_eq!(recovered.cert_op_kept, 4);
        assert_eq!(recovered.base, None, "the checkpoint replaces the base");
        assert!(recovered.low_cert.is_some());
        let mut chain = [9; 32];
        for record in &records[3..] {
            chain = bft::chain_digest(&chain, record.op, &record.digest);
        }
        let mut above = records.clone();
        above.push(CertRecord {
            kind: CERT_KIND_CHECKPOINT,
            op: 42,
            journal_op: 32,
            view: 0,
            digest: chain,
            votes: Vec::new(),
            batch: Vec::new(),
            signatures: Vec::new(),
        });
        let recovered = recover_certs(&above, 32, 16).unwrap();
        assert_eq!(recovered.base, None);
        assert!(recovered.digests.is_empty());
        above.last_mut().unwrap().digest[0] ^= 1;
        assert!(recover_certs(&above, 32, 16).is_err());
        // Commit records after the snapshot must continue from it.
        let gap = vec![snapshot, commit(42, 31)];
        assert!(recover_certs(&gap, 31, 16).is_err());
    }

    /// Commits of ops 1..=20 (every third a null op, journal op 0) with a checkpoint
    /// record for every multiple of 4 two ops after it (as a replica journals them), then
    /// a snapshot installed at op 50 (journal op 40), a checkpoint at it, and ops 51..=57
    /// (journal ops 41..=47).
    fn long_certificate_journal() -> Vec<CertRecord> {
        let vote = bft::Vote::sign(
            &SigningKey::from_bytes(&[1; 32]),
            0,
            bft::VoteKind::Checkpoint,
            0,
            4,
            0,
            [7; 32],
        );
        let checkpoint = |op: u64, chain: Digest| CertRecord {
            kind: CERT_KIND_CHECKPOINT,
            digest: chain,
            votes: vec![vote],
            ..commit(op, 0)
        };
        let mut records = Vec::new();
        let mut chains = vec![bft::message::CHAIN_GENESIS];
        let mut journal_op = 0;
        for op in 1..=20 {
            let null = op % 3 == 0;
            journal_op += u64::from(!null);
            let record = commit(op, if null { 0 } else { journal_op });
            chains.push(bft::chain_digest(
                &chains[op as usize - 1],
                op,
                &record.digest,
            ));
            records.push(record);
            if op > 2 && (op - 2).is_multiple_of(4) {
                records.push(checkpoint(op - 2, chains[op as usize - 2]));
            }
        }
        let mut chain = [5; 32];
        records.push(CertRecord {
            kind: CERT_KIND_SNAPSHOT,
            digest: chain,
            ..commit(50, 40)
        });
        records.push(checkpoint(50, chain));
        for (op, journal_op) in (51..=57).zip(41..) {
            let record = commit(op, journal_op);
            chain = bft::chain_digest(&chain, op, &record.digest);
            records.push(record);
        }
        records
    }

    #[test]
    fn certificate_recovery_from_a_base_equals_recovery_from_every_record() {
        let records = long_certificate_journal();
        let journal_op_durable = 47;
        let all = recover_certs(&records, journal_op_durable, 4).unwrap();
        assert_eq!(all.cert_op_kept, records.len() as u64);
        assert!(all.base.is_none() && all.low_cert.is_some());
        // A base after every record (as the running shard keeps it): encoded, decoded, and
        // the records after it read, the recovery is the one from every record.
        let mut scan = CertScan::genesis();
        for (index, record) in records.iter().enumerate() {
            assert!(scan.step(record.entry(), u64::MAX, 4).unwrap());
            let mut bytes = Vec::new();
            scan.encode(3, &mut bytes);
            let decoded = CertScan::decode(&bytes, 3).unwrap();
            assert_eq!(decoded, scan, "record {index}");
            let from_base =
                recover_certs_from(decoded, &records[index + 1..], journal_op_durable, 4).unwrap();
            assert_eq!(from_base, all, "base after record {index}");
        }
        // The journal lost its last batches: the records after the base that certify them
        // are cut, as from every record.
        let base_at = records.len() - 4;
        let cut = recover_certs(&records, journal_op_durable - 2, 4).unwrap();
        let mut scan = CertScan::genesis();
        for record in &records[..base_at] {
            scan.step(record.entry(), u64::MAX, 4).unwrap();
        }
        let from_base =
            recover_certs_from(scan.clone(), &records[base_at..], journal_op_durable - 2, 4);
        assert_eq!(from_base.unwrap(), cut);
        assert_eq!(cut.cert_op_kept, records.len() as u64 - 2);
        // A base above the journal's durable head cannot be cut: refused, by name.
        let ahead = recover_certs_from(scan.clone(), &records[base_at..], scan.journal_op - 1, 4);
        assert!(
            matches!(
                ahead,
                Err(BftStartError::CertBaseAhead {
                    base_journal_op,
                    journal_op_durable,
                }) if base_journal_op == scan.journal_op && journal_op_durable + 1 == base_journal_op
            ),
            "{ahead:?}"
        );
        // Records that do not continue the base are refused.
        assert!(recover_certs_from(scan.clone(), &records[base_at + 1..], 47, 4).is_err());
    }

    #[test]
    fn a_corrupt_or_foreign_certificate_journal_base_is_refused() {
        let records = long_certificate_journal();
        let mut scan = CertScan::genesis();
        for record in &records[..records.len() - 3] {
            scan.step(record.entry(), u64::MAX, 4).unwrap();
        }
        assert!(!scan.above.is_empty() && scan.low_cert.is_some());
        let mut bytes = Vec::new();
        scan.encode(0, &mut bytes);
        assert_eq!(CertScan::decode(&bytes, 0).unwrap(), scan);
        let refused = |bytes: &[u8], group: u32| {
            matches!(
                CertScan::decode(bytes, group),
                Err(BftStartError::CertBase(_))
            )
        };
        assert!(refused(&bytes, 1), "another group's");
        assert!(refused(&bytes[..bytes.len() - 1], 0), "short");
        assert!(refused(&[], 0), "empty");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(refused(&longer, 0), "trailing bytes");
        // A flipped byte anywhere never panics: it is refused by name or decodes to some
        // scan (on disk, the journal's checksum of the snapshot refuses it first).
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x41;
            if let Err(error) = CertScan::decode(&flipped, 0) {
                assert!(matches!(error, BftStartError::CertBase(_)), "{error}");
            }
        }
        // A digest of the ops above changed: they no longer chain to the head.
        let mut wrong = scan.clone();
        wrong.above[0].1[0] ^= 1;
        let mut bytes = Vec::new();
        wrong.encode(0, &mut bytes);
        assert!(refused(&bytes, 0));
    }

    /// The largest batch of a shard with the default batch cap and `record_bytes` records
    /// (bytes), and its records.
    fn default_batch(record_bytes: usize) -> (usize, usize) {
        let records = percore_engine::batch::BatchLimits::default().entries_cap(record_bytes);
        let body_bytes_max = percore_engine::journal::entry_body_bytes_max(records, record_bytes);
        (batch_bytes_max_of(body_bytes_max, record_bytes), records)
    }

    /// The largest ViewChange and NewView of a group of `n` replicas tolerating `f`, with the
    /// default window and batches of `batch_bytes`: every count at its most (the engine's
    /// codec tests build the same messages with real, verified signatures).
    fn largest_view_change_messages(n: u8, f: u8, batch_bytes: usize) -> (Message, Message) {
        let key = SigningKey::from_bytes(&[1; 32]);
        let vote = |kind, replica, op| Vote::sign(&key, 0, kind, replica, 0, op, [op as u8; 32]);
        let window = bft::LOG_WINDOW_OPS_DEFAULT;
        let prepared: Vec<bft::PreparedEntry> = (1..=window)
            .map(|op| bft::PreparedEntry {
                cert: bft::PreparedCert {
                    pre_prepare: vote(bft::VoteKind::PrePrepare, 0, op),
                    prepares: (1..n)
                        .map(|r| vote(bft::VoteKind::Prepare, r, op))
                        .collect(),
                },
                batch: vec![op as u8; batch_bytes],
            })
            .collect();
        let view_change = bft::ViewChange {
            vote: vote(bft::VoteKind::ViewChange, 0, 0),
            checkpoint: Some(CheckpointCert {
                votes: (0..n)
                    .map(|r| vote(bft::VoteKind::Checkpoint, r, 0))
                    .collect(),
            }),
            prepared,
        };
        let new_view = bft::NewView {
            view: 1,
            view_changes: vec![view_change.clone(); bft::quorum_of(usize::from(n), f)],
            pre_prepares: (1..=window)
                .map(|op| {
                    (
                        vote(bft::VoteKind::PrePrepare, 1, op),
                        vec![op as u8; batch_bytes],
                    )
                })
                .collect(),
        };
        (
            Message::ViewChange(Box::new(view_change)),
            Message::NewView(Box::new(new_view)),
        )
    }

    #[test]
    fn default_group_frames_and_queues_hold_its_largest_view_change_and_new_view() {
        let (batch_bytes, records) = default_batch(128);
        assert_eq!((batch_bytes, records), (224_008, 1_000));
        let cases = [(4, 1, 7_183_583, 28_722_790), (7, 2, 7_194_869, 43_146_384)];
        for (n, f, view_change_bytes, new_view_bytes) in cases {
            let limits = BftMessageLimits::new(
                (usize::from(n), f, bft::LOG_WINDOW_OPS_DEFAULT),
                (batch_bytes, records, 128),
                BFT_SEND_QUEUE_BYTES_DEFAULT,
            )
            .expect("the default configuration starts");
            let (view_change, new_view) = largest_view_change_messages(n, f, batch_bytes);
            assert_eq!(codec::encoded_bytes(&view_change), view_change_bytes);
            assert_eq!(codec::encoded_bytes(&new_view), new_view_bytes);
            // The fixed limit of 16 MiB could not carry it: no view change could complete.
            assert!(new_view_bytes > BFT_MESSAGE_BYTES_MIN);
            // Sent (`push`) and received (a peer's body buffer) ...
            assert_eq!(limits.message_bytes_max, new_view_bytes);
            // ... queued for a peer with the ViewChange before it (`Outbox::push`) ...
            let frame_bytes = |bytes| percore_engine::message::PEER_HEADER_BYTES + bytes;
            assert!(
                frame_bytes(view_change_bytes) + frame_bytes(new_view_bytes)
                    <= limits.send_queue_bytes
            );
            // ... and held together until the guard asked for with them is durable.
            let mut held = HeldSends::with_bytes_max(limits.held_bytes_max);
            let guard = held.request_guard();
            assert_eq!(held.offer(0b1110, &view_change), Offered::Held);
            assert_eq!(held.offer(0b1110, &new_view), Offered::Held);
            held.guard_landed(guard);
            assert!(held.pop_ready().is_some() && held.pop_ready().is_some());
        }
    }

    #[test]
    fn a_group_whose_largest_new_view_is_above_the_ceiling_is_refused_by_name() {
        let records = BATCH_ENTRIES_MAX_LIMIT;
        let body_bytes_max = percore_engine::journal::entry_body_bytes_max(records, 128);
        let limits = |n: usize, f, records| {
            let body_bytes_max = percore_engine::journal::entry_body_bytes_max(records, 128);
            BftMessageLimits::new(
                (n, f, bft::LOG_WINDOW_OPS_DEFAULT),
                (batch_bytes_max_of(body_bytes_max, 128), records, 128),
                BFT_SEND_QUEUE_BYTES_DEFAULT,
            )
        };
        for (n, f) in [(4, 1), (7, 2)] {
            let Err(error) = limits(n, f, records) else {
                panic!("{records} records at n = {n}: refused");
            };
            let message = error.to_string();
            let BftStartError::MessageTooLarge {
                bytes,
                limit,
                records_fitting,
                batch_bytes_fitting,
                ..
            } = error
            else {
                panic!("{error}");
            };
            assert_eq!(limit, BFT_MESSAGE_BYTES_LIMIT);
            let bound = codec::view_change_bytes_max(
                n,
                f,
                bft::LOG_WINDOW_OPS_DEFAULT,
                batch_bytes_max_of(body_bytes_max, 128),
            );
            assert_eq!(bytes, bound.largest());
            assert!(bytes > BFT_MESSAGE_BYTES_LIMIT);
            for named in [
                format!("--batch-entries-max to at most {records_fitting}"),
                format!("--batch-bytes-max to at most {batch_bytes_fitting}"),
            ] {
                assert!(message.contains(&named), "{message}");
            }
            assert_eq!(batch_bytes_fitting, records_fitting * 128);
            // The named value is the largest that starts.
            let fitting = limits(n, f, records_fitting).expect("the named value fits");
            assert!(fitting.message_bytes_max <= BFT_MESSAGE_BYTES_LIMIT);
            assert!(limits(n, f, records_fitting + 1).is_err());
        }
    }
}
