//! The replication driver of one shard: executes the sans-IO [`Replica`] core on the
//! shard's io_uring.
//!
//! Replication group `k` is shard `k` on every node. Each shard listens for peers on
//! `peers[replica].port + k` and dials shard `k` of every other replica; a connection
//! carries one direction (the dialer sends, the listener receives), both ends authenticated
//! with the cluster key (`percore_net::peer`). Per peer there is one bounded outbox of
//! encoded messages and one sender task that writes it; per accepted connection one
//! receiver task that verifies each frame and dispatches it.
//!
//! The batcher drives the log (`replicated_turn`):
//! - **Leader**: seals while the pipeline has room, stages each batch in the journal and
//!   copies the encoded entry into every connected follower's outbox. With view change the
//!   sender tasks write them at once, while this replica's group commit runs, so the
//!   followers' writes overlap the leader's (a restarted leader never leads its old view
//!   again, `percore_engine::replica`). Fixed view holds them (not yet sendable) until the
//!   group commit is durable, then releases them to all followers at once: durable-before-
//!   send keeps every follower's log a prefix of the leader's across a leader restart, since
//!   a fixed-view leader resumes its view. Ops apply and clients get replies once a
//!   majority, the leader included, has them durable.
//! - **Follower**: stages received entries (the journal checks checksums and the hash
//!   chain), group-commits them, acknowledges cumulatively, applies up to the leader's
//!   commit number; gaps are repaired from the fastest peer (`Replica` routing).
//! - **Both**: serve repair requests from the journal; credit legs that a group's leader
//!   emits reach another group's leader through the local mesh and, when that shard does
//!   not lead its group here, a `Forward` message.
//!
//! Nothing here allocates per message: outboxes, inbound queue, repair queue and the
//! entry read buffer are sized at start-up.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use percore_engine::journal::{ENTRY_HEADER_BYTES, EntryHeader, EntryMeta, entry_bytes_padded};
use percore_engine::session::REQUEST_DESCRIPTOR_BYTES;

use crate::core::SealedBatch;
use percore_engine::message::{
    ClusterKey, Command, PEER_HEADER_BYTES, PeerHeader, PeerKeys, field,
};
use percore_engine::replica::{ACTIONS_MAX, Action, PrepareDisposition, Replica, Status};
use percore_engine::state_machine::StateMachine;
use percore_net::peer::{self, PeerIdentity};

use crate::journal::{Journal, JournalError};
use crate::mesh::MeshMessage;
use crate::metrics::ShardMetrics;
use crate::peer_link::{self, Outbox, PeerLink, PeerProtocol};
use crate::runtime::{STOP_POLL_MS, Shard};

/// Default bytes queued per peer before messages to it are dropped (it repairs itself).
pub const PEER_SEND_QUEUE_BYTES_DEFAULT: usize = 32 << 20;
/// Default `--retain-ops`: ops below the previous checkpoint kept for a lagging peer (four
/// default checkpoint intervals); a peer further behind catches up by state sync.
pub const RETAIN_OPS_DEFAULT: u64 = 4 * crate::runtime::CHECKPOINT_INTERVAL_OPS_DEFAULT;
/// Default `--leader-rebalance-ms`: how long a group's preferred leader (its view-0 leader)
/// must have been connected and caught up before the group is handed back to it
/// ([`percore_engine::replica::ReplicaConfig::leader_rebalance_us`]).
pub const LEADER_REBALANCE_MS_DEFAULT: u64 =
    percore_engine::replica::LEADER_REBALANCE_US_DEFAULT / 1_000;
/// Bytes of received Prepares waiting for the batcher before more are dropped.
pub const INBOUND_QUEUE_BYTES_DEFAULT: usize = 32 << 20;
/// Repair requests waiting to be served before more are dropped (requesters retry).
pub const REPAIRS_QUEUED_MAX: usize = 16;
/// Leader: unacknowledged credit legs are sent again when the oldest did not change for
/// this long (µs).
pub const CREDIT_LEG_RESEND_INTERVAL_US: u64 = 200_000;
/// Most credit legs sent again at once.
pub const CREDIT_LEGS_RESEND_MAX: usize = 1_024;
/// On shutdown, how long a leader waits for its pipeline to commit (ms).
pub const DRAIN_TIMEOUT_MS: u64 = 3_000;
/// Most actions waiting for the batcher (a view change produces a few per peer).
pub const DEFERRED_ACTIONS_MAX: usize = 4_096;
/// Ops applied between superblock records of the commit number (view change only).
pub const COMMIT_PERSIST_INTERVAL_OPS: u64 = 64;
/// Most record bytes one `Forward` message carries.
pub const FORWARD_BYTES_MAX: usize = 64 * 1024;
/// Status byte of a normal replica in message headers.
const STATUS_NORMAL: u8 = 1;
/// Status byte of a replica changing views.
const STATUS_VIEW_CHANGE: u8 = 2;

/// How a node replicates: its index and every replica's peer address.
#[derive(Clone)]
pub struct ReplicationSettings {
    /// This node's replica index.
    pub replica: u8,
    /// Peer address of every replica, in replica order; shard `k` of replica `r` listens on
    /// `peers[r]` with the port plus `k`.
    pub peers: Vec<SocketAddr>,
    /// The shared cluster key (authenticates peers), and the key accepted during a key
    /// rotation (`--cluster-key-accept-file`).
    pub keys: PeerKeys,
    /// Bytes queued per peer.
    pub send_queue_bytes: usize,
    /// Leader failover: view changes when a leader is silent (pre-vote, then a new view
    /// led by the view's leader, `percore_engine::placement`). Off, every group keeps its first leader.
    pub view_change: bool,
    /// Ops below the previous checkpoint kept for a lagging peer (`--retain-ops`); a peer
    /// further behind catches up by state sync instead.
    pub retain_ops: u64,
    /// Leader rebalancing (`--leader-rebalance-ms`, view change only): a group led by
    /// another replica goes back to its preferred leader once that replica has been
    /// connected and caught up this long (ms); 0: never.
    pub leader_rebalance_ms: u64,
}

impl std::fmt::Debug for ReplicationSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationSettings")
            .field("replica", &self.replica)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl ReplicationSettings {
    /// The address shard `shard` of `replica` listens on for peers.
    pub fn peer_address(&self, replica: u8, shard: usize) -> SocketAddr {
        peer_link::peer_address(&self.peers, replica, shard)
    }

    /// Replicas in each group.
    pub fn replica_count(&self) -> u8 {
        self.peers.len() as u8
    }
}

/// Replication state of one shard, shared by its tasks (borrows never cross an await).
pub(crate) struct Replication {
    pub(crate) settings: ReplicationSettings,
    pub(crate) replica: RefCell<Replica>,
    pub(crate) outboxes: Box<[Outbox]>,
    /// Received Prepares for the batcher: `[PeerHeader][entry]` each. Two buffers of equal
    /// capacity: receivers fill one while the batcher works through the other.
    inbound: RefCell<Vec<u8>>,
    inbound_spare: RefCell<Vec<u8>>,
    /// The batcher's own action buffer (it awaits while holding it; receivers use `actions`).
    batcher_actions: RefCell<Vec<Action>>,
    /// Buffer one entry is read into when serving a repair.
    repair_entry: RefCell<Vec<u8>>,
    /// Records to forward to this group's leader, sent as one message per mesh drain.
    forward_pending: RefCell<Vec<u8>>,
    forward_operation: Cell<Option<u16>>,
    repairs: RefCell<VecDeque<(u8, u64, u64)>>,
    /// State sync: the one in progress here and the snapshot chunks to serve.
    pub(crate) sync: RefCell<crate::sync::SyncState>,
    actions: RefCell<Vec<Action>>,
    /// When the stop flag was first seen (drain deadline).
    stop_seen: Cell<Option<Instant>>,
    /// Actions waiting for the batcher, in order: a `Persist` or `Truncate` needs the
    /// journal, and every action after it must wait for it.
    deferred: RefCell<VecDeque<Action>>,
    /// Checksums decoded from a DoViewChange or StartView body.
    checksums: RefCell<Vec<u128>>,
    /// Leader: the oldest unacknowledged credit leg at the last resend check.
    legs_oldest: Cell<Option<u128>>,
    legs_check_us: Cell<u64>,
    pub(crate) identity: PeerIdentity,
    /// Lets [`journal_commit_applying`] poll its journal write only when the write woke it.
    write_gate: std::sync::Arc<PollGate>,
}

/// What a shard's journal recovered, as the replica core needs it.
pub(crate) struct RecoveredLog<'a> {
    /// Highest op durable.
    pub(crate) op: u64,
    /// Its checksum (the chain head).
    pub(crate) checksum: u128,
    /// `(op, checksum)` of the last ops recovered, oldest first.
    pub(crate) recent: &'a [(u64, u128)],
    /// The views the superblock recorded.
    pub(crate) views: percore_engine::replica::Persisted,
    /// The op replay stopped at (the journal head without view change; the recorded
    /// commit number with it).
    pub(crate) op_replayed: u64,
    /// The journal lost entries up to this op that the replica may have acknowledged: it
    /// starts recovering (`docs/protocol.md` 8); 0 when none.
    pub(crate) op_promised: u64,
    /// The journal was created by this start: the replica never ran before.
    pub(crate) created: bool,
    /// The journal is marked replacing (`percore format --replace`): the replica lost its
    /// disk and rebuilds from its peers before it votes (`Replica::replacing_start`).
    pub(crate) replacing: bool,
}

impl Replication {
    /// Builds the state for shard `shard` whose journal recovered `log`.
    pub(crate) fn new(
        settings: ReplicationSettings,
        shard: usize,
        (cluster_id, settings_digest): (u128, u64),
        log: RecoveredLog<'_>,
        seed: u64,
        entry_bytes_max: usize,
    ) -> Result<Self, percore_engine::replica::ReplicaConfigError> {
        let RecoveredLog {
            op,
            checksum,
            recent,
            views,
            op_replayed,
            op_promised,
            created,
            replacing,
        } = log;
        let mut config = percore_engine::replica::ReplicaConfig::new(
            shard as u32,
            settings.replica,
            settings.replica_count(),
            seed,
        )?;
        config.view_change = settings.view_change;
        config.leader_rebalance_us = settings.leader_rebalance_ms.saturating_mul(1_000);
        config.validate()?;
        let config_headers_max = config.view_change_headers_max();
        // The recent checksums let acknowledgements of the recovered tail count (it commits
        // without waiting for a new op) and let a view change compare logs.
        tracing::info!(
            shard,
            op,
            op_replayed,
            view = views.view,
            log_view = views.log_view,
            recent = recent.len(),
            recent_first = recent.first().map(|r| r.0),
            recent_last = recent.last().map(|r| r.0),
            "replica restarts"
        );
        // A replica that ran before may have led and sent entries it lost: as a leader it
        // leaves its view (`Replica::restart`). A new journal has no such past.
        if replacing && !settings.view_change {
            return Err(percore_engine::replica::ReplicaConfigError::ReplacingWithoutViewChange);
        }
        // A replacement's new journal is not a replica that never ran: it restarts.
        let mut replica = if created && !replacing {
            assert_eq!(op, 0, "a new journal is empty");
            Replica::new(config, op, checksum, 0)?
        } else {
            Replica::restart(config, views, op, checksum, op_replayed, recent, 0)?
        };
        if op_promised > op {
            tracing::warn!(
                shard,
                op,
                op_promised,
                "replica starts recovering: its journal lost entries it may have acknowledged; \
                 it repairs them from its peers and neither acknowledges nor votes until then"
            );
            replica.recovering_start(op_promised);
        }
        if replacing {
            tracing::warn!(
                shard,
                op,
                view = views.view,
                "replica was formatted to replace one that lost its disk: it rebuilds from \
                 its peers, and neither acknowledges nor votes until it has heard the view of \
                 a majority of the others and installed a log at least that new"
            );
            replica.replacing_start(0);
        }
        let outboxes = Outbox::for_peers(
            settings.replica_count(),
            settings.replica,
            settings.send_queue_bytes,
        );
        let identity = PeerIdentity {
            cluster_id,
            group: shard as u32,
            replica: settings.replica,
            replica_count: settings.replica_count(),
            peers_digest: crate::config::PeersDigest::of(&settings.peers).0,
            settings_digest,
        };
        Ok(Self {
            replica: RefCell::new(replica),
            outboxes,
            inbound: RefCell::new(Vec::with_capacity(INBOUND_QUEUE_BYTES_DEFAULT)),
            inbound_spare: RefCell::new(Vec::with_capacity(INBOUND_QUEUE_BYTES_DEFAULT)),
            batcher_actions: RefCell::new(Vec::with_capacity(ACTIONS_MAX)),
            repair_entry: RefCell::new(Vec::with_capacity(entry_bytes_max)),
            forward_pending: RefCell::new(Vec::with_capacity(FORWARD_BYTES_MAX)),
            forward_operation: Cell::new(None),
            repairs: RefCell::new(VecDeque::with_capacity(REPAIRS_QUEUED_MAX)),
            sync: RefCell::new(crate::sync::SyncState::new()),
            actions: RefCell::new(Vec::with_capacity(ACTIONS_MAX)),
            stop_seen: Cell::new(None),
            deferred: RefCell::new(VecDeque::with_capacity(DEFERRED_ACTIONS_MAX)),
            checksums: RefCell::new(Vec::with_capacity(config_headers_max as usize)),
            legs_oldest: Cell::new(None),
            legs_check_us: Cell::new(0),
            write_gate: std::sync::Arc::new(PollGate::default()),
            identity,
            settings,
        })
    }

    /// Whether this replica leads its group in a normal view and has applied what it
    /// inherited: only then does it admit clients and submit forwarded records.
    pub(crate) fn is_ready_leader(&self) -> bool {
        self.replica.borrow().is_ready_leader()
    }

    pub(crate) fn header(&self, command: Command) -> PeerHeader {
        peer_header(&self.replica.borrow(), command)
    }
}

/// Why a cluster key could not be loaded or written.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    /// The file could not be read or written.
    #[error("cluster key file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The text is not 64 hex digits.
    #[error("cluster key {origin}: expected 64 hex digits (256 bits)")]
    Format {
        /// Where it came from.
        origin: String,
    },
    /// No file given and no environment variable set.
    #[error("no cluster key: pass --cluster-key-file or set PERCORE_CLUSTER_KEY")]
    Missing,
    /// The key accepted during a rotation is the cluster key itself.
    #[error(
        "the accepted key (--cluster-key-accept-file or PERCORE_CLUSTER_KEY_ACCEPT) is the \
         cluster key itself: give the key before the rotation, or the next one"
    )]
    AcceptedIsCurrent,
}

fn cluster_key_parse(text: &str, origin: &str) -> Result<ClusterKey, ClusterKeyError> {
    let text = text.trim();
    let format = || ClusterKeyError::Format {
        origin: origin.to_string(),
    };
    if text.len() != 64 || !text.is_ascii() {
        return Err(format());
    }
    let mut bytes = [0u8; 32];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * index..2 * index + 2], 16).map_err(|_| format())?;
    }
    Ok(ClusterKey::new(bytes))
}

/// Reads a cluster key file (64 hex digits). Warns if others may read it.
pub fn cluster_key_from_file(path: &std::path::Path) -> Result<ClusterKey, ClusterKeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |source| ClusterKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "cluster key file is readable by others; use mode 0600");
    }
    cluster_key_parse(&text, &path.display().to_string())
}

/// Reads the cluster key from `PERCORE_CLUSTER_KEY` (64 hex digits).
pub fn cluster_key_from_env() -> Result<ClusterKey, ClusterKeyError> {
    let text = std::env::var("PERCORE_CLUSTER_KEY").map_err(|_| ClusterKeyError::Missing)?;
    cluster_key_parse(&text, "PERCORE_CLUSTER_KEY")
}

/// A node's peer keys: the cluster key from `key_file`, else `PERCORE_CLUSTER_KEY`; and,
/// during a key rotation, the accepted key from `accept_file`, else
/// `PERCORE_CLUSTER_KEY_ACCEPT` if set (`docs/operations.md` section 7).
pub fn peer_keys(
    key_file: Option<&std::path::Path>,
    accept_file: Option<&std::path::Path>,
) -> Result<PeerKeys, ClusterKeyError> {
    let current = match key_file {
        Some(path) => cluster_key_from_file(path)?,
        None => cluster_key_from_env()?,
    };
    let accepted = match accept_file {
        Some(path) => Some(cluster_key_from_file(path)?),
        None => match std::env::var("PERCORE_CLUSTER_KEY_ACCEPT") {
            Ok(text) => Some(cluster_key_parse(&text, "PERCORE_CLUSTER_KEY_ACCEPT")?),
            Err(_) => None,
        },
    };
    if accepted
        .as_ref()
        .is_some_and(|accepted| accepted.same_as(&current))
    {
        return Err(ClusterKeyError::AcceptedIsCurrent);
    }
    Ok(PeerKeys { current, accepted })
}

/// Writes a fresh random key (from the OS) to `path`, mode 0600; refuses to overwrite.
pub fn cluster_key_write(path: &std::path::Path) -> Result<(), ClusterKeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| ClusterKeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = [0u8; 32];
    let random = peer::os_nonce().map_err(|error| io(std::io::Error::other(error.to_string())))?;
    bytes.copy_from_slice(&random[..32]);
    let text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    writeln!(file, "{text}").map_err(io)?;
    file.sync_all().map_err(io)
}

/// The ledger's table hash seed for a replicated cluster: clients must not predict it, so
/// it derives from the secret cluster key. Replicas need not share it: results, digests and
/// snapshots do not depend on the tables' layout, so during a key rotation a node on the
/// new key builds other tables than one on the old.
pub fn ledger_hash_seed(key: &ClusterKey) -> u64 {
    percore_engine::message::derive_seed(key, "percore ledger hash seed v1")
}

/// Binds the peer listener of `shard`.
pub(crate) fn bind(settings: &ReplicationSettings, shard: usize) -> std::io::Result<TcpListener> {
    let address = settings.peer_address(settings.replica, shard);
    TcpListener::bind(address).map_err(std::io::Error::from)
}

/// Spawns the peer listener, one sender per peer and the timer task. They end once the
/// shard is `finished`.
pub(crate) fn spawn_tasks<S>(shard: &Rc<Shard<S>>, listener: TcpListener) -> Vec<glommio::Task<()>>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut tasks = vec![glommio::spawn_local(peer_link::accept_loop::<S, Peers>(
        shard.clone(),
        listener,
    ))];
    let me = replication.settings.replica;
    for peer in 0..replication.settings.replica_count() {
        if peer != me {
            tasks.push(glommio::spawn_local(peer_link::sender_loop::<S, Peers>(
                shard.clone(),
                peer,
            )));
        }
    }
    tasks.push(glommio::spawn_local(timer_loop(shard.clone())));
    tasks
}

/// The crash-fault protocol on the shared peer transport.
struct Peers;

impl<S> PeerProtocol<S> for Peers
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    const NAME: &'static str = "peer";

    fn link(shard: &Shard<S>) -> PeerLink<'_> {
        let state = replication_of(shard);
        PeerLink {
            identity: &state.identity,
            keys: &state.settings.keys,
            peers: &state.settings.peers,
            outboxes: &state.outboxes,
            send_queue_bytes: state.settings.send_queue_bytes,
            frame_bytes_max: ENTRY_HEADER_BYTES + shard.body_bytes_max(),
            signing: None,
        }
    }

    fn received(shard: &Shard<S>, from: u8, header: &PeerHeader, body: &[u8]) {
        dispatch(shard, from, header, body);
    }

    fn connection_changed(shard: &Shard<S>, peer: u8, connected: bool) {
        replication_of(shard)
            .replica
            .borrow_mut()
            .on_connection(peer, connected);
    }
}

fn replication_of<S: StateMachine>(shard: &Shard<S>) -> &Replication {
    shard.replication.as_ref().expect("replicated shard")
}

/// Handles one authenticated message from `from`. Never awaits.
fn dispatch<S>(shard: &Shard<S>, from: u8, header: &PeerHeader, body: &[u8])
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let now_us = shard.now_us();
    let Ok(command) = header.command() else {
        return;
    };
    let mut actions = replication.actions.borrow_mut();
    actions.clear();
    match command {
        Command::Prepare | Command::PrepareRepair => {
            let mut inbound = replication.inbound.borrow_mut();
            if inbound.len() + PEER_HEADER_BYTES + body.len() <= inbound.capacity() {
                inbound.extend_from_slice(bytemuck::bytes_of(header));
                inbound.extend_from_slice(body);
            } else {
                ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
            }
            shard.batcher.notify();
        }
        Command::PrepareOk => {
            ShardMetrics::add(&shard.metrics.replication_acks_received_total, 1);
            let sample = replication.replica.borrow_mut().on_prepare_ok(
                now_us,
                from,
                header.view,
                header.field_u64(field::PREPARE_OK_OP),
                header.field_u128(field::PREPARE_OK_CHECKSUM_U128),
                header.field_u64(field::PREPARE_OK_COMMIT_MIN),
            );
            if let Some(latency_us) = sample {
                shard.metrics.peers[usize::from(from)]
                    .ack_latency
                    .record(latency_us, 1);
            }
            shard.batcher.notify();
        }
        Command::Commit => {
            replication.replica.borrow_mut().on_commit(
                now_us,
                from,
                header.view,
                header.field_u64(field::COMMIT_COMMIT),
                header.field_u64(field::COMMIT_OP_HEAD),
                &mut actions,
            );
            shard.batcher.notify();
        }
        Command::Ping => replication.replica.borrow_mut().on_ping(
            from,
            header.field_u64(field::PING_TIME_US),
            header.field_u64(field::PING_OP_DURABLE),
            header.field_u64(field::PING_COMMIT_MIN),
            header.field_u64(field::PING_LOG_VIEW),
            &mut actions,
        ),
        Command::Pong => replication.replica.borrow_mut().on_pong(
            now_us,
            from,
            header.view,
            header.field_u64(field::PING_TIME_US),
            header.field_u64(field::PING_OP_DURABLE),
            header.field_u64(field::PING_COMMIT_MIN),
            header.field_u64(field::PING_LOG_VIEW),
            &mut actions,
        ),
        Command::RequestPrepare => replication.replica.borrow_mut().on_request_prepare(
            from,
            header.field_u64(field::REQUEST_OP_MIN),
            header.field_u64(field::REQUEST_OP_MAX),
            &mut actions,
        ),
        Command::Forward => forward_received(shard, header, body),
        Command::NotRetained => {
            let op_min = header.field_u64(field::NOT_RETAINED_OP_MIN);
            if !crate::sync::not_retained(shard, from, op_min) {
                replication.replica.borrow_mut().on_not_retained(
                    from,
                    op_min,
                    header.field_u64(field::NOT_RETAINED_OP_RETAINED_MIN),
                    header.field_u64(field::NOT_RETAINED_OP_CHECKPOINT),
                    &mut actions,
                );
            }
        }
        Command::RequestSnapshot => crate::sync::request_received(shard, from, header),
        Command::SnapshotChunk => crate::sync::chunk_received(shard, from, header, body),
        Command::PreVote => replication.replica.borrow_mut().on_pre_vote(
            now_us,
            from,
            header.field_u64(field::PRE_VOTE_VIEW_TARGET),
            &mut actions,
        ),
        Command::PreVoteReply => replication.replica.borrow_mut().on_pre_vote_reply(
            now_us,
            from,
            header.field_u64(field::PRE_VOTE_VIEW_TARGET),
            header.field_u8(field::PRE_VOTE_REPLY_GRANTED_U8) == 1,
            &mut actions,
        ),
        Command::StartViewChange => replication.replica.borrow_mut().on_start_view_change(
            now_us,
            from,
            header.view,
            &mut actions,
        ),
        Command::DoViewChange | Command::StartView => {
            view_change_received(shard, from, command, header, body, &mut actions);
        }
        Command::RequestStartView => replication.replica.borrow_mut().on_request_start_view(
            now_us,
            from,
            header.view,
            &mut actions,
        ),
        _ => {
            tracing::debug!(
                shard = shard.index,
                peer = from,
                ?command,
                "not handled yet"
            );
        }
    }
    submit_actions(shard, &actions);
    shard.batcher.notify();
}

/// A DoViewChange or StartView: its body is the checksums of the sender's last ops.
fn view_change_received<S: StateMachine>(
    shard: &Shard<S>,
    from: u8,
    command: Command,
    header: &PeerHeader,
    body: &[u8],
    actions: &mut Vec<Action>,
) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut checksums = replication.checksums.borrow_mut();
    checksums.clear();
    if !body.len().is_multiple_of(16) || body.len() / 16 > checksums.capacity() {
        return;
    }
    for chunk in body.chunks_exact(16) {
        checksums.push(u128::from_le_bytes(chunk.try_into().expect("16 bytes")));
    }
    let count = checksums.len() as u64;
    let now_us = shard.now_us();
    let mut replica = replication.replica.borrow_mut();
    if command == Command::DoViewChange {
        let op_durable = header.field_u64(field::DO_VIEW_CHANGE_OP_DURABLE);
        replica.on_do_view_change(
            now_us,
            from,
            header.view,
            header.field_u64(field::DO_VIEW_CHANGE_LOG_VIEW),
            op_durable,
            header.field_u64(field::DO_VIEW_CHANGE_COMMIT_MAX),
            (op_durable + 1).saturating_sub(count),
            &checksums,
            actions,
        );
    } else {
        let op_head = header.field_u64(field::START_VIEW_OP_HEAD);
        replica.on_start_view(
            now_us,
            from,
            header.view,
            op_head,
            header.field_u64(field::START_VIEW_COMMIT_MAX),
            (op_head + 1).saturating_sub(count),
            &checksums,
            actions,
        );
    }
}

/// Executes actions now, or queues them for the batcher when one needs the journal
/// (`Persist`, `Truncate`) or earlier ones still wait: order is kept, and nothing after a
/// `Persist` goes out before it is durable.
pub(crate) fn submit_actions<S: StateMachine>(shard: &Shard<S>, actions: &[Action]) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let needs_journal = actions
        .iter()
        .any(|action| matches!(action, Action::Persist { .. } | Action::Truncate { .. }));
    let mut deferred = replication.deferred.borrow_mut();
    if !needs_journal && deferred.is_empty() {
        drop(deferred);
        execute(shard, actions);
        return;
    }
    let dropped = defer(&mut deferred, actions);
    ShardMetrics::add(&shard.metrics.replication_deferred_dropped_total, dropped);
    drop(deferred);
    shard.batcher.notify();
}

/// Queues `actions` behind those already in `deferred`. When they do not all fit (a
/// superblock write or truncation that stalls for long, seconds of a slow disk, holds
/// everything behind it while heartbeats, pings and resends keep coming), the messages to
/// peers among them are dropped, which the protocol survives as it survives a lossy
/// network; the journal's own actions are kept. Returns the messages dropped.
fn defer(deferred: &mut VecDeque<Action>, actions: &[Action]) -> u64 {
    if deferred.len() + actions.len() <= deferred.capacity() {
        deferred.extend(actions.iter().copied());
        return 0;
    }
    let mut dropped = 0;
    for action in actions {
        if is_message(action) {
            dropped += 1;
            continue;
        }
        assert!(
            deferred.len() < deferred.capacity(),
            "deferred journal actions sized at start-up"
        );
        deferred.push_back(*action);
    }
    dropped
}

/// Whether `action` only sends a message to a peer (dropping it is a lost message).
fn is_message(action: &Action) -> bool {
    !matches!(
        action,
        Action::Persist { .. } | Action::Truncate { .. } | Action::StateSync { .. }
    )
}

/// Batcher: carries out deferred actions in order, awaiting the journal for `Persist` and
/// `Truncate`.
async fn run_deferred<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut progressed = false;
    loop {
        let Some(action) = replication.deferred.borrow_mut().pop_front() else {
            return progressed;
        };
        progressed = true;
        match action {
            Action::Persist {
                view,
                log_view,
                commit_max,
            } => {
                // After a restart the core knows only the op its replay reached; the
                // superblock may record a higher commit number, which never goes back.
                let commit_max = commit_max.max(journal.views().2);
                if let Err(error) = journal.write_views(view, log_view, commit_max).await {
                    panic!(
                        "shard {}: superblock write failed, stopping: {error}",
                        shard.index
                    );
                }
                tracing::info!(
                    shard = shard.index,
                    view,
                    log_view,
                    commit_max,
                    "views persisted"
                );
            }
            Action::Truncate { op } => {
                let head_before = journal.op_durable();
                let checksum = match journal.truncate_after(op).await {
                    Ok(checksum) => checksum,
                    Err(error) => {
                        panic!(
                            "shard {}: journal truncation failed, stopping: {error}",
                            shard.index
                        )
                    }
                };
                shard
                    .core
                    .borrow_mut()
                    .truncate_queued(op, |origin| crate::runtime::abort_local(shard, origin));
                replication.replica.borrow_mut().on_truncated(op, checksum);
                let mut actions = Vec::with_capacity(ACTIONS_MAX);
                report_durable(shard, journal, &mut actions);
                submit_actions(shard, &actions);
                tracing::warn!(
                    shard = shard.index,
                    op,
                    head_before,
                    "divergent journal suffix truncated"
                );
            }
            other => execute(shard, &[other]),
        }
    }
}

/// Submits credit legs another replica forwarded to this group's leader. Dropped when
/// this replica does not lead or the core is full: the origin resends them.
fn forward_received<S>(shard: &Shard<S>, header: &PeerHeader, body: &[u8])
where
    S: StateMachine,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let record_bytes = size_of::<S::Record>();
    let count = header.field_u32(field::FORWARD_RECORD_COUNT_U32) as usize;
    let operation_code = header.field_u16(field::FORWARD_OPERATION_U16);
    if !replication.is_ready_leader() || body.len() != count * record_bytes {
        return;
    }
    // Internal operations only (a peer is authenticated, but stay strict about shapes).
    let Ok(operation) = S::Operation::try_from(operation_code) else {
        return;
    };
    let mut core = shard.core.borrow_mut();
    for chunk in body.chunks_exact(record_bytes) {
        let record: S::Record = bytemuck::pod_read_unaligned(chunk);
        if core
            .submit(operation, &record, crate::core::Origin::Internal)
            .is_err()
        {
            break;
        }
        ShardMetrics::add(&shard.metrics.replication_forwards_received_total, 1);
    }
    drop(core);
    shard.batcher.notify();
}

/// Queues a credit leg (or acknowledgement) for group `shard.index`, to go to its leader on
/// another replica with the others of this drain as one `Forward` message
/// ([`forward_flush`]). Dropped if the connection is down or full: the origin resends.
pub(crate) fn forward_to_leader<S: StateMachine>(
    shard: &Shard<S>,
    operation: u16,
    record: &S::Record,
) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let record_bytes = size_of::<S::Record>();
    let full = {
        let pending = replication.forward_pending.borrow();
        replication.forward_operation.get() != Some(operation)
            || pending.len() + record_bytes > pending.capacity()
    };
    if full {
        forward_flush(shard);
        replication.forward_operation.set(Some(operation));
    }
    replication
        .forward_pending
        .borrow_mut()
        .extend_from_slice(bytemuck::bytes_of(record));
}

/// Sends the queued forwarded records as one `Forward` message to the group's leader.
pub(crate) fn forward_flush<S: StateMachine>(shard: &Shard<S>) {
    let Some(replication) = shard.replication.as_ref() else {
        return;
    };
    let mut pending = replication.forward_pending.borrow_mut();
    let Some(operation) = replication.forward_operation.get() else {
        return;
    };
    if pending.is_empty() {
        return;
    }
    let count = pending.len() / size_of::<S::Record>();
    let leader = replication.replica.borrow().leader();
    let mut header = replication.header(Command::Forward);
    header.set_field_u16(field::FORWARD_OPERATION_U16, operation);
    header.set_field_u32(field::FORWARD_RECORD_COUNT_U32, count as u32);
    header.set_field_u32(field::FORWARD_ORIGIN_GROUP_U32, shard.index as u32);
    header.checksum_body = percore_engine::message::body_checksum(&pending);
    let dropped = &shard.metrics.replication_messages_dropped_total;
    if replication.outboxes[usize::from(leader)].send(header, &pending, dropped) {
        ShardMetrics::add(&shard.metrics.replication_forwards_sent_total, count as u64);
    }
    pending.clear();
}

/// Carries out the core's actions: messages into outboxes, repairs into the queue.
fn execute<S: StateMachine>(shard: &Shard<S>, actions: &[Action]) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    for action in actions {
        let (to, header) = match *action {
            Action::PrepareOk {
                to,
                op,
                checksum,
                commit_min,
            } => {
                let mut header = replication.header(Command::PrepareOk);
                header.set_field_u64(field::PREPARE_OK_OP, op);
                header.set_field_u128(field::PREPARE_OK_CHECKSUM_U128, checksum);
                header.set_field_u64(field::PREPARE_OK_COMMIT_MIN, commit_min);
                (to, header)
            }
            Action::Commit {
                to,
                commit,
                op_head,
            } => {
                let mut header = replication.header(Command::Commit);
                header.set_field_u64(field::COMMIT_COMMIT, commit);
                header.set_field_u64(field::COMMIT_OP_HEAD, op_head);
                (to, header)
            }
            Action::Ping {
                to,
                time_us,
                op_durable,
                commit_min,
                log_view,
            }
            | Action::Pong {
                to,
                time_us,
                op_durable,
                commit_min,
                log_view,
            } => {
                let command = if matches!(action, Action::Ping { .. }) {
                    Command::Ping
                } else {
                    Command::Pong
                };
                let mut header = replication.header(command);
                header.set_field_u64(field::PING_TIME_US, time_us);
                header.set_field_u64(field::PING_OP_DURABLE, op_durable);
                header.set_field_u64(field::PING_COMMIT_MIN, commit_min);
                header.set_field_u64(field::PING_LOG_VIEW, log_view);
                (to, header)
            }
            Action::RequestPrepare { to, op_min, op_max } => {
                ShardMetrics::add(&shard.metrics.replication_repairs_requested_total, 1);
                let mut header = replication.header(Command::RequestPrepare);
                header.set_field_u64(field::REQUEST_OP_MIN, op_min);
                header.set_field_u64(field::REQUEST_OP_MAX, op_max);
                (to, header)
            }
            Action::Persist { .. } | Action::Truncate { .. } => {
                unreachable!("journal actions go through the batcher: {action:?}");
            }
            Action::PreVote { to, view_target } => {
                let mut header = replication.header(Command::PreVote);
                header.set_field_u64(field::PRE_VOTE_VIEW_TARGET, view_target);
                (to, header)
            }
            Action::PreVoteReply {
                to,
                view_target,
                granted,
            } => {
                let mut header = replication.header(Command::PreVoteReply);
                header.set_field_u64(field::PRE_VOTE_VIEW_TARGET, view_target);
                header.set_field_u8(field::PRE_VOTE_REPLY_GRANTED_U8, u8::from(granted));
                (to, header)
            }
            Action::StartViewChange { to, view } => {
                let mut header = replication.header(Command::StartViewChange);
                header.view = view;
                (to, header)
            }
            Action::RequestStartView { to, view } => {
                let mut header = replication.header(Command::RequestStartView);
                header.view = view;
                (to, header)
            }
            Action::DoViewChange {
                to,
                view,
                log_view,
                op_durable,
                commit_max,
                headers_op_min,
            } => {
                let mut header = replication.header(Command::DoViewChange);
                header.view = view;
                header.set_field_u64(field::DO_VIEW_CHANGE_LOG_VIEW, log_view);
                header.set_field_u64(field::DO_VIEW_CHANGE_OP_DURABLE, op_durable);
                header.set_field_u64(field::DO_VIEW_CHANGE_COMMIT_MAX, commit_max);
                send_with_checksums(shard, to, header, headers_op_min, op_durable);
                continue;
            }
            Action::StartView {
                to,
                view,
                op_head,
                commit_max,
                headers_op_min,
            } => {
                let mut header = replication.header(Command::StartView);
                header.view = view;
                header.set_field_u64(field::START_VIEW_OP_HEAD, op_head);
                header.set_field_u64(field::START_VIEW_COMMIT_MAX, commit_max);
                send_with_checksums(shard, to, header, headers_op_min, op_head);
                continue;
            }
            Action::StateSync {
                from,
                checkpoint_op,
            } => {
                crate::sync::start(shard, from, checkpoint_op);
                continue;
            }
            Action::ServeRepair { to, op_min, op_max } => {
                let mut repairs = replication.repairs.borrow_mut();
                if repairs.len() < REPAIRS_QUEUED_MAX {
                    repairs.push_back((to, op_min, op_max));
                }
                shard.batcher.notify();
                continue;
            }
        };
        let dropped = &shard.metrics.replication_messages_dropped_total;
        replication.outboxes[usize::from(to)].send(header, &[], dropped);
    }
}

/// Sends `header` with the checksums of ops `op_min..=op_max` as its body. Skipped if the
/// core no longer knows one of them (its log changed since): the sender resends.
fn send_with_checksums<S: StateMachine>(
    shard: &Shard<S>,
    to: u8,
    mut header: PeerHeader,
    op_min: u64,
    op_max: u64,
) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut body =
        [0u8; 16 * (percore_engine::replica::PIPELINE_PREPARES_MAX_DEFAULT as usize + 1)];
    let count = (op_max + 1).saturating_sub(op_min) as usize;
    if count * 16 > body.len() {
        return;
    }
    {
        let replica = replication.replica.borrow();
        for (index, op) in (op_min..=op_max).enumerate() {
            let Some(checksum) = replica.checksum_at(op) else {
                return;
            };
            body[index * 16..index * 16 + 16].copy_from_slice(&checksum.to_le_bytes());
        }
    }
    let body = &body[..count * 16];
    header.set_field_u32(
        if header.command == Command::DoViewChange as u16 {
            field::DO_VIEW_CHANGE_HEADERS_COUNT_U32
        } else {
            field::START_VIEW_HEADERS_COUNT_U32
        },
        count as u32,
    );
    header.checksum_body = percore_engine::message::body_checksum(body);
    let dropped = &shard.metrics.replication_messages_dropped_total;
    replication.outboxes[usize::from(to)].send(header, body, dropped);
}

/// Heartbeats, pings, repair timeouts and credit-leg resends, on the core's deadlines.
async fn timer_loop<S>(shard: Rc<Shard<S>>)
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    while !shard.finished.get() {
        let now_us = shard.now_us();
        {
            let mut actions = replication.actions.borrow_mut();
            actions.clear();
            replication.replica.borrow_mut().tick(now_us, &mut actions);
            submit_actions(&shard, &actions);
        }
        publish(&shard);
        resend_credit_legs(&shard, now_us);
        let deadline = replication.replica.borrow().poll_timeout();
        let wait_us = deadline
            .saturating_sub(shard.now_us())
            .clamp(1_000, STOP_POLL_MS * 1_000);
        glommio::timer::sleep(Duration::from_micros(wait_us)).await;
    }
}

/// Leader: sends unacknowledged credit legs again when the oldest one did not change over
/// a whole interval (lost in a full queue, a dropped connection or a restart).
///
/// Any ready leader resends, also with ops in its pipeline: under steady load there always
/// are, and a check for "applied its whole log" (once here) left a lost leg or ack unsent
/// for as long as the load lasted, until the sender's in-flight bound refused every
/// transfer to another group. A leg whose ack is in the pipeline is sent once more, which
/// the receiver's replay window answers as a duplicate. Nothing is resent while messages
/// wait for room in the node's mesh rings: a receiver that does not drain would otherwise
/// collect a resent copy of every leg each interval.
fn resend_credit_legs<S>(shard: &Shard<S>, now_us: u64)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    if now_us < replication.legs_check_us.get() + CREDIT_LEG_RESEND_INTERVAL_US {
        return;
    }
    replication.legs_check_us.set(now_us);
    let ready = replication.replica.borrow().is_ready_leader();
    if !ready {
        replication.legs_oldest.set(None);
        return;
    }
    let core = shard.core.borrow();
    let mut oldest = None;
    core.state_machine().unconfirmed_outbound(&mut |outbound| {
        if oldest.is_none() {
            oldest = Some(percore_engine::journal::journal_checksum(
                bytemuck::bytes_of(&outbound.record),
            ));
        }
    });
    let stalled = oldest.is_some() && oldest == replication.legs_oldest.get();
    replication.legs_oldest.set(oldest);
    if !stalled {
        return;
    }
    let mut mesh = shard.mesh.borrow_mut();
    if mesh.queued() > 0 {
        return;
    }
    let mut resent = 0;
    core.state_machine().unconfirmed_outbound(&mut |outbound| {
        if resent < CREDIT_LEGS_RESEND_MAX {
            let (to, message) = MeshMessage::outbound(outbound);
            mesh.send_or_queue(to, message);
            resent += 1;
        }
    });
    mesh.ring_doorbells();
    ShardMetrics::add(&shard.metrics.replication_legs_resent_total, resent as u64);
    tracing::debug!(shard = shard.index, resent, "credit legs resent");
}

/// Publishes replication gauges and per-peer estimates.
fn publish<S: StateMachine>(shard: &Shard<S>) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let replica = replication.replica.borrow();
    let metrics = &shard.metrics;
    ShardMetrics::set(
        &metrics.replica_is_leader,
        u64::from(replica.is_ready_leader()),
    );
    ShardMetrics::set(&metrics.replication_view, replica.view());
    ShardMetrics::set(
        &metrics.replication_status,
        match (replica.status(), replica.recovering()) {
            (_, Some(_)) if replica.replacing() => 4,
            (_, Some(_)) => 3,
            (Status::Normal, None) => 1,
            (Status::ViewChange, None) => 2,
        },
    );
    ShardMetrics::set(&metrics.replication_op_head, replica.op_head());
    ShardMetrics::set(&metrics.replication_op_durable, replica.op_durable());
    ShardMetrics::set(&metrics.replication_commit_max, replica.commit_max());
    ShardMetrics::set(
        &metrics.replication_in_flight_ops,
        replica.op_head().saturating_sub(replica.commit_max()),
    );
    let counters = replica.counters();
    ShardMetrics::set(
        &metrics.replication_repairs_timed_out_total,
        counters.repairs_timed_out,
    );
    ShardMetrics::set(&metrics.replication_stalls_total, counters.stalls);
    ShardMetrics::set(
        &metrics.replication_chain_mismatches_total,
        counters.chain_mismatches,
    );
    ShardMetrics::set(
        &metrics.replication_leader_handoffs_total,
        counters.leader_handoffs,
    );
    for peer in replica.others() {
        let state = replica.peer(peer);
        let gauges = &metrics.peers[usize::from(peer)];
        ShardMetrics::set(&gauges.op_durable, state.op_durable);
        ShardMetrics::set(
            &gauges.lag_ops,
            replica.op_durable().saturating_sub(state.op_durable),
        );
        ShardMetrics::set(&gauges.srtt_us, state.latency.srtt_us);
        ShardMetrics::set(&gauges.score_us, state.latency.score_us());
    }
}

/// One batcher turn of a replicated shard. Returns whether anything happened.
pub(crate) async fn replicated_turn<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut progressed = shard.mesh.borrow_mut().flush_queued();
    progressed |= run_deferred(shard, journal).await;
    progressed |= promise_release(shard, journal).await;
    // A leader that just wrote a group commit leaves what that write committed to the next
    // turn: sealing again at once (requests queued), that turn applies it while its own
    // write is in flight (`journal_commit_applying`); sealing nothing, it applies it below.
    let mut apply_deferred = false;
    if replication.replica.borrow().is_ready_leader() {
        let wrote = leader_prepare(shard, journal).await;
        progressed |= wrote;
        apply_deferred = wrote && queued_next(shard).is_some();
    } else {
        // Only a ready leader measures commit gaps; leading again starts afresh.
        shard.commit_gap_forget();
        // Records accepted while this replica led can no longer be sealed here: their
        // clients are told to find the new leader.
        let aborted = shard
            .core
            .borrow_mut()
            .abort_unsealed(|origin| crate::runtime::abort_local(shard, origin));
        progressed |= aborted > 0;
        progressed |= follower_append(shard, journal).await;
    }
    progressed |= run_deferred(shard, journal).await;
    progressed |= serve_repairs(shard, journal).await;
    progressed |= crate::sync::step(shard, journal).await;
    if !apply_deferred {
        progressed |= apply_committed(shard, journal).await;
    }
    let retain_from_op = retain_from_op(replication, journal);
    progressed |= crate::runtime::checkpoint_install(shard, journal, retain_from_op)
        .await
        .is_some();
    progressed |= persist_applied(shard, journal).await;
    shard.mesh.borrow_mut().ring_doorbells();
    progressed
}

/// The replica left recovering without its journal reaching the promise (it installed a
/// newer view's log, or, fixed view, no peer held the rest), or rebuilt after `format
/// --replace`: the superblock stops keeping the promise, or the replacing mark.
async fn promise_release<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    // After the deferred `Persist` of the installed log's view: a replaced replica's mark
    // goes only once its superblock records that log (a crash in between rebuilds again).
    if (journal.op_promised() == 0 && !journal.replacing())
        || replication.replica.borrow().recovering().is_some()
        || journal.staged_bytes() > 0
        || !replication.deferred.borrow().is_empty()
    {
        return false;
    }
    tracing::info!(
        shard = shard.index,
        op_durable = journal.op_durable(),
        op_promised = journal.op_promised(),
        "replica recovered"
    );
    if let Err(error) = journal.promise_release().await {
        panic!(
            "shard {}: superblock write failed, stopping: {error}",
            shard.index
        );
    }
    true
}

/// With view change, a restart replays only what the superblock records as committed, and
/// must fetch or re-learn the rest: records the applied op (committed, in this view's log)
/// every [`COMMIT_PERSIST_INTERVAL_OPS`] ops.
async fn persist_applied<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    if !replication.settings.view_change || !replication.deferred.borrow().is_empty() {
        return false;
    }
    let applied = replication.replica.borrow().commit_min();
    let (view, log_view, recorded) = journal.views();
    if applied < recorded + COMMIT_PERSIST_INTERVAL_OPS || journal.staged_bytes() > 0 {
        return false;
    }
    if let Err(error) = journal.write_views(view, log_view, applied).await {
        panic!(
            "shard {}: superblock write failed, stopping: {error}",
            shard.index
        );
    }
    true
}

/// The lowest op some peer may still need from this replica's journal: one above the
/// smallest `op_durable` any peer reported, connected or not (a peer that is down keeps
/// its place, so it can repair when it returns), but never more than `retain_ops` below
/// the previous checkpoint: a peer further behind catches up by state sync
/// ([`crate::sync`]) instead of holding the journal back without bound.
fn retain_from_op(replication: &Replication, journal: &Journal) -> u64 {
    let replica = replication.replica.borrow();
    let peers = replica
        .others()
        .map(|peer| replica.peer(peer).op_durable.saturating_add(1))
        .min()
        .unwrap_or(u64::MAX);
    let floor = (journal.superblock().checkpoint_previous.op + 1)
        .saturating_sub(replication.settings.retain_ops);
    peers.max(floor)
}

/// Largest number of batches sealed and journaled together in one turn.
const GROUP_COMMIT_BATCHES_MAX: usize = 64;

/// Leader: seal, stage, send the Prepares, commit. With view change the Prepares go out
/// before the group commit starts, so the followers' writes overlap the leader's
/// (`Replica::sends_prepares_before_durable`); fixed view holds them until it is durable.
async fn leader_prepare<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    if !replication.deferred.borrow().is_empty() {
        // A new leader's `Persist` (its `log_view`) is durable before it seals: a restart
        // relies on it to tell whether this replica may have sealed in its view.
        return false;
    }
    let record_bytes = size_of::<S::Record>();
    let entry_padded_max = entry_bytes_padded(shard.body_bytes_max());
    let now_us = shard.now_us();
    shard.core.borrow_mut().observe_depth();
    let hold = !replication.replica.borrow().sends_prepares_before_durable();
    for outbox in replication.outboxes.iter() {
        outbox.hold(hold);
    }
    let mut sealed = 0;
    while sealed < GROUP_COMMIT_BATCHES_MAX
        && replication.replica.borrow().can_seal()
        && journal.staged_bytes() + entry_padded_max <= journal.write_buffer_bytes()
    {
        let Some(batch) = shard.core.borrow_mut().poll_seal(now_us) else {
            break;
        };
        sealed += 1;
        let core = shard.core.borrow();
        let sealed_batch = core.sealed_batch(core.sealed_count() - 1).expect("sealed");
        let op = sealed_batch.op;
        debug_assert_eq!(op, batch.op);
        let view = replication.replica.borrow().view();
        let meta = entry_meta(shard.index, view, &sealed_batch, record_bytes);
        if let Err(error) = journal.stage_parts(meta, sealed_batch.records, sealed_batch.requests) {
            panic!("shard {}: journal refused a batch: {error}", shard.index);
        }
        drop(core);
        let checksum = journal.checksum_staged();
        let mut replica = replication.replica.borrow_mut();
        replica.on_staged(now_us, op, checksum);
        let commit = replica.commit_max();
        let entry = journal.staged_entry(op).expect("just staged");
        for peer in replica.others() {
            let mut header = peer_header(&replica, Command::Prepare);
            header.set_field_u64(field::PREPARE_OP, op);
            header.set_field_u64(field::PREPARE_COMMIT, commit);
            header.set_field_u64(field::PREPARE_LOG_VIEW, view);
            header.checksum_body = checksum;
            if replication.outboxes[usize::from(peer)].push(header, entry) {
                if !hold {
                    replica.note_sent(peer, now_us);
                }
                ShardMetrics::add(&shard.metrics.replication_prepares_sent_total, 1);
            } else {
                ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
            }
        }
    }
    if sealed == 0 {
        for outbox in replication.outboxes.iter() {
            outbox.release();
        }
        return false;
    }
    if !hold {
        // Wake the sender tasks now: they write while this task waits for the journal,
        // so the followers' writes overlap this replica's.
        for outbox in replication.outboxes.iter() {
            outbox.wake_if_queued();
        }
    }
    shard.commit_gap_work_waiting(now_us);
    journal_commit_applying(shard, journal).await;
    let mut actions = replication.actions.borrow_mut();
    actions.clear();
    report_durable(shard, journal, &mut actions);
    // Held Prepares go out now: they count as heartbeats from now, not from when they were
    // staged (a slow fsync must not look like a silent leader).
    let now_us = shard.now_us();
    let mut replica = replication.replica.borrow_mut();
    for peer in replica.others() {
        let outbox = &replication.outboxes[usize::from(peer)];
        if outbox.holds_unreleased() {
            replica.note_sent(peer, now_us);
        }
    }
    drop(replica);
    for outbox in replication.outboxes.iter() {
        outbox.release();
    }
    submit_actions(shard, &actions);
    true
}

/// A message header from `replica`: its group, view, index and status.
fn peer_header(replica: &Replica, command: Command) -> PeerHeader {
    let status = match replica.status() {
        Status::Normal => STATUS_NORMAL,
        Status::ViewChange => STATUS_VIEW_CHANGE,
    };
    PeerHeader::new(
        command,
        replica.config().group,
        replica.view(),
        replica.config().replica,
        status,
    )
}

/// Follower: stage what arrived in order, commit, acknowledge.
async fn follower_append<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    if replication.inbound.borrow().is_empty() {
        return false;
    }
    let mut inbound = replication.inbound_spare.take();
    std::mem::swap(&mut *replication.inbound.borrow_mut(), &mut inbound);
    let now_us = shard.now_us();
    let mut actions = replication.batcher_actions.take();
    actions.clear();
    let mut staged = 0;
    let mut offset = 0;
    while offset < inbound.len() {
        let header: PeerHeader =
            bytemuck::pod_read_unaligned(&inbound[offset..offset + PEER_HEADER_BYTES]);
        let end = offset + PEER_HEADER_BYTES + header.body_bytes as usize;
        let entry = &inbound[offset + PEER_HEADER_BYTES..end];
        offset = end;
        let repair = header.command == Command::PrepareRepair as u16;
        let disposition = replication.replica.borrow_mut().on_prepare(
            now_us,
            header.replica,
            header.view,
            header.field_u64(field::PREPARE_OP),
            header.field_u64(field::PREPARE_COMMIT),
            repair,
            header.field_u64(field::PREPARE_LOG_VIEW),
            &mut actions,
        );
        // Each message's actions go out before the next message: a burst of duplicates (a
        // reconnect overlapping repair answers) would otherwise outgrow the buffer.
        submit_actions(shard, &actions);
        actions.clear();
        if disposition != PrepareDisposition::Append {
            if disposition == PrepareDisposition::Gap {
                ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
            }
            continue;
        }
        if journal.staged_bytes() + entry_bytes_padded(entry.len() - ENTRY_HEADER_BYTES)
            > journal.write_buffer_bytes()
        {
            // The core accepted the message in its view and log; while this write is in
            // flight the receive tasks run, and a StartView (or the end of an install) can
            // move both. Then the message belongs to a log this replica no longer votes
            // for: an entry of the old view staged at the new log's next op would be
            // acknowledged in the new view and applied where the group committed another
            // (the checks below see only op numbers and an install's checksums). Dropped;
            // the leader of the current view repairs it.
            let accepted_in = {
                let replica = replication.replica.borrow();
                (replica.view(), replica.log_view())
            };
            journal_commit(shard, journal).await;
            report_durable(shard, journal, &mut actions);
            let now_in = {
                let replica = replication.replica.borrow();
                (replica.view(), replica.log_view())
            };
            if now_in != accepted_in {
                ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
                continue;
            }
        }
        let entry_header: EntryHeader = bytemuck::pod_read_unaligned(&entry[..ENTRY_HEADER_BYTES]);
        let body = &entry[ENTRY_HEADER_BYTES..];
        let records_bytes = entry_header.entry_count as usize * entry_header.record_bytes as usize;
        // The core may have moved on during an await above (a StartView truncated its log;
        // the journal follows when the deferred Truncate runs): append only the next op of
        // both.
        let head = replication.replica.borrow().op_head();
        if entry_header.op != head + 1 || journal.op_staged() != head {
            ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
            continue;
        }
        let expected = replication
            .replica
            .borrow()
            .expected_checksum(entry_header.op);
        if expected.is_some_and(|checksum| checksum != entry_header.checksum_header) {
            // Another view's entry at this op: not the log being installed.
            ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
            continue;
        }
        match journal.stage_encoded(entry) {
            Ok(checksum) => {
                let op = entry_header.op;
                replication
                    .replica
                    .borrow_mut()
                    .on_staged(now_us, op, checksum);
                // Queued for apply while batch buffers last; beyond that (a long catch-up,
                // or a log installed before any of it may apply) the op is applied from
                // the journal once committed.
                let queued = shard.core.borrow_mut().enqueue_replicated(
                    op,
                    entry_header.operation,
                    &body[..records_bytes],
                    &body[records_bytes..],
                );
                // Not queued: applied from the journal (counted there).
                let _queued = queued;
                staged += 1;
            }
            Err(error) => {
                ShardMetrics::add(&shard.metrics.replication_prepares_dropped_total, 1);
                if matches!(error, JournalError::ChainMismatch { .. }) {
                    // While a log is installed: the head is an entry of an abandoned view.
                    replication.replica.borrow_mut().on_chain_mismatch(
                        now_us,
                        entry_header.op,
                        &mut actions,
                    );
                }
                tracing::warn!(shard = shard.index, %error, "prepare refused by the journal");
            }
        }
    }
    inbound.clear();
    *replication.inbound_spare.borrow_mut() = inbound;
    if staged > 0 {
        journal_commit(shard, journal).await;
        report_durable(shard, journal, &mut actions);
    }
    submit_actions(shard, &actions);
    *replication.batcher_actions.borrow_mut() = actions;
    true
}

/// Tells the core what the journal made durable. The core may have moved on while the write
/// was in flight (a StartView lowered its head; the journal is cut when the deferred
/// Truncate runs): only ops it still holds are reported, which are the same entries.
fn report_durable<S: StateMachine>(shard: &Shard<S>, journal: &Journal, actions: &mut Vec<Action>) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut replica = replication.replica.borrow_mut();
    let durable = journal.op_durable().min(replica.op_head());
    if durable >= replica.op_durable() {
        replica.on_durable(shard.now_us(), durable, actions);
    }
}

/// Serves queued repair requests from the journal, oldest op first.
async fn serve_repairs<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut served = false;
    let mut entry = replication.repair_entry.take();
    loop {
        let Some((to, op_min, op_max)) = replication.repairs.borrow_mut().pop_front() else {
            *replication.repair_entry.borrow_mut() = entry;
            return served;
        };
        served = true;
        if op_min < journal.op_first() {
            // Removed after a checkpoint: the requester must sync.
            crate::sync::send_not_retained(shard, journal, to, op_min);
            continue;
        }
        ShardMetrics::add(&shard.metrics.replication_repairs_served_total, 1);
        // The core's log, not only the journal's: a truncation the core made (installing a
        // view) may not have run on the journal yet, and the ops above it are not in the
        // log being served (simulator seed 394: an old leader served its abandoned op as
        // part of the new view's log).
        let op_max = op_max
            .min(journal.op_durable())
            .min(replication.replica.borrow().op_durable());
        for op in op_min..=op_max {
            // The log the entry is read from: if it changes during the read (a view change
            // installed another log or cut this one), the entry may not belong to the log
            // it would be labelled with; the requester asks again.
            let log_view = replication.replica.borrow().log_view();
            if let Err(error) = journal.read_entry(op, &mut entry).await {
                tracing::warn!(shard = shard.index, op, %error, "cannot serve repair");
                break;
            }
            {
                let replica = replication.replica.borrow();
                if replica.log_view() != log_view || op > replica.op_durable() {
                    break;
                }
            }
            let entry_header: EntryHeader =
                bytemuck::pod_read_unaligned(&entry[..ENTRY_HEADER_BYTES]);
            let mut header = replication.header(Command::PrepareRepair);
            header.set_field_u64(field::PREPARE_OP, op);
            header.set_field_u64(
                field::PREPARE_COMMIT,
                replication.replica.borrow().commit_max(),
            );
            header.set_field_u64(field::PREPARE_LOG_VIEW, log_view);
            header.checksum_body = entry_header.checksum_header;
            let dropped = &shard.metrics.replication_messages_dropped_total;
            if !replication.outboxes[usize::from(to)].send(header, &entry, dropped) {
                break;
            }
            ShardMetrics::add(&shard.metrics.replication_retransmits_total, 1);
        }
    }
}

/// Applies every committed op held here and answers (leader) or drops (follower) what it
/// produces.
async fn apply_committed<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let mut applied = false;
    loop {
        applied |= apply_queued(shard) > 0;
        let Some(next) = next_to_apply(shard) else {
            break;
        };
        // Not queued in the core (a long catch-up, or a log installed before it could
        // apply): read it back from the journal.
        if !apply_from_journal(shard, journal, next).await {
            // The view changed while the entry was read: applied later, if still committed
            // here.
            break;
        }
        applied_op(shard, next);
        applied = true;
    }
    if applied {
        applied_publish(shard);
    }
    applied
}

/// The next op this replica may apply now, if any.
fn next_to_apply<S: StateMachine>(shard: &Shard<S>) -> Option<u64> {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let limit = replication.replica.borrow().apply_limit();
    let next = shard.core.borrow().op_last() + 1;
    (next <= limit).then_some(next)
}

/// The next op to apply, if it is committed and queued in the core (so that a write's
/// [`journal_commit_applying`] can apply it).
fn queued_next<S: StateMachine>(shard: &Shard<S>) -> Option<u64> {
    next_to_apply(shard).filter(|&next| shard.core.borrow().queued_front_op() == Some(next))
}

/// Applies, in order, the committed ops the core holds queued, up to the first one it does
/// not (which [`apply_committed`] reads from the journal). Touches no journal, so it may run
/// while this replica's group commit is in flight ([`journal_commit_applying`]). Leaves the
/// metrics to [`applied_publish`]. Returns how many it applied.
fn apply_queued<S>(shard: &Shard<S>) -> u64
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let mut applied = 0;
    while let Some(next) = queued_next(shard) {
        applied_op(shard, next);
        applied += 1;
    }
    applied
}

/// Applies op `next` from the core's queue (unless [`apply_from_journal`] already did), tells
/// the replica, records a leader's commit latency and hands the state machine's messages on.
fn applied_op<S>(shard: &Shard<S>, next: u64)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let leader = {
        let replica = replication.replica.borrow();
        replica.is_leader() && replica.status() == Status::Normal
    };
    let mut core = shard.core.borrow_mut();
    let op = if core.op_last() == next {
        next
    } else {
        crate::runtime::apply_next_timed(shard, &mut core).expect("the next op is queued")
    };
    let mut replica = replication.replica.borrow_mut();
    replica.on_applied(op);
    if leader && let Some(staged_us) = replica.staged_us(op) {
        shard
            .metrics
            .commit_latency
            .record(shard.now_us().saturating_sub(staged_us), 1);
    }
    drop(replica);
    while let Some(outbound) = core.poll_outbound() {
        // Every replica produces the legs; only the leader sends them.
        if leader {
            crate::runtime::send_outbound(shard, outbound);
        }
    }
}

/// After ops were applied: pool and replication metrics, and a leader's commit gap.
fn applied_publish<S: StateMachine>(shard: &Shard<S>) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    shard.core.borrow().publish_pool_metrics();
    publish(shard);
    if replication.replica.borrow().is_ready_leader() {
        // The group's commit number moved and this leader applied up to it.
        shard.commit_gap_advanced();
    }
}

/// Applies op `op` from its journal entry (it is not queued in the core).
/// Returns `false`, applying nothing, if the op may no longer be applied once the entry is
/// read (the replica's state can change while the read is in flight).
async fn apply_from_journal<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    op: u64,
) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut entry = replication.repair_entry.take();
    if let Err(error) = journal.read_entry(op, &mut entry).await {
        panic!(
            "shard {}: committed op {op} unreadable, stopping: {error}",
            shard.index
        );
    }
    let applicable = op <= replication.replica.borrow().apply_limit()
        && shard.core.borrow().op_last() + 1 == op
        && shard.core.borrow().queued_front_op() != Some(op);
    if applicable {
        let header: EntryHeader = bytemuck::pod_read_unaligned(&entry[..ENTRY_HEADER_BYTES]);
        let body = &entry[ENTRY_HEADER_BYTES..];
        let records_bytes = header.entry_count as usize * header.record_bytes as usize;
        shard.core.borrow_mut().apply_from_journal(
            op,
            header.operation,
            &body[..records_bytes],
            &body[records_bytes..],
        );
        ShardMetrics::add(&shard.metrics.replication_applied_from_journal_total, 1);
    }
    *replication.repair_entry.borrow_mut() = entry;
    applicable
}

/// Writes what is staged: one write and one `fdatasync` (per policy). A journal that
/// cannot write stops the process: it must not acknowledge what it did not make durable.
async fn journal_commit<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) {
    let started = Instant::now();
    if let Err(error) = journal.commit().await {
        panic!(
            "shard {}: journal write failed, stopping: {error}",
            shard.index
        );
    }
    shard
        .metrics
        .journal_commit_latency
        .record(started.elapsed().as_micros() as u64, 1);
    ShardMetrics::add(&shard.metrics.journal_commits_total, 1);
}

/// A leader's [`journal_commit`], applying meanwhile what its group has committed. The write
/// and its `fdatasync` are the longest wait of a turn. When requests queue, the ops of the
/// leader's previous group commit become committed when that write completes (its quorum
/// acknowledged first) and are left to this turn by [`replicated_turn`], or their
/// acknowledgements arrive during this write. Applying them while the write is in flight,
/// instead of after it, takes the apply (0.6 ms for 1,000 transfers on the 2-vCPU VM) out
/// of the cycle that spaces the leader's group commits: the next write starts one write
/// after this one, not one write plus the applies. Only ops queued in the core are applied
/// here (no journal read while the journal writes); anything else waits for
/// [`apply_committed`]. Nothing this write carries is applied before it is durable
/// ([`Replica::apply_limit`] stops at `op_durable`).
///
/// Followers do not do this: an apply running when a follower's write completes holds
/// back its `fdatasync` (submitted only when the task sees the write complete) and so its
/// acknowledgement, which is on the commit path. Measured (docs/benchmarks.md, "Applying
/// during the group commit"): applying during writes on every replica made commits about
/// 15 % slower; on the leader alone it raised a saturated cluster's throughput by 8-32 %.
///
/// glommio hands a task's I/O to the kernel only once its task queue has run dry, so the
/// first apply waits for one pass of the reactor (a timer of [`WRITE_SUBMITTED_WAIT_US`]),
/// or the write would start after the apply rather than beside it. Later applies wait on
/// the batcher's notification, which the receive tasks ring for each PrepareOk and
/// Commit; consuming it here loses nothing, as the turn that called this reports progress
/// and the batcher runs another at once. Whatever is committed and queued when the write
/// completes is applied before this returns.
async fn journal_commit_applying<S>(shard: &Shard<S>, journal: &mut Journal)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    let gate = &replication.write_gate;
    gate.fired.store(true, std::sync::atomic::Ordering::Relaxed);
    // One reference-count increment, no allocation.
    let write_waker = std::task::Waker::from(gate.clone());
    let mut write = std::pin::pin!(journal_commit(shard, journal));
    let mut submitted = std::pin::pin!(glommio::timer::Timer::new(Duration::from_micros(
        WRITE_SUBMITTED_WAIT_US
    )));
    let mut is_submitted = false;
    std::future::poll_fn(|cx| {
        gate.register(cx.waker());
        loop {
            // Polled only when its own waker fired: a pending glommio disk I/O keeps a
            // clone of the waker of every poll (the task's reference count is 16 bits),
            // and this task is woken for every acknowledgement and submission. A flood of
            // notifications during one slow write aborted the executor.
            if gate.fired.swap(false, std::sync::atomic::Ordering::Relaxed)
                && write
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(&write_waker))
                    .is_ready()
            {
                return std::task::Poll::Ready(());
            }
            if !is_submitted {
                if submitted.as_mut().poll(cx).is_pending() {
                    return std::task::Poll::Pending;
                }
                is_submitted = true;
            } else if std::pin::pin!(shard.batcher.wait()).poll(cx).is_pending() {
                return std::task::Poll::Pending;
            }
            let applied = apply_queued(shard);
            if applied > 0 {
                applied_publish(shard);
                ShardMetrics::add(
                    &shard.metrics.replication_applied_during_write_total,
                    applied,
                );
            }
        }
    })
    .await;
    // The task's waker is not kept past the wait (nor past the executor, at shutdown).
    gate.clear();
    if apply_queued(shard) > 0 {
        applied_publish(shard);
    }
}

/// A waker for one future polled inside a task woken by many others: it records that the
/// future's own waker fired and wakes the task. One per shard, allocated at start.
#[derive(Default)]
struct PollGate {
    /// The future's waker fired since it was last polled.
    fired: std::sync::atomic::AtomicBool,
    /// The task polling it.
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

impl PollGate {
    /// Records the polling task's waker (cloned only when it changed).
    fn register(&self, waker: &std::task::Waker) {
        let mut task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match task.as_ref() {
            Some(stored) if stored.will_wake(waker) => {}
            _ => *task = Some(waker.clone()),
        }
    }

    /// Forgets the polling task's waker.
    fn clear(&self) {
        *self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

impl std::task::Wake for PollGate {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.fired.store(true, std::sync::atomic::Ordering::Relaxed);
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// How long [`journal_commit_applying`] waits before its first apply: any timer fires only
/// after the executor's next reactor pass, which submits the write.
const WRITE_SUBMITTED_WAIT_US: u64 = 1;

/// Whether a stopping replicated shard may end: idle, or its drain deadline passed.
pub(crate) fn drain_expired<S: StateMachine>(shard: &Shard<S>) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let seen = replication.stop_seen.get().unwrap_or_else(|| {
        let now = Instant::now();
        replication.stop_seen.set(Some(now));
        now
    });
    seen.elapsed() > Duration::from_millis(DRAIN_TIMEOUT_MS)
}

/// The journal entry of a batch this shard sealed.
pub(crate) fn entry_meta(
    shard: usize,
    view: u64,
    batch: &SealedBatch<'_>,
    record_bytes: usize,
) -> EntryMeta {
    EntryMeta {
        shard: shard as u32,
        view,
        op: batch.op,
        operation: batch.operation,
        entry_count: (batch.records.len() / record_bytes) as u32,
        record_bytes: record_bytes as u32,
        request_count: (batch.requests.len() / REQUEST_DESCRIPTOR_BYTES) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(commit: u64) -> Action {
        Action::Commit {
            to: 1,
            commit,
            op_head: commit,
        }
    }

    /// Behind a superblock write that does not land, heartbeats keep coming: once the
    /// queue is full they are dropped (a lost message), and a truncation still queues
    /// behind what waits. The queue asserted instead, stopping the shard.
    #[test]
    fn a_full_deferred_queue_drops_messages_and_keeps_journal_actions() {
        let mut deferred = VecDeque::with_capacity(8);
        let capacity = deferred.capacity();
        deferred.push_back(Action::Persist {
            view: 2,
            log_view: 2,
            commit_max: 0,
        });
        let mut dropped = 0;
        for commit in 0..(2 * capacity as u64) {
            dropped += defer(&mut deferred, &[heartbeat(commit)]);
        }
        assert_eq!(deferred.len(), capacity);
        assert_eq!(dropped, capacity as u64 + 1);
        deferred.pop_back();
        let dropped = defer(&mut deferred, &[heartbeat(99), Action::Truncate { op: 4 }]);
        assert_eq!(dropped, 1);
        assert!(matches!(deferred.back(), Some(Action::Truncate { op: 4 })));
        assert!(matches!(deferred.front(), Some(Action::Persist { .. })));
    }
}
