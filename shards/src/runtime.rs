//! The per-core runtime: one pinned glommio executor (one io_uring) per shard.
//!
//! [`Node::start`] spawns one executor per configured core, pinned with
//! `Placement::Fixed`. Each runs one shard: a client listener, one task per client
//! connection, one batcher task and one mesh task per peer shard. Shards share nothing but
//! the N×N mesh of engine SPSC rings ([`crate::mesh`]); a glommio shared channel of
//! capacity one serves only as the doorbell that wakes a parked executor. Within a core,
//! tasks share the shard through `RefCell`s that are never held across an `.await`.
//!
//! Shutdown (SIGINT/SIGTERM or [`Node::shutdown`]): listeners stop accepting, connections
//! finish the request they are serving, the batcher drains everything accepted, and each
//! shard returns a [`ShardReport`] with its state machine.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use percore_engine::batch::BatchLimits;
use percore_engine::frame::{self, FRAME_HEADER_BYTES, Kind};
use percore_engine::limits::{
    POOL_BATCHES_DEFAULT, POOL_TRANSACTIONS_DEFAULT, TX_RING_CAPACITY_DEFAULT,
};
use percore_engine::state_machine::{RestoreError, StateMachine};
use tracing::Instrument as _;

use crate::core::{Backpressure, CoreConfig, Origin, ShardCore};
use crate::format::JournalCreate;
use crate::journal::{Journal, JournalConfig, JournalError, JournalOptions};
use crate::mesh::{Mesh, MeshEndpoint, MeshLinks, MeshMessage};
use crate::metrics::{
    CommitGapClock, EXECUTOR_PROBE_INTERVAL_US_DEFAULT, GapHistogram, ShardMetrics,
};
use percore_engine::journal::entry_bytes_padded;

/// Default first client port; shard `i` listens on `client_port_base + i`.
pub const CLIENT_PORT_BASE_DEFAULT: u16 = 7000;
/// Default client connections one shard serves at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 64;
/// Default io_uring registered memory per shard (bytes): 8 MiB of memlock covers 4 shards.
pub const IO_MEMORY_BYTES_DEFAULT: usize = 1 << 20;
/// Default capacity of each inter-shard mesh ring (messages).
pub const MESH_RING_CAPACITY_DEFAULT: usize = 16_384;
/// How long a connection refused as busy is read from before it is closed (ms).
const BUSY_DRAIN_MS: u64 = 10;
/// Most client connections per shard: a record's origin names its connection in 16 bits.
pub const CONNECTIONS_MAX_LIMIT: usize = 1 << 16;
/// How often idle tasks look at the stop flag.
pub(crate) const STOP_POLL_MS: u64 = 50;
/// Longest a client frame may take to arrive once its first bytes have (ms): a client that
/// stalls mid-frame loses its connection (an idle one between frames keeps it).
pub const CLIENT_FRAME_READ_TIMEOUT_MS: u64 = 10_000;
/// Longest a reply may wait for a client to read (ms): a client that stops reading loses
/// its connection.
pub const CLIENT_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Default checkpoint interval: a checkpoint after every op that is a multiple of this (ops).
pub const CHECKPOINT_INTERVAL_OPS_DEFAULT: u64 = 16_384;
/// Runtime error codes sent in error replies (frame codes are below 1000).
pub const ERROR_SERVER_BUSY: u32 = 1000;
/// The request carries more records than one batch may hold.
pub const ERROR_TOO_MANY_RECORDS: u32 = 1002;
/// This replica does not lead the shard's replication group: send to the leader.
pub const ERROR_NOT_LEADER: u32 = 1010;
/// A replicated request holds records of another shard (one request is one group's op).
pub const ERROR_WRONG_SHARD: u32 = 1012;

/// Everything a node needs to start; every limit is fixed here.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Cores to run shards on, one shard per entry, in shard order.
    pub cores: Vec<usize>,
    /// Address client listeners bind to.
    pub listen: IpAddr,
    /// Shard `i` listens on `client_port_base + i` (0: any free port, for tests).
    pub client_port_base: u16,
    /// Client connections served at once per shard; more are refused.
    pub connections_max: usize,
    /// Largest client frame accepted (bytes, header included).
    pub frame_bytes_max: usize,
    /// Transaction pool slots per shard.
    pub transactions: usize,
    /// Batch buffers per shard.
    pub batches: usize,
    /// Transaction ring capacity (power of two).
    pub tx_ring_capacity: usize,
    /// Mesh ring capacity (power of two).
    pub mesh_ring_capacity: usize,
    /// Batch sealing limits.
    pub batch: BatchLimits,
    /// io_uring registered memory per shard (bytes).
    pub io_memory_bytes: usize,
    /// Allow two shards on one core (the local benchmark on a small box); off, a repeated
    /// core is refused.
    pub allow_shared_cores: bool,
    /// Interval of each shard's executor lag probe (µs; 0: no probe), see
    /// [`EXECUTOR_PROBE_INTERVAL_US_DEFAULT`].
    pub executor_probe_interval_us: u64,
    /// The journal; `None` runs without durability (tests and in-memory benchmarks).
    pub journal: Option<JournalSettings>,
    /// Log replication to peer nodes; `None` runs a single node. Needs a journal.
    pub replication: Option<crate::replication::ReplicationSettings>,
    /// BFT replication (`--fault-model bft`, `docs/bft.md`); exclusive with `replication`.
    /// Needs a journal and one shard.
    pub bft: Option<crate::bft::BftSettings>,
    /// Seed of the replication core's routing RNG.
    pub seed: u64,
    /// Application-thread ingest ([`Node::submitter`]): ring and completion slot sizes.
    pub ingest: crate::ingest::IngestConfig,
}

/// Where and how each shard journals its batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSettings {
    /// Shard `i` journals under `data_dir/shard-<i>/`.
    pub data_dir: std::path::PathBuf,
    /// When a batch counts as durable.
    pub fsync: crate::journal::FsyncPolicy,
    /// Size of one segment file (bytes, a multiple of 4 KiB).
    pub segment_bytes: u64,
    /// Identity of the cluster; a data directory of another cluster is refused.
    pub cluster_id: u128,
    /// A checkpoint (snapshot + superblock, then old segments removed) once every this many
    /// ops (0: never, and the journal grows without bound); shard `k` of `S` at the ops
    /// `c` with `(c + k × interval / S) % interval == 0` ([`crate::checkpoint::checkpoint_due`]).
    pub checkpoint_interval_ops: u64,
    /// Snapshot file writes of all the node's checkpoint followers together (bytes/s,
    /// nonzero): one budget for the node, not one per shard.
    pub snapshot_write_bytes_per_s: u64,
    /// Zero-fill the next segment ahead of use ([`crate::journal::SegmentSpare`]), so that
    /// appends overwrite written blocks and their `fdatasync` commits no file system
    /// metadata. Off (the default): each segment is created by `fallocate` at its roll-over.
    pub segment_spare: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            cores: vec![0],
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_port_base: CLIENT_PORT_BASE_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            frame_bytes_max: FRAME_HEADER_BYTES
                + BatchLimits::default().entries_max * 128
                + frame::SIGNATURE_TRAILER_BYTES,
            transactions: POOL_TRANSACTIONS_DEFAULT,
            batches: POOL_BATCHES_DEFAULT,
            tx_ring_capacity: TX_RING_CAPACITY_DEFAULT,
            mesh_ring_capacity: MESH_RING_CAPACITY_DEFAULT,
            batch: BatchLimits::default(),
            io_memory_bytes: IO_MEMORY_BYTES_DEFAULT,
            allow_shared_cores: false,
            executor_probe_interval_us: EXECUTOR_PROBE_INTERVAL_US_DEFAULT,
            journal: None,
            replication: None,
            bft: None,
            seed: 1,
            ingest: crate::ingest::IngestConfig::default(),
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No cores configured.
    #[error("no cores configured")]
    NoCores,
    /// A configured core does not exist on this machine.
    #[error("core {core} does not exist (this machine has {online} online CPUs)")]
    NoSuchCore {
        /// The core asked for.
        core: usize,
        /// CPUs online.
        online: usize,
    },
    /// The journal could not be opened or recovered (I/O, corruption, another cluster's data).
    #[error("shard {shard}: journal: {message}")]
    Journal {
        /// Shard index.
        shard: usize,
        /// What went wrong (shard, op, segment and offset for corruption).
        message: String,
    },
    /// The shard failed to start; the cause was returned by [`Node::start`].
    #[error("shard {shard} failed to start")]
    StartFailed {
        /// Shard index.
        shard: usize,
    },
    /// Two shards were given one core without `allow_shared_cores`.
    #[error("core {core} is listed twice: one shard per core (pass --allow-shared-cores to share)")]
    SharedCore {
        /// The repeated core.
        core: usize,
    },
    /// The data directory was not formatted for this replica (`crate::format`).
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// Locked memory for io_uring is not available.
    #[error(transparent)]
    Memlock(#[from] crate::memlock::MemlockError),
    /// A shard's core could not be built.
    #[error("shard {shard}: {source}")]
    Core {
        /// Shard index.
        shard: usize,
        /// Cause.
        source: crate::core::CoreError,
    },
    /// An executor could not be started (io_uring setup, pinning).
    #[error("shard {shard}: cannot start executor on core {core}: {message}")]
    Executor {
        /// Shard index.
        shard: usize,
        /// Core.
        core: usize,
        /// glommio's explanation.
        message: String,
    },
    /// A listener could not bind.
    #[error("shard {shard}: cannot listen on {address}: {message}")]
    Listen {
        /// Shard index.
        shard: usize,
        /// Address tried.
        address: SocketAddr,
        /// Cause.
        message: String,
    },
    /// A mesh ring capacity is unusable.
    #[error("mesh_ring_capacity {0} must be a power of two >= 2")]
    MeshCapacity(usize),
    /// Client connections per shard outside `1..=CONNECTIONS_MAX_LIMIT`.
    #[error("connections_max {0} must be between 1 and {CONNECTIONS_MAX_LIMIT}")]
    ConnectionsMax(usize),
    /// A BFT shard could not start.
    #[error("shard {shard}: BFT: {source}")]
    Bft {
        /// Shard index.
        shard: usize,
        /// Cause.
        source: crate::bft::BftStartError,
    },
    /// A journal with a snapshot write budget of 0 bytes/s: no checkpoint could be written.
    #[error("snapshot write budget of 0 bytes/s: snapshot_write_mib_per_s must be at least 1")]
    SnapshotWriteBudgetZero,
    /// The replication settings cannot work.
    #[error("replication: {0}")]
    Replication(String),
    /// The ingest sizes are unusable.
    #[error(transparent)]
    Ingest(#[from] crate::ingest::IngestConfigError),
}

/// The client protocol as a state machine `S` defines it: ping, plus the operations
/// `S::client_operation` accepts, with `S::Record` requests and `S::Result` replies.
struct MachineSchema<S>(std::marker::PhantomData<S>);

impl<S> Default for MachineSchema<S> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

impl<S: StateMachine> frame::FrameSchema for MachineSchema<S> {
    fn record_bytes(&self, kind: Kind, operation: u16) -> Option<usize> {
        if operation == frame::OPERATION_PING {
            return Some(0);
        }
        S::client_operation(operation)?;
        match kind {
            Kind::Request | Kind::SignedRequest => Some(size_of::<S::Record>()),
            Kind::Reply => Some(size_of::<S::Result>()),
            Kind::ErrorReply => Some(0),
        }
    }
}

/// What a shard hands back when it stops.
#[derive(Debug)]
pub struct ShardReport<S> {
    /// Shard index.
    pub shard: usize,
    /// Highest op applied.
    pub op_last: u64,
    /// The state machine as it stood at the end.
    pub state_machine: S,
}

/// A running node: its shards' executors, addresses and metrics.
#[derive(Debug)]
pub struct Node<S: StateMachine + Send + 'static> {
    handles: Vec<glommio::ExecutorJoinHandle<Result<ShardReport<S>, NodeError>>>,
    client_addresses: Vec<SocketAddr>,
    metrics: Vec<Arc<ShardMetrics>>,
    stop: Arc<AtomicBool>,
    ingest: Arc<crate::ingest::Ingress<S>>,
    /// [`Node::helper_cores`].
    helper_cores: Arc<[usize]>,
    /// The data directory, held until the node is gone ([`crate::format::lock`]).
    _data_dir_lock: Option<crate::format::DataDirLock>,
}

/// A seed the OS randomised for this process (for table hashes that clients must not be
/// able to predict). Drawn once at start-up; the engine itself never draws randomness.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Validates cores against the machine.
fn check_cores(cores: &[usize], allow_shared_cores: bool) -> Result<(), NodeError> {
    if cores.is_empty() {
        return Err(NodeError::NoCores);
    }
    if !allow_shared_cores {
        for (index, core) in cores.iter().enumerate() {
            if cores[..index].contains(core) {
                return Err(NodeError::SharedCore { core: *core });
            }
        }
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = online.max(num_cpus_configured());
    for &core in cores {
        if core >= online {
            return Err(NodeError::NoSuchCore { core, online });
        }
    }
    Ok(())
}

fn num_cpus_configured() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|text| {
            text.trim()
                .rsplit(['-', ','])
                .next()
                .and_then(|last| last.parse::<usize>().ok())
        })
        .map_or(1, |last| last + 1)
}

impl<S> Node<S>
where
    S: StateMachine + Send + 'static,
    S::Record: Send,
    S::Result: Send,
{
    /// Starts one shard per configured core. `make_state_machine(shard, shards)` builds each
    /// shard's state machine on the shard's own thread (so its memory is local to that core).
    pub fn start<F>(config: NodeConfig, make_state_machine: F) -> Result<Self, NodeError>
    where
        F: Fn(usize, usize) -> S + Send + Sync + 'static,
    {
        check_cores(&config.cores, config.allow_shared_cores)?;
        let shards = config.cores.len();
        if let Some(replication) = &config.replication {
            if config.journal.is_none() {
                return Err(NodeError::Replication(
                    "a replicated node needs a journal (--data-dir)".into(),
                ));
            }
            let count = replication.peers.len();
            if count == 0 || count > percore_engine::replica::REPLICA_COUNT_MAX {
                return Err(NodeError::Replication(format!(
                    "{count} replicas: between 1 and {} are supported",
                    percore_engine::replica::REPLICA_COUNT_MAX
                )));
            }
            if usize::from(replication.replica) >= count {
                return Err(NodeError::Replication(format!(
                    "replica index {} is not below the {count} peers listed",
                    replication.replica
                )));
            }
        }
        if let Some(bft) = &config.bft {
            check_bft(&config, bft)?;
        }
        if !config.mesh_ring_capacity.is_power_of_two() || config.mesh_ring_capacity < 2 {
            return Err(NodeError::MeshCapacity(config.mesh_ring_capacity));
        }
        // A record's origin names its connection in 16 bits: slot 65,536 would be slot 0,
        // and its results another client's.
        if !(1..=CONNECTIONS_MAX_LIMIT).contains(&config.connections_max) {
            return Err(NodeError::ConnectionsMax(config.connections_max));
        }
        // One budget for every follower of this node (an unused one without checkpoints).
        let snapshot_write_bytes_per_s = match &config.journal {
            Some(journal) if journal.checkpoint_interval_ops > 0 => {
                if journal.snapshot_write_bytes_per_s == 0 {
                    return Err(NodeError::SnapshotWriteBudgetZero);
                }
                journal.snapshot_write_bytes_per_s
            }
            _ => 1,
        };
        let followers = FollowerShared {
            write_budget: Arc::new(crate::checkpoint::SnapshotWriteBudget::new(
                snapshot_write_bytes_per_s,
            )),
            // Read here, on the thread that starts the node, before any shard pins itself.
            cores: crate::affinity::helper_cores(&config.cores).into(),
        };
        if config.journal.is_some() {
            tracing::info!(cores = ?followers.cores, "checkpoint followers run on these cores");
        }
        let helper_cores = followers.cores.clone();
        // One process per data directory, taken before anything in it is read.
        let data_dir_lock = config
            .journal
            .as_ref()
            .map(|journal| crate::format::lock(&journal.data_dir))
            .transpose()?;
        // A replica's data directory is formatted once; its journals are created at its
        // first start only (`crate::format`).
        let format_identity = format_identity(&config);
        let journal_create = match (&config.journal, format_identity) {
            (Some(journal), Some(identity)) => crate::format::check(&journal.data_dir, identity)?,
            _ => JournalCreate::FirstStart,
        };
        let budget = crate::memlock::ensure(shards, config.io_memory_bytes)?;
        tracing::info!(?budget, shards, "memlock budget");
        let stop = Arc::new(AtomicBool::new(false));
        let ingest = Arc::new(crate::ingest::Ingress::new(
            config.ingest,
            shards,
            stop.clone(),
        )?);
        let metrics: Vec<_> = (0..shards)
            .map(|i| Arc::new(ShardMetrics::new(i as u32)))
            .collect();
        let mut endpoints = Mesh::<S>::build(shards, config.mesh_ring_capacity).into_endpoints();
        // BFT mode: a Byzantine leader may propose a client's old signed request again, so
        // every copy of the machine (the shard's, its checkpoint follower's, a fetched
        // snapshot's scratch copy) refuses what its sessions cannot tell from such a replay
        // (`docs/bft.md` §13).
        let bft = config.bft.is_some();
        let sessionless_warned = AtomicBool::new(false);
        let make_state_machine = Arc::new(move |shard: usize, shards: usize| {
            let mut machine = make_state_machine(shard, shards);
            // Once per node: followers and scratch copies are built again and again.
            if bft
                && !machine.refuse_session_replays()
                && !sessionless_warned.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    shard,
                    "BFT mode with a state machine that keeps no client sessions: a \
                     Byzantine leader may have a client's old request applied again, and \
                     only the machine's own idempotency stops it"
                );
            }
            machine
        });
        let quiet: Arc<[AtomicBool]> = (0..shards).map(|_| AtomicBool::new(false)).collect();
        let shard_failed = Arc::new(AtomicUsize::new(SHARD_FAILED_NONE));
        let all_metrics: Arc<[Arc<ShardMetrics>]> = metrics.iter().cloned().collect();
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<(usize, Result<SocketAddr, NodeError>)>();
        let mut handles = Vec::with_capacity(shards);
        for (shard, endpoint) in endpoints.drain(..).enumerate() {
            let core = config.cores[shard];
            let context = ShardContext {
                shard,
                shards,
                config: config.clone(),
                metrics: metrics[shard].clone(),
                stop: stop.clone(),
                quiet: quiet.clone(),
                shard_failed: shard_failed.clone(),
                all_metrics: all_metrics.clone(),
                ingest: ingest.clone(),
                followers: followers.clone(),
                journal_create,
            };
            let make = make_state_machine.clone();
            let ready = ready_tx.clone();
            let guard = ShardExitGuard {
                shard,
                stop: stop.clone(),
                shard_failed: shard_failed.clone(),
                returned: false,
            };
            let handle = LocalExecutorBuilder::new(Placement::Fixed(core))
                .name(&format!("shard-{shard}"))
                .io_memory(config.io_memory_bytes)
                .spin_before_park(Duration::from_micros(50))
                .spawn(move || async move {
                    ShardExitGuard::arm(guard);
                    let state_machine = make(shard, shards);
                    // The checkpoint follower's copy, built on its own thread.
                    let make_follower: MakeFollower<S> = Arc::new(move || make(shard, shards));
                    let returned =
                        run_shard(context, state_machine, make_follower, endpoint, ready).await;
                    ShardExitGuard::returned();
                    returned
                })
                .map_err(|err| NodeError::Executor {
                    shard,
                    core,
                    message: err.to_string(),
                })?;
            handles.push(handle);
        }
        drop(ready_tx);
        let mut client_addresses = vec![SocketAddr::from(([0, 0, 0, 0], 0)); shards];
        let mut reported = vec![false; shards];
        for _ in 0..shards {
            let (shard, address) = loop {
                // A shard whose thread died before it was ready (a state machine constructor
                // that panicked, in a binary that unwinds) never reports: its exit guard
                // flags it. The node must not start without it.
                let missing = || {
                    let died = shard_failed.load(Ordering::Acquire);
                    let shard = if died < shards {
                        died
                    } else {
                        reported.iter().position(|done| !done).unwrap_or(0)
                    };
                    let message = "the shard's thread ended before it was ready (a panic)";
                    let error = NodeError::Executor {
                        shard,
                        core: config.cores[shard],
                        message: message.into(),
                    };
                    (shard, Err(error))
                };
                match ready_rx.recv_timeout(Duration::from_millis(START_POLL_MS)) {
                    Ok(ready) => break ready,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        if shard_failed.load(Ordering::Acquire) == SHARD_FAILED_NONE => {}
                    Err(_) => break missing(),
                }
            };
            reported[shard] = true;
            match address {
                Ok(address) => client_addresses[shard] = address,
                Err(err) => {
                    tracing::error!(shard, error = %err, "shard failed to start; stopping the others");
                    // The others must not wait for this shard to drain: it never will.
                    shard_failed.store(shard, Ordering::Release);
                    stop.store(true, Ordering::Relaxed);
                    for handle in handles {
                        let _ = handle.join();
                    }
                    return Err(err);
                }
            }
        }
        if let (
            Some(journal),
            Some(identity),
            JournalCreate::FirstStart | JournalCreate::FirstStartReplacing,
        ) = (&config.journal, format_identity, journal_create)
        {
            // Every shard opened (and so created) its journal: from now on a missing one
            // is refused.
            if let Err(error) = crate::format::mark_started(&journal.data_dir, identity) {
                stop.store(true, Ordering::Relaxed);
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(error.into());
            }
        }
        // Every shard has built its state machine (and so advised its tables).
        crate::hugepages::log_state();
        Ok(Self {
            handles,
            client_addresses,
            metrics,
            stop,
            ingest,
            helper_cores,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// A handle for application threads to submit records into the shards and wait for
    /// their results (see [`crate::ingest`]). Clone it freely, one per thread.
    pub fn submitter(&self) -> crate::ingest::Submitter<S> {
        crate::ingest::Submitter::new(self.ingest.clone())
    }

    /// Client address of each shard, in shard order.
    pub fn client_addresses(&self) -> &[SocketAddr] {
        &self.client_addresses
    }

    /// Each shard's metrics.
    pub fn metrics(&self) -> &[Arc<ShardMetrics>] {
        &self.metrics
    }

    /// The cores for the node's helper threads (checkpoint followers, the metrics server):
    /// those allowed that no shard uses, or all allowed ones when the shards use every one
    /// ([`crate::affinity::helper_cores`], read before any shard pinned itself).
    pub fn helper_cores(&self) -> &[usize] {
        &self.helper_cores
    }

    /// The flag that stops the node; signal handlers set it.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Waits until the stop flag is set (by a signal or another thread), then drains.
    pub fn wait(mut self) -> Result<Vec<ShardReport<S>>, NodeError> {
        let handles = std::mem::take(&mut self.handles);
        let mut reports = Vec::with_capacity(handles.len());
        for (shard, handle) in handles.into_iter().enumerate() {
            let report = handle.join().map_err(|err| NodeError::Executor {
                shard,
                core: usize::MAX,
                message: format!("shard thread failed: {err}"),
            })??;
            reports.push(report);
        }
        Ok(reports)
    }

    /// Stops accepting, drains everything accepted, and returns each shard's report.
    pub fn shutdown(self) -> Result<Vec<ShardReport<S>>, NodeError> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }
}

/// Dropping a node that was not shut down or waited for (an early return in the embedder)
/// stops it as [`Node::shutdown`] does and waits for its shards, dropping their reports:
/// its shards would otherwise go on serving and journaling, detached, while the data
/// directory's lock (released with the node) told others it was free.
impl<S: StateMachine + Send + 'static> Drop for Node<S> {
    fn drop(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// How often `Node::start` looks whether a shard's thread died while it waits for the
/// shards to be ready (ms).
const START_POLL_MS: u64 = 50;

/// [`Shard::shard_failed`] while no shard has failed.
const SHARD_FAILED_NONE: usize = usize::MAX;

/// Stops the node when a shard's thread ends without its shard having returned: a panic.
/// The workspace's release profile aborts on a panic, but an embedder's binary decides for
/// itself, and with `panic = "unwind"` the shard's thread used to die alone (glommio closes
/// a task that panics and lets the panic end the executor's thread): the other shards
/// waited for it to drain for ever, and so did `Node::wait` and `Node::shutdown`. Now the
/// others stop waiting ([`Shard::shard_failed`]) and stop, and `wait` returns the dead
/// shard's [`NodeError::Executor`]. What it held (requests in flight, its pools) is lost
/// with it; submitters waiting on it reach their deadlines.
///
/// Kept in a thread-local, whose destructor runs as the thread ends, however it ends: a
/// guard held by the shard's future would not do, since glommio drops a dead executor's
/// tasks without unwinding through them.
struct ShardExitGuard {
    shard: usize,
    stop: Arc<AtomicBool>,
    shard_failed: Arc<AtomicUsize>,
    /// `run_shard` returned (with its report or its error): nothing to do.
    returned: bool,
}

thread_local! {
    static SHARD_EXIT: RefCell<Option<ShardExitGuard>> = const { RefCell::new(None) };
}

impl ShardExitGuard {
    /// Gives this thread its guard.
    fn arm(guard: ShardExitGuard) {
        SHARD_EXIT.with(|slot| *slot.borrow_mut() = Some(guard));
    }

    /// The shard returned: its thread ends as planned.
    fn returned() {
        SHARD_EXIT.with(|slot| {
            if let Some(guard) = slot.borrow_mut().as_mut() {
                guard.returned = true;
            }
        });
    }
}

impl Drop for ShardExitGuard {
    fn drop(&mut self) {
        if self.returned {
            return;
        }
        tracing::error!(
            shard = self.shard,
            "shard thread ended without its shard returning (a panic); stopping the node"
        );
        self.shard_failed.store(self.shard, Ordering::Release);
        self.stop.store(true, Ordering::Release);
    }
}

/// What one shard's executor is handed.
struct ShardContext<S: StateMachine> {
    shard: usize,
    shards: usize,
    config: NodeConfig,
    metrics: Arc<ShardMetrics>,
    stop: Arc<AtomicBool>,
    quiet: Arc<[AtomicBool]>,
    shard_failed: Arc<AtomicUsize>,
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    ingest: Arc<crate::ingest::Ingress<S>>,
    followers: FollowerShared,
    /// Whether a missing journal may be created (`crate::format`).
    journal_create: JournalCreate,
}

/// A single-threaded notification: `notify` wakes the one waiter, or the next `wait`
/// returns at once. Lives inside one executor; never crosses cores.
#[derive(Debug, Default)]
pub(crate) struct LocalNotify {
    pending: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub(crate) fn notify(&self) {
        self.pending.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.pending.replace(false) {
                return Poll::Ready(());
            }
            let mut slot = self.waker.borrow_mut();
            match slot.as_ref() {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }
}

/// Connection tasks waiting for room in a full shard (its transaction pool or ring): one
/// waker slot per connection, taken at start, so waiting allocates nothing. A waiter
/// notes [`RoomNotify::epoch`] before the submission that was refused and then waits for
/// the epoch to move; the batcher moves it when a turn left room for a client record (it
/// sealed, freeing the records' pool slots), and so does anything that aborts waiting
/// requests. Waking every waiter is fine: each retries once, and those that find no room
/// wait again.
pub(crate) struct RoomNotify {
    epoch: Cell<u64>,
    waiters: RefCell<Box<[Option<Waker>]>>,
    /// Slots of `waiters` holding a waker.
    waiting: Cell<usize>,
}

impl RoomNotify {
    fn new(connections: usize) -> Self {
        Self {
            epoch: Cell::new(0),
            waiters: RefCell::new((0..connections).map(|_| None).collect()),
            waiting: Cell::new(0),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// Wakes every waiter.
    pub(crate) fn notify_all(&self) {
        self.epoch.set(self.epoch.get().wrapping_add(1));
        if self.waiting.get() == 0 {
            return;
        }
        self.waiting.set(0);
        for waker in self.waiters.borrow_mut().iter_mut() {
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
    }

    /// Ready once the epoch differs from `seen`. One waker per connection `slot`, replaced
    /// only when it would wake another task: glommio counts a task's wakers in 16 bits.
    pub(crate) fn wait(&self, slot: usize, seen: u64) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            if self.epoch.get() != seen {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            match &waiters[slot] {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                Some(_) => waiters[slot] = Some(cx.waker().clone()),
                None => {
                    waiters[slot] = Some(cx.waker().clone());
                    self.waiting.set(self.waiting.get() + 1);
                }
            }
            Poll::Pending
        })
    }
}

/// Longest a connection whose submission was refused for want of room waits before it
/// tries again without being told of room (µs): room another core makes (a full mesh ring
/// drained there) is never notified here, and the retry also bounds what a missed
/// notification could cost.
pub const ROOM_RECHECK_US: u64 = 1_000;
/// The same wait when the record was refused by another shard's full mesh ring (µs): that
/// room comes from the other core, which drains its ring within a turn or two.
pub const MESH_ROOM_RECHECK_US: u64 = 50;

/// Waits, after a submission of connection `slot` was refused for want of room, until the
/// batcher makes room (the epoch moves past `seen`) or `recheck_us` passes. The batcher is
/// told first: sealing what waits is what frees pool slots.
async fn wait_for_room<S>(shard: &Shard<S>, slot: usize, seen: u64, recheck_us: u64)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    shard.batcher.notify();
    shard.mesh.borrow_mut().ring_doorbells();
    futures_lite::future::or(
        shard.room.wait(slot, seen),
        glommio::timer::sleep(Duration::from_micros(recheck_us)),
    )
    .await;
}

/// One client connection slot: the request being served and its results.
pub(crate) struct ConnectionSlot<R> {
    pub(crate) generation: u16,
    pub(crate) active: bool,
    pub(crate) remaining: u32,
    /// The request's records were dropped before they could commit here (this replica
    /// stopped leading): the client gets an error reply and tries the new leader.
    aborted: bool,
    /// One result per record of the request being served, by record index.
    pub(crate) results: Box<[R]>,
    /// BFT mode: the `(client_id, request_number)` this connection waits to see committed.
    pub(crate) bft_waiting: Option<(u128, u64)>,
}

/// Shard state shared by the tasks of one executor.
pub(crate) struct Shard<S: StateMachine> {
    pub(crate) index: usize,
    pub(crate) shards: usize,
    pub(crate) config: NodeConfig,
    pub(crate) core: RefCell<ShardCore<S>>,
    pub(crate) connections: RefCell<Vec<ConnectionSlot<S::Result>>>,
    /// Wakes a connection when its request's last result arrived (outside the RefCell so
    /// a waiting task never holds a borrow across an await).
    pub(crate) connection_done: Box<[LocalNotify]>,
    pub(crate) mesh: RefCell<MeshEndpoint<S>>,
    pub(crate) batcher: LocalNotify,
    /// Connections waiting for room to submit ([`RoomNotify`]).
    pub(crate) room: RoomNotify,
    /// The task preparing the journal's spare segments (`--segment-spare`) and its spare
    /// ([`spare_preparer_start`]); a state sync replaces both with the new journal's.
    pub(crate) spare_preparer:
        RefCell<Option<(Rc<crate::journal::SegmentSpare>, glommio::Task<()>)>>,
    pub(crate) metrics: Arc<ShardMetrics>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) epoch: Instant,
    /// Gaps between advances of this shard's commit point while work waits
    /// (`percore_commit_gap_us`; only a leader or an unreplicated shard keeps it).
    pub(crate) commit_gap: Cell<CommitGapClock>,
    /// Per shard: nothing to do and nothing queued (read by all shards at shutdown only).
    pub(crate) quiet: Arc<[AtomicBool]>,
    /// The index of a shard that failed to start, or whose thread died of a panic
    /// ([`ShardExitGuard`]; [`SHARD_FAILED_NONE`]: none): stop without waiting for the node
    /// to drain.
    pub(crate) shard_failed: Arc<AtomicUsize>,
    /// Every shard's metrics, for the shutdown quiescence check.
    pub(crate) all_metrics: Arc<[Arc<ShardMetrics>]>,
    /// Set once the node is quiescent: mesh receivers end.
    pub(crate) finished: Cell<bool>,
    /// Log replication of this shard's group, if the node replicates.
    pub(crate) replication: Option<crate::replication::Replication>,
    /// BFT replication of this shard's group, if the node runs `--fault-model bft`.
    pub(crate) bft: Option<crate::bft::Bft>,
    /// The checkpoint follower, if the shard journals with checkpoints.
    pub(crate) checkpoints: RefCell<Option<crate::checkpoint::CheckpointFollower>>,
    /// Builds the state machine of a (re)started checkpoint follower.
    pub(crate) make_follower: MakeFollower<S>,
    /// The node's snapshot write budget and follower cores, for a (re)started checkpoint
    /// follower.
    pub(crate) followers: FollowerShared,
    /// Application-thread ingest shared by the node (this shard drains its own ring).
    pub(crate) ingest: Arc<crate::ingest::Ingress<S>>,
}

/// Installs the checkpoint the shard's follower has written, if one is waiting
/// ([`crate::checkpoint`]): the superblock write and the removals, on this shard's io_uring.
/// First tells the follower how far this shard has applied. `retain_from_op` is the lowest
/// op a peer may still need (`u64::MAX` without peers). A checkpoint that cannot be
/// installed, or a follower that stopped, stops the process, like a journal write that
/// fails. Returns whether it installed one.
pub(crate) async fn checkpoint_install<S: StateMachine>(
    shard: &Shard<S>,
    journal: &mut Journal,
    retain_from_op: u64,
) -> Option<percore_engine::journal::SnapshotMeta> {
    let written = {
        let mut follower = shard.checkpoints.borrow_mut();
        let follower = follower.as_mut()?;
        // Released segments the follower offers go to the journal while it has room; the
        // rest wait in the follower's ring (full, it removes what it releases).
        while journal.recycled_room() {
            let Some(segment) = follower.recycled_pop() else {
                break;
            };
            let taken = journal.recycled_add(segment);
            debug_assert!(taken);
        }
        follower.recycled_taken(journal.recycled_taken());
        ShardMetrics::set(
            &shard.metrics.journal_segment_switches_recycled_total,
            journal.switches_recycled(),
        );
        follower.note_applied(shard.core.borrow().op_last());
        match follower.poll() {
            Ok(Some(written)) => written,
            Ok(None) => return None,
            Err(failure) => panic!(
                "shard {}: checkpoint follower stopped, stopping: {failure}",
                shard.index
            ),
        }
    };
    let op = written.meta.op;
    let started = Instant::now();
    let done = match journal
        .checkpoint_install(&written.meta, written.position_after, retain_from_op)
        .await
    {
        Ok(done) => done,
        Err(error) => panic!(
            "shard {}: checkpoint at op {op} failed, stopping: {error}",
            shard.index
        ),
    };
    let install_us = started.elapsed().as_micros() as u64;
    if let Some(follower) = shard.checkpoints.borrow().as_ref() {
        follower.installed(op, done.segments_below, done.snapshot_stale_op);
    }
    ShardMetrics::add(&shard.metrics.checkpoints_total, 1);
    ShardMetrics::set(&shard.metrics.checkpoint_op, op);
    ShardMetrics::set(&shard.metrics.checkpoint_install_us, install_us);
    tracing::info!(
        shard = shard.index,
        op,
        snapshot_bytes = done.snapshot_bytes,
        capture_us = written.capture_us,
        write_us = written.write_us,
        install_us,
        segments_released = done.segments_released,
        segment_switches_recycled = journal.switches_recycled(),
        op_first = done.op_first,
        "checkpoint"
    );
    Some(written.meta)
}

impl<S: StateMachine> Shard<S> {
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Largest batch body (bytes) this shard seals or accepts.
    pub(crate) fn body_bytes_max(&self) -> usize {
        let record_bytes = size_of::<S::Record>();
        percore_engine::journal::entry_body_bytes_max(
            self.config.batch.entries_cap(record_bytes),
            record_bytes,
        )
    }

    /// The node was asked to stop.
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Work started waiting to commit at `now_us` (a batch was sealed): opens a commit gap
    /// unless one is open.
    pub(crate) fn commit_gap_work_waiting(&self, now_us: u64) {
        let mut clock = self.commit_gap.get();
        clock.work_waiting(now_us);
        self.commit_gap.set(clock);
    }

    /// The commit point advanced (committed ops were applied): records the gap this closes
    /// and opens the next one if work is still waiting. One clock read, no allocation.
    pub(crate) fn commit_gap_advanced(&self) {
        let still_waiting = !self.core.borrow().is_idle();
        let mut clock = self.commit_gap.get();
        if let Some(gap_us) = clock.advanced(self.now_us(), still_waiting) {
            self.metrics.commit_gap.record(gap_us);
        }
        self.commit_gap.set(clock);
    }

    /// This replica does not lead: forgets any open commit gap.
    pub(crate) fn commit_gap_forget(&self) {
        let mut clock = self.commit_gap.get();
        clock.forget();
        self.commit_gap.set(clock);
    }
}

/// Opens the shard's journal, if the node journals: restores the latest checkpoint's
/// snapshot into the core (checking the restored state's digest against the one recorded),
/// then replays every durable batch after it, before the shard serves anyone. A journal
/// written under another `settings_digest` is refused ([`JournalOptions::settings_digest`]).
async fn open_journal<S: StateMachine>(
    (shard, settings_digest): (usize, u64),
    config: &NodeConfig,
    create: JournalCreate,
    core: &mut ShardCore<S>,
    recent: &mut VecDeque<(u64, u128)>,
    replayed: &mut Option<crate::bft_xshard::ReplayedOutputs>,
) -> Result<Option<Journal>, JournalError> {
    let Some(settings) = &config.journal else {
        return Ok(None);
    };
    let record_bytes = size_of::<S::Record>();
    let journal_config = JournalConfig {
        dir: settings.data_dir.join(format!("shard-{shard}")),
        shard: shard as u32,
        cluster_id: settings.cluster_id,
        segment_bytes: settings.segment_bytes,
        body_bytes_max: percore_engine::journal::entry_body_bytes_max(
            config.batch.entries_cap(record_bytes),
            record_bytes,
        ),
        fsync: settings.fsync,
        write_buffer_bytes: JOURNAL_WRITE_BUFFER_BYTES,
    };
    let started = Instant::now();
    let records_max = core.batch_records_max();
    let core = RefCell::new(core);
    // BFT mode keeps the replayed ops' outputs, and the legs in flight at a restored
    // snapshot, to sign them again (`bft_xshard`).
    let replaying = RefCell::new(config.bft.as_ref().map(|settings| {
        crate::bft_xshard::ReplayedOutputs::new(settings.outputs_legs_max, records_max)
    }));
    let mut outbound = Vec::new();
    let (journal, recovered) = Journal::open_checkpointed(
        journal_config,
        JournalOptions {
            // With view change, an op above the recorded commit number may belong to an
            // abandoned view and be truncated: replay stops there, the rest applies once
            // committed (from the journal).
            replay_committed_only: config
                .replication
                .as_ref()
                .is_some_and(|replication| replication.view_change),
            // Peers hold what a replicated journal lost: repair it from them
            // (docs/protocol.md 8). A journal with no peers refuses to open instead.
            repair_from_peers: config.replication.is_some(),
            create: matches!(
                create,
                JournalCreate::FirstStart | JournalCreate::FirstStartReplacing
            ),
            replacing: create == JournalCreate::FirstStartReplacing,
            // What the state machine can apply; entries written or sent under larger batch
            // limits are refused by name.
            records_max,
            settings_digest: Some(settings_digest),
            ..JournalOptions::default()
        },
        |meta, bytes| {
            let mut core = core.borrow_mut();
            core.restore(meta.op, bytes)?;
            if core.state_machine().digest() != meta.digest {
                return Err(RestoreError::DigestMismatch);
            }
            if let Some(replaying) = replaying.borrow_mut().as_mut() {
                replaying.restored(core.state_machine(), meta.op);
            }
            Ok(())
        },
        |entry| {
            let mut core = core.borrow_mut();
            match replaying.borrow_mut().as_mut() {
                Some(replayed) => {
                    let batch = (entry.meta.operation, entry.records(), entry.requests());
                    core.replay_keeping_outbound(entry.meta.op, batch, &mut outbound);
                    replayed.push(core.state_machine(), entry.meta.op, &mut outbound);
                }
                None => core.replay(
                    entry.meta.op,
                    entry.meta.operation,
                    entry.records(),
                    entry.requests(),
                ),
            }
            // The replica core compares its last ops' checksums with its peers'.
            if recent.len() == recent.capacity() {
                recent.pop_front();
            }
            recent.push_back((entry.meta.op, entry.checksum));
        },
    )
    .await?;
    *replayed = replaying.into_inner();
    tracing::info!(
        shard,
        op_last = recovered.op_last,
        checkpoint_op = recovered.checkpoint_op,
        entries = recovered.entries,
        tail = ?recovered.tail,
        recovering = ?recovered.recovering,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "journal recovered"
    );
    Ok(Some(journal))
}

/// Adds the checksums of journal entries recovery did not replay (above the recorded
/// commit number) to `recent`, so the replica core knows its whole log's last ops.
async fn recent_unreplayed(
    journal: &mut Journal,
    recent: &mut VecDeque<(u64, u128)>,
) -> Result<(), JournalError> {
    let head = journal.op_durable();
    let first = journal
        .op_replayed()
        .max(head.saturating_sub(recent.capacity() as u64))
        + 1;
    let mut entry = Vec::new();
    for op in first..=head {
        journal.read_entry(op, &mut entry).await?;
        let header: percore_engine::journal::EntryHeader =
            bytemuck::pod_read_unaligned(&entry[..percore_engine::journal::ENTRY_HEADER_BYTES]);
        if recent.len() == recent.capacity() {
            recent.pop_front();
        }
        recent.push_back((op, header.checksum_header));
    }
    Ok(())
}

/// Reports a start-up failure to `Node::start` (which returns it to the caller) and ends
/// the shard with a marker error, since the error itself has been handed over.
fn start_failed<S>(
    ready: &std::sync::mpsc::Sender<(usize, Result<SocketAddr, NodeError>)>,
    shard: usize,
    error: NodeError,
) -> Result<ShardReport<S>, NodeError> {
    let _ = ready.send((shard, Err(error)));
    Err(NodeError::StartFailed { shard })
}

/// Builds the replication state of `shard` from its recovered journal and binds its peer
/// listener, if the node replicates.
#[allow(clippy::type_complexity)]
fn start_replication(
    shard: usize,
    config: &NodeConfig,
    journal: Option<&Journal>,
    recent: &[(u64, u128)],
    settings_digest: u64,
) -> Result<(Option<crate::replication::Replication>, Option<TcpListener>), NodeError> {
    let (Some(settings), Some(journal)) = (&config.replication, journal) else {
        return Ok((None, None));
    };
    let cluster_id = config.journal.as_ref().map_or(0, |j| j.cluster_id);
    let entry_bytes_max =
        percore_engine::journal::ENTRY_HEADER_BYTES + journal.config().body_bytes_max;
    let replication = crate::replication::Replication::new(
        settings.clone(),
        shard,
        (cluster_id, settings_digest),
        crate::replication::RecoveredLog {
            op: journal.op_durable(),
            checksum: journal.checksum_staged(),
            recent,
            views: {
                let (view, log_view, _) = journal.views();
                percore_engine::replica::Persisted { view, log_view }
            },
            op_replayed: journal.op_replayed(),
            op_promised: journal.op_promised(),
            created: journal.created(),
            replacing: journal.replacing(),
        },
        config.seed ^ shard as u64,
        entry_bytes_max,
    )
    .map_err(|error| NodeError::Replication(error.to_string()))?;
    let listener =
        crate::replication::bind(settings, shard).map_err(|error| NodeError::Listen {
            shard,
            address: settings.peer_address(settings.replica, shard),
            message: error.to_string(),
        })?;
    Ok((Some(replication), Some(listener)))
}

impl NodeConfig {
    /// What a replicated node's data directory must have been formatted for
    /// (`percore format`, [`crate::format`]); `None` for a node without peers or journal (it
    /// creates its journals on demand).
    pub fn format_identity(&self) -> Option<crate::format::Identity> {
        format_identity(self)
    }
}

fn format_identity(config: &NodeConfig) -> Option<crate::format::Identity> {
    let journal = config.journal.as_ref()?;
    let (fault_model, replica, replica_count) = match (&config.replication, &config.bft) {
        (Some(replication), _) => (
            crate::bft::FaultModel::Crash,
            replication.replica,
            replication.peers.len(),
        ),
        (None, Some(bft)) => (crate::bft::FaultModel::Bft, bft.replica, bft.peers.len()),
        (None, None) => return None,
    };
    Some(crate::format::Identity {
        cluster_id: journal.cluster_id,
        fault_model,
        replica,
        replica_count: u8::try_from(replica_count).unwrap_or(u8::MAX),
        shard_count: config.cores.len() as u32,
    })
}

/// Refuses a BFT configuration the runtime cannot run: no journal, crash-fault replication
/// too, or settings the core refuses (`n < 3f + 1`, keys). Several shards are fine: each is
/// its own group, and what one group sends another travels certified (`bft_xshard`).
fn check_bft(config: &NodeConfig, bft: &crate::bft::BftSettings) -> Result<(), NodeError> {
    let refuse = |message: &str| Err(NodeError::Replication(message.into()));
    if config.journal.is_none() {
        return refuse("--fault-model bft needs a journal (--data-dir)");
    }
    if config.replication.is_some() {
        return refuse("--fault-model bft replaces crash-fault replication; not both");
    }
    if usize::from(bft.replica) >= bft.peers.len() {
        return refuse("--replica is not below the number of --peers");
    }
    bft.check()
        .map_err(|source| NodeError::Bft { shard: 0, source })
}

/// Builds the BFT state of `shard` (it opens the certificate journal) and binds its peer
/// listener, if the node runs BFT.
#[allow(clippy::type_complexity)]
async fn start_bft(
    shard: usize,
    config: &NodeConfig,
    journal: Option<&Journal>,
    (record_bytes, normalize): (usize, percore_engine::bft::request::RecordNormalizer),
    groups: (usize, usize),
    settings_digest: u64,
) -> Result<(Option<crate::bft::Bft>, Option<TcpListener>), NodeError> {
    let (Some(settings), Some(journal)) = (&config.bft, journal) else {
        return Ok((None, None));
    };
    let cluster_id = config.journal.as_ref().map_or(0, |j| j.cluster_id);
    let sizes = (config.connections_max, record_bytes);
    let bft = crate::bft::Bft::start(
        settings.clone(),
        shard,
        journal,
        ((cluster_id, settings_digest), sizes),
        groups,
        normalize,
        0,
    )
    .await
    .map_err(|source| NodeError::Bft { shard, source })?;
    let listener = crate::bft::bind(settings, shard).map_err(|error| NodeError::Listen {
        shard,
        address: settings.peer_address(settings.replica, shard),
        message: error.to_string(),
    })?;
    Ok((Some(bft), Some(listener)))
}

/// Builds a checkpoint follower's state machine (on the follower's thread; again after a
/// state sync restarts the follower).
pub(crate) type MakeFollower<S> = Arc<dyn Fn() -> S + Send + Sync>;

/// What a node's checkpoint followers share: one snapshot write budget, and the cores they
/// run on ([`crate::affinity::helper_cores`]).
#[derive(Debug, Clone)]
pub(crate) struct FollowerShared {
    pub(crate) write_budget: Arc<crate::checkpoint::SnapshotWriteBudget>,
    pub(crate) cores: Arc<[usize]>,
}

/// Starts the shard's checkpoint follower if it journals with checkpoints; it writes
/// snapshots within the node's write budget, on the node's follower cores.
pub(crate) fn start_checkpoints<S: StateMachine + 'static>(
    shard: usize,
    config: &NodeConfig,
    journal: Option<&Journal>,
    applied_op: u64,
    metrics: &Arc<ShardMetrics>,
    make: MakeFollower<S>,
    followers: &FollowerShared,
) -> Result<Option<crate::checkpoint::CheckpointFollower>, NodeError> {
    let (Some(journal), Some(settings)) = (journal, config.journal.as_ref()) else {
        return Ok(None);
    };
    if settings.checkpoint_interval_ops == 0 {
        return Ok(None);
    }
    let follower_config = crate::checkpoint::FollowerConfig {
        shard,
        shard_count: config.cores.len(),
        dir: journal.config().dir.clone(),
        cluster_id: settings.cluster_id,
        body_bytes_max: journal.config().body_bytes_max,
        interval_ops: settings.checkpoint_interval_ops,
        write_budget: followers.write_budget.clone(),
        driven: config.bft.is_some(),
        cores: followers.cores.to_vec(),
        recycle_max: crate::journal::segments_recycled_max(journal.config().segment_bytes),
    };
    crate::checkpoint::CheckpointFollower::spawn(
        follower_config,
        *journal.superblock(),
        applied_op,
        metrics.clone(),
        move || make(),
    )
    .map(Some)
    .map_err(|error| NodeError::Journal {
        shard,
        message: format!("checkpoint follower thread: {error}"),
    })
}

async fn run_shard<S>(
    context: ShardContext<S>,
    state_machine: S,
    make_follower: MakeFollower<S>,
    links: MeshLinks<S>,
    ready: std::sync::mpsc::Sender<(usize, Result<SocketAddr, NodeError>)>,
) -> Result<ShardReport<S>, NodeError>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let ShardContext {
        shard,
        shards,
        config,
        metrics,
        stop,
        quiet,
        shard_failed,
        all_metrics,
        ingest,
        followers,
        journal_create,
    } = context;
    let segment_spare = config
        .journal
        .as_ref()
        .is_some_and(|settings| settings.segment_spare);
    let executor_probe_interval_us = config.executor_probe_interval_us;
    let core_config = CoreConfig {
        shard: shard as u32,
        shard_count: shards as u32,
        transactions: config.transactions,
        batches: config.batches,
        tx_ring_capacity: config.tx_ring_capacity,
        batch: config.batch,
    };
    let mut core = match ShardCore::new(core_config, state_machine, metrics.clone()) {
        Ok(core) => core,
        Err(source) => return start_failed(&ready, shard, NodeError::Core { shard, source }),
    };
    // The settings that decide results: recorded in (and checked against) the journal, and
    // compared with every peer's at the handshake.
    let mut settings_digest =
        crate::config::SettingsDigest::of_machine(shards, core.state_machine());
    if config.bft.is_some() {
        settings_digest = settings_digest.with_bft_batch(core.batch_records_max());
    }
    let settings_digest = settings_digest.0;
    let mut recent = VecDeque::with_capacity(RECENT_CHECKSUMS);
    let mut replayed = None;
    let opened = open_journal(
        (shard, settings_digest),
        &config,
        journal_create,
        &mut core,
        &mut recent,
        &mut replayed,
    )
    .await;
    let mut journal = match opened {
        Ok(journal) => journal,
        Err(error) => {
            let message = error.to_string();
            return start_failed(&ready, shard, NodeError::Journal { shard, message });
        }
    };
    if let Some(journal) = journal.as_mut()
        && let Err(error) = recent_unreplayed(journal, &mut recent).await
    {
        let message = error.to_string();
        return start_failed(&ready, shard, NodeError::Journal { shard, message });
    }
    let checkpoints = match start_checkpoints(
        shard,
        &config,
        journal.as_ref(),
        core.op_last(),
        &metrics,
        make_follower.clone(),
        &followers,
    ) {
        Ok(checkpoints) => checkpoints,
        Err(error) => return start_failed(&ready, shard, error),
    };
    let recent: Vec<(u64, u128)> = recent.into_iter().collect();
    // Replicas whose settings that decide results differ refuse each other at the handshake.
    let (replication, peer_listener) =
        match start_replication(shard, &config, journal.as_ref(), &recent, settings_digest) {
            Ok(started) => started,
            Err(error) => return start_failed(&ready, shard, error),
        };
    let records = (size_of::<S::Record>(), crate::bft::unprepare::<S> as _);
    let groups = (shards, core.batch_records_max());
    let (bft, bft_listener) = match start_bft(
        shard,
        &config,
        journal.as_ref(),
        records,
        groups,
        settings_digest,
    )
    .await
    {
        Ok(started) => started,
        Err(error) => return start_failed(&ready, shard, error),
    };
    // Messages to other shards that were produced before a restart but never confirmed are
    // sent again (receivers deduplicate); they wait in the mesh queue until the doorbells
    // are connected. Not in BFT mode: there a message between groups travels only with a
    // certificate, and the replayed ops' outputs are signed again (`bft_xshard`).
    let mut unconfirmed = Vec::new();
    if bft.is_none() {
        core.state_machine()
            .unconfirmed_outbound(&mut |outbound| unconfirmed.push(outbound));
    }
    let port = if config.client_port_base == 0 {
        0
    } else {
        config.client_port_base + shard as u16
    };
    let address = SocketAddr::new(config.listen, port);
    let listener = match TcpListener::bind(address) {
        Ok(listener) => listener,
        Err(err) => {
            let message = err.to_string();
            return start_failed(
                &ready,
                shard,
                NodeError::Listen {
                    shard,
                    address,
                    message,
                },
            );
        }
    };
    let local = listener.local_addr().unwrap_or(address);
    let records_max = config
        .batch
        .entries_max
        .min(config.frame_bytes_max / size_of::<S::Record>());
    let connections = (0..config.connections_max)
        .map(|_| ConnectionSlot {
            generation: 0,
            active: false,
            remaining: 0,
            aborted: false,
            results: bytemuck::allocation::zeroed_slice_box(records_max),
            bft_waiting: None,
        })
        .collect();
    let connections_max = config.connections_max;
    let connection_done = (0..connections_max)
        .map(|_| LocalNotify::default())
        .collect();
    let config_transactions = config.transactions;
    let epoch = Instant::now();
    if bft.is_some() {
        // Committed timestamps must increase across a restart of the leader (its shard
        // clock starts again from 0): stamp from the wall clock.
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
            });
        core.set_clock_offset_ns(unix_ns);
    }
    // The follower takes its memory on its own thread, meanwhile the shard got this far;
    // the shard is not ready before the follower has, so no load meets its page faults.
    if let Some(follower) = checkpoints.as_ref() {
        // Bounded by the follower's start-up: it sets `started` or fails, or its thread ends.
        loop {
            match follower.started() {
                Ok(true) => break,
                Ok(false) => glommio::timer::sleep(Duration::from_millis(1)).await,
                Err(message) => {
                    let message = format!("checkpoint follower: {message}");
                    return start_failed(&ready, shard, NodeError::Journal { shard, message });
                }
            }
        }
    }
    let shard_state = Rc::new(Shard {
        index: shard,
        shards,
        config,
        core: RefCell::new(core),
        connections: RefCell::new(connections),
        connection_done,
        mesh: RefCell::new(MeshEndpoint::from_links(
            links,
            config_transactions,
            metrics.clone(),
        )),
        batcher: LocalNotify::default(),
        room: RoomNotify::new(connections_max),
        spare_preparer: RefCell::new(None),
        metrics,
        stop,
        epoch,
        commit_gap: Cell::new(CommitGapClock::default()),
        quiet,
        shard_failed,
        all_metrics,
        finished: Cell::new(false),
        replication,
        bft,
        checkpoints: RefCell::new(checkpoints),
        make_follower,
        followers,
        ingest,
    });
    if !unconfirmed.is_empty() {
        tracing::info!(
            shard,
            messages = unconfirmed.len(),
            "resending unconfirmed messages"
        );
    }
    for outbound in unconfirmed {
        let (to, message) = MeshMessage::outbound(outbound);
        shard_state.mesh.borrow_mut().send_or_queue(to, message);
    }
    if let Some(replayed) = replayed
        && shard_state.bft.is_some()
    {
        crate::bft_xshard::reproduce(&shard_state, replayed);
    }
    tracing::info!(shard, %local, "shard listening");
    let _ = ready.send((shard, Ok(local)));

    let mesh_tasks = crate::mesh::spawn_receivers(shard_state.clone()).await;
    let mut peer_tasks = match peer_listener {
        Some(listener) => crate::replication::spawn_tasks(&shard_state, listener),
        None => Vec::new(),
    };
    if let Some(listener) = bft_listener {
        peer_tasks.extend(crate::bft::spawn_tasks(&shard_state, listener));
    }
    if let Some(journal) = journal.as_ref().filter(|_| segment_spare) {
        spare_preparer_start(&shard_state, journal);
    }
    let lag_probe = (executor_probe_interval_us > 0).then(|| {
        let shard = shard_state.clone();
        let interval = Duration::from_micros(executor_probe_interval_us);
        glommio::spawn_local(async move {
            executor_lag_probe(&shard.metrics.executor_lag, interval, || {
                shard.finished.get()
            })
            .await;
        })
    });
    let batcher = glommio::spawn_local(batcher_loop(shard_state.clone(), journal));
    let ingest_task = glommio::spawn_local(crate::ingest::drain_loop(shard_state.clone()));
    accept_loop(shard_state.clone(), listener).await;
    ingest_task.await;
    // The follower stops first (it finishes a snapshot file it is writing); a file it
    // wrote that was not installed is removed (open would remove it too).
    let journal = batcher.await;
    spare_preparer_stop(&shard_state).await;
    drop(shard_state.checkpoints.borrow_mut().take());
    if let Some(mut journal) = journal {
        if let Err(err) = journal.remove_stale_snapshots() {
            tracing::warn!(shard, %err, "stale snapshot files not removed at shutdown");
        }
        if let Err(err) = journal.write_superblock().await {
            tracing::warn!(shard, %err, "superblock not written at shutdown");
        }
    }
    shard_state.finished.set(true);
    if let Some(probe) = lag_probe {
        probe.await;
    }
    for task in mesh_tasks {
        task.await;
    }
    for task in peer_tasks {
        task.await;
    }
    let Ok(shard_state) = Rc::try_unwrap(shard_state) else {
        panic!("shard {shard}: tasks still hold the shard after shutdown");
    };
    let core = shard_state.core.into_inner();
    let op_last = core.op_last();
    Ok(ShardReport {
        shard,
        op_last,
        state_machine: core.into_state_machine(),
    })
}

/// Starts the task that prepares `journal`'s spare segments (`--segment-spare`), publishing
/// its counts in the shard's metrics, and keeps it in the shard.
pub(crate) fn spare_preparer_start<S: StateMachine>(shard: &Shard<S>, journal: &Journal) {
    let spare = journal.segment_spare();
    let (task_spare, metrics) = (spare.clone(), shard.metrics.clone());
    let task = glommio::spawn_local(async move {
        task_spare
            .run(|stats| {
                ShardMetrics::set(&metrics.journal_spares_prepared_total, stats.prepared);
                ShardMetrics::set(
                    &metrics.journal_segment_switches_prepared_total,
                    stats.switches_prepared,
                );
                ShardMetrics::set(
                    &metrics.journal_segment_switches_unprepared_total,
                    stats.switches_unprepared,
                );
                ShardMetrics::set(&metrics.journal_spare_failures_total, stats.failures);
            })
            .await;
    });
    let previous = shard.spare_preparer.borrow_mut().replace((spare, task));
    debug_assert!(previous.is_none(), "one spare preparer per shard");
}

/// Stops the shard's spare preparer, if it runs, and waits for it to end. Returns whether
/// one ran.
pub(crate) async fn spare_preparer_stop<S: StateMachine>(shard: &Shard<S>) -> bool {
    let Some((spare, task)) = shard.spare_preparer.borrow_mut().take() else {
        return false;
    };
    spare.stop();
    task.await;
    true
}

/// Until `finished()`, sleeps `interval` at a time and records in `lag` how late each
/// wake-up came: the executor's stalls (a task turn that did not
/// yield, a blocking call, the thread descheduled), measured on the executor itself, as
/// Seastar's stall detector and Node's event-loop lag do. An idle executor shows its
/// wake-up latency (tens of µs).
pub async fn executor_lag_probe(
    lag: &GapHistogram,
    interval: Duration,
    finished: impl Fn() -> bool,
) {
    while !finished() {
        let due = Instant::now() + interval;
        glommio::timer::sleep(interval).await;
        let late = Instant::now().saturating_duration_since(due);
        lag.record(late.as_micros() as u64);
    }
}

/// Accepts client connections until the stop flag is set, then waits for them to finish.
async fn accept_loop<S>(shard: Rc<Shard<S>>, listener: TcpListener)
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let open = Rc::new(Cell::new(0usize));
    // Connections refused as busy, still draining what their client sent.
    let refusing = Rc::new(Cell::new(0usize));
    let closed = Rc::new(LocalNotify::default());
    // An accept is never raced against a timer: dropping an io_uring accept that has
    // completed would lose the connection. A watcher connects to the listener to wake it.
    let local = listener.local_addr().ok();
    let watcher = glommio::spawn_local(wake_listener_on_stop(shard.clone(), local));
    loop {
        let accepted = listener.accept().await;
        if shard.stopping() {
            break;
        }
        let stream = match accepted {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(shard = shard.index, %err, "accept failed");
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        let Some(slot) = claim_connection(&shard) else {
            // In a task of its own: the refusal waits a moment for what the client sent.
            // Counted, so that the shard ends only once it has (it holds the shard).
            refusing.set(refusing.get() + 1);
            let (shard_task, refusing_task, closed_task) =
                (shard.clone(), refusing.clone(), closed.clone());
            glommio::spawn_local(async move {
                refuse_busy(stream, shard_task).await;
                refusing_task.set(refusing_task.get() - 1);
                closed_task.notify();
            })
            .detach();
            continue;
        };
        open.set(open.get() + 1);
        ShardMetrics::set(&shard.metrics.connections, open.get() as u64);
        let (shard_task, open_task, closed_task) = (shard.clone(), open.clone(), closed.clone());
        glommio::spawn_local(async move {
            if let Err(err) = serve_connection(&shard_task, slot, stream).await {
                tracing::debug!(shard = shard_task.index, %err, "connection closed");
            }
            shard_task.connections.borrow_mut()[slot].active = false;
            open_task.set(open_task.get() - 1);
            ShardMetrics::set(&shard_task.metrics.connections, open_task.get() as u64);
            closed_task.notify();
        })
        .detach();
    }
    watcher.await;
    while open.get() > 0 || refusing.get() > 0 {
        closed.wait().await;
    }
    // Everything accepted is in the core now: let the batcher drain it.
    shard.batcher.notify();
}

/// Waits for the stop flag, then connects to the shard's own listener so that its pending
/// accept returns and the accept loop sees the flag.
async fn wake_listener_on_stop<S: StateMachine>(shard: Rc<Shard<S>>, local: Option<SocketAddr>) {
    while !shard.stopping() {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
    if let Some(mut address) = local {
        if address.ip().is_unspecified() {
            address.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let _ = TcpStream::connect(address).await;
    }
}

fn claim_connection<S: StateMachine>(shard: &Shard<S>) -> Option<usize> {
    let mut connections = shard.connections.borrow_mut();
    let slot = connections.iter().position(|c| !c.active)?;
    let connection = &mut connections[slot];
    connection.active = true;
    connection.generation = connection.generation.wrapping_add(1);
    connection.remaining = 0;
    Some(slot)
}

async fn refuse_busy<S: StateMachine>(mut stream: TcpStream, shard: Rc<Shard<S>>) {
    // A short read timeout for the drain: a client that sends its request at once has
    // sent it by then.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(BUSY_DRAIN_MS)));
    error_reply_drained(&shard, &mut stream, None, ERROR_SERVER_BUSY).await;
    ShardMetrics::add(&shard.metrics.frames_rejected_total, 1);
}

/// Longest [`error_reply_drained`] reads what a client sent after its error reply (ms).
const ERROR_DRAIN_MS_MAX: u64 = 100;

/// Writes an error reply (to `envelope`'s request, or to none), then reads and drops what
/// the client already sent (at most a frame, each read bounded by the stream's read
/// timeout, all of them by [`ERROR_DRAIN_MS_MAX`] and the stop), so that closing sends FIN,
/// not an RST that could destroy the error reply in flight.
async fn error_reply_drained<S: StateMachine>(
    shard: &Shard<S>,
    stream: &mut TcpStream,
    envelope: Option<&frame::Envelope>,
    code: u32,
) {
    let none = frame::Envelope {
        client_id: 0,
        request_number: 0,
        operation: frame::OPERATION_PING,
        shard: shard.index as u16,
    };
    let mut buffer = [0u8; FRAME_HEADER_BYTES];
    let bytes = frame::encode_error_reply(&mut buffer, envelope.unwrap_or(&none), code);
    let _ = stream.write_all(&buffer[..bytes]).await;
    let mut discarded = 0;
    let mut sink = [0u8; 4096];
    // A client trickling bytes must not hold the connection (nor the shutdown) for long.
    let deadline = Instant::now() + Duration::from_millis(ERROR_DRAIN_MS_MAX);
    while discarded < shard.config.frame_bytes_max && Instant::now() < deadline && !shard.stopping()
    {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(read) => discarded += read,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("peer closed")]
    Closed,
    #[error("stopping")]
    Stopping,
    #[error("a frame begun did not arrive whole within {CLIENT_FRAME_READ_TIMEOUT_MS} ms")]
    Stalled,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("refused: error code {0}")]
    Refused(u32),
}

/// Reads into `buffer` completely, as part of a client frame begun at `frame_started`
/// (`None`: nothing of the frame read yet; set when its first bytes arrive).
///
/// Ends the connection with `Stopping` once the shard stops, wherever in a frame it is: a
/// request not yet read whole was never admitted, so dropping it loses nothing (its client
/// resends it, under the same request number). Ends it with `Stalled` if a frame begun
/// takes over [`CLIENT_FRAME_READ_TIMEOUT_MS`] to arrive: a client that sends part of a
/// frame and no more would otherwise hold its connection slot, and the shard's shutdown,
/// for ever.
async fn read_full<S: StateMachine>(
    shard: &Shard<S>,
    stream: &mut TcpStream,
    buffer: &mut [u8],
    frame_started: &mut Option<Instant>,
) -> Result<(), ConnectionEnd> {
    if shard.stopping() {
        return Err(ConnectionEnd::Stopping);
    }
    let mut filled = 0;
    while filled < buffer.len() {
        match stream.read(&mut buffer[filled..]).await {
            Ok(0) => return Err(ConnectionEnd::Closed),
            Ok(read) => {
                filled += read;
                frame_started.get_or_insert_with(Instant::now);
            }
            Err(err)
                if err.kind() == std::io::ErrorKind::TimedOut
                    || err.kind() == std::io::ErrorKind::WouldBlock =>
            {
                if shard.stopping() {
                    return Err(ConnectionEnd::Stopping);
                }
                if frame_started.is_some_and(|started| {
                    started.elapsed() > Duration::from_millis(CLIENT_FRAME_READ_TIMEOUT_MS)
                }) {
                    return Err(ConnectionEnd::Stalled);
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

async fn serve_connection<S>(
    shard: &Rc<Shard<S>>,
    slot: usize,
    mut stream: TcpStream,
) -> Result<(), ConnectionEnd>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    stream.set_nodelay(true).map_err(std::io::Error::from)?;
    stream
        .set_read_timeout(Some(Duration::from_millis(STOP_POLL_MS)))
        .map_err(std::io::Error::from)?;
    stream
        .set_write_timeout(Some(Duration::from_millis(CLIENT_WRITE_TIMEOUT_MS)))
        .map_err(std::io::Error::from)?;
    let record_bytes = size_of::<S::Record>();
    let records_max = shard
        .config
        .batch
        .entries_max
        .min(shard.config.frame_bytes_max / record_bytes);
    // The body is read straight into an aligned array of records (no copy before submit);
    // the reply is encoded into its own buffer.
    let mut header_bytes = [0u8; FRAME_HEADER_BYTES];
    // Room for a BFT client's signature after the records, too.
    let trailer_records = frame::SIGNATURE_TRAILER_BYTES.div_ceil(record_bytes);
    let mut records: Vec<S::Record> =
        vec![bytemuck::Zeroable::zeroed(); records_max + trailer_records];
    let reply_bytes_max = FRAME_HEADER_BYTES + records_max * size_of::<S::Result>();
    let mut reply = vec![0u8; reply_bytes_max];
    loop {
        let mut frame_started = None;
        read_full(shard, &mut stream, &mut header_bytes, &mut frame_started).await?;
        // The request arrived with its header: the wait for it is the client's idle time.
        let started = Instant::now();
        let header = match frame::decode_header(
            &header_bytes,
            shard.config.frame_bytes_max,
            &MachineSchema::<S>::default(),
        ) {
            Ok(header) => header,
            Err(err) => {
                return reject(shard, &mut stream, None, err.code() as u32, err.into()).await;
            }
        };
        let envelope = header.envelope;
        let body_bytes = header.body_bytes as usize;
        // Signed requests are BFT mode's (docs/bft.md §12); a BFT replica refuses unsigned
        // ones later with a typed code.
        let signed_allowed = header.kind == Kind::SignedRequest && shard.bft.is_some();
        if header.kind != Kind::Request && !signed_allowed {
            let code = frame::ErrorCode::UnknownKind as u32;
            return reject(
                shard,
                &mut stream,
                Some(&envelope),
                code,
                ConnectionEnd::Refused(code),
            )
            .await;
        }
        if header.records_bytes() > records_max * record_bytes {
            // Only reachable when frame_bytes_max admits more than one batch of records.
            return reject(
                shard,
                &mut stream,
                Some(&envelope),
                ERROR_TOO_MANY_RECORDS,
                ConnectionEnd::Refused(ERROR_TOO_MANY_RECORDS),
            )
            .await;
        }
        let body_buffer: &mut [u8] = bytemuck::cast_slice_mut(&mut records[..]);
        read_full(
            shard,
            &mut stream,
            &mut body_buffer[..body_bytes],
            &mut frame_started,
        )
        .await?;
        match frame::verify_body(&header, &body_buffer[..body_bytes]) {
            Ok(_) => {}
            Err(err) => {
                return reject(
                    shard,
                    &mut stream,
                    Some(&envelope),
                    err.code() as u32,
                    err.into(),
                )
                .await;
            }
        };
        let operation_code = envelope.operation;
        if operation_code == frame::OPERATION_PING {
            let bytes = frame::encode_reply::<u8>(&mut reply, &envelope, &[]);
            stream.write_all(&reply[..bytes]).await?;
            continue;
        }
        // The schema admitted only client operations of `S`; this cannot fail.
        let Some(operation) = S::client_operation(operation_code) else {
            let code = frame::ErrorCode::UnknownOperation as u32;
            let end = ConnectionEnd::Refused(code);
            return reject(shard, &mut stream, Some(&envelope), code, end).await;
        };
        // The schema checked that the records are a whole number of `S::Record`s.
        let count = header.records_bytes() / record_bytes;
        if shard.bft.is_some() {
            let body: &[u8] = bytemuck::cast_slice(&records[..]);
            let signature: Option<[u8; frame::SIGNATURE_TRAILER_BYTES]> =
                (header.kind == Kind::SignedRequest).then(|| {
                    body[header.records_bytes()..body_bytes]
                        .try_into()
                        .expect("the trailer's size")
                });
            let request = (&envelope, operation, &records[..count], signature.as_ref());
            crate::bft::serve_request(shard, slot, &mut stream, request, &mut reply).await?;
            ShardMetrics::add(&shard.metrics.requests_total, 1);
            continue;
        }
        if let Some(code) = replicated_refusal(shard, operation, &records[..count]) {
            let mut buffer = [0u8; FRAME_HEADER_BYTES];
            let bytes = frame::encode_error_reply(&mut buffer, &envelope, code);
            stream.write_all(&buffer[..bytes]).await?;
            continue;
        }
        let generation = {
            let mut connections = shard.connections.borrow_mut();
            connections[slot].remaining = count as u32;
            connections[slot].generation
        };
        let session = (envelope.client_id, envelope.request_number);
        submit_all(
            shard,
            slot,
            generation,
            operation,
            &records[..count],
            session,
        )
        .await;
        // Wait for every record's result, then answer (or for the batcher to give up on
        // them at a stopping leader's drain deadline: `abort_all_waiting`).
        while shard.connections.borrow()[slot].remaining > 0 {
            shard.connection_done[slot].wait().await;
        }
        if std::mem::take(&mut shard.connections.borrow_mut()[slot].aborted) {
            let mut buffer = [0u8; FRAME_HEADER_BYTES];
            let bytes = frame::encode_error_reply(&mut buffer, &envelope, ERROR_NOT_LEADER);
            stream.write_all(&buffer[..bytes]).await?;
            continue;
        }
        // Encode, then write: no borrow of the connection table crosses the write.
        let frame_bytes = {
            let connections = shard.connections.borrow();
            frame::encode_reply(&mut reply, &envelope, &connections[slot].results[..count])
        };
        stream.write_all(&reply[..frame_bytes]).await?;
        shard
            .metrics
            .request_latency
            .record(started.elapsed().as_micros() as u64, 1);
        ShardMetrics::add(&shard.metrics.requests_total, 1);
        ShardMetrics::add(&shard.metrics.tx_accepted_total, count as u64);
    }
}

/// Why a replicated shard refuses a request it cannot order: it does not lead its group,
/// or the request holds records of other groups.
fn replicated_refusal<S: StateMachine>(
    shard: &Shard<S>,
    operation: S::Operation,
    records: &[S::Record],
) -> Option<u32> {
    let replication = shard.replication.as_ref()?;
    if !replication.is_ready_leader() {
        ShardMetrics::add(&shard.metrics.client_not_leader_total, 1);
        return Some(ERROR_NOT_LEADER);
    }
    let shards = shard.shards as u32;
    let foreign = records
        .iter()
        .any(|record| S::route(operation, record, shards) as usize != shard.index);
    foreign.then_some(ERROR_WRONG_SHARD)
}

/// Sends an error reply (when the envelope could be read) and ends the connection.
async fn reject<S: StateMachine>(
    shard: &Shard<S>,
    stream: &mut TcpStream,
    envelope: Option<&frame::Envelope>,
    code: u32,
    end: ConnectionEnd,
) -> Result<(), ConnectionEnd> {
    error_reply_drained(shard, stream, envelope, code).await;
    let _ = stream.close().await;
    ShardMetrics::add(&shard.metrics.frames_rejected_total, 1);
    tracing::debug!(shard = shard.index, code, "frame rejected");
    Err(end)
}

/// Routes each record to its owning shard: into the local core, or over the mesh. Waits
/// (yielding to the batcher and mesh tasks) while the core or a mesh ring is full.
///
/// A request of a client with an id (`session.0 != 0`) whose records all live here and fit
/// one batch goes in whole, with its session descriptor ([`ShardCore::submit_request`]): the
/// session table then applies it once however often it is retried, on whichever replica
/// leads. Other requests go record by record and rely on the state machine's idempotency.
async fn submit_all<S>(
    shard: &Rc<Shard<S>>,
    slot: usize,
    generation: u16,
    operation: S::Operation,
    records: &[S::Record],
    (client_id, request_number): (u128, u64),
) where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let origin = |index: u32| Origin::Local {
        connection: slot as u16,
        generation,
        index,
    };
    let whole = client_id != 0
        && !records.is_empty()
        && records.len() <= shard.core.borrow().request_records_max()
        && records
            .iter()
            .all(|record| S::route(operation, record, shard.shards as u32) as usize == shard.index);
    // A stopping leader whose group no longer commits aborts the waiting requests
    // (`abort_all_waiting`): a request still being submitted then stops.
    let aborted = || shard.connections.borrow()[slot].generation != generation;
    if whole {
        // Bounded by `aborted` or room: every turn waits for one or the other.
        loop {
            let seen = shard.room.epoch();
            let submitted = shard.core.borrow_mut().submit_request(
                operation,
                records,
                origin,
                client_id,
                request_number,
            );
            match submitted {
                Ok(()) => break,
                Err(_) => {
                    ShardMetrics::add(&shard.metrics.pool_exhausted_total, 1);
                    if aborted() {
                        return;
                    }
                    wait_for_room(shard, slot, seen, ROOM_RECHECK_US).await;
                }
            }
        }
        ShardMetrics::add(&shard.metrics.session_requests_total, 1);
        shard.batcher.notify();
        return;
    }
    let operation_code: u16 = operation.into();
    let mut forwarded = 0u64;
    for (index, record) in records.iter().enumerate() {
        let owner = S::route(operation, record, shard.shards as u32) as usize;
        let origin = Origin::Local {
            connection: slot as u16,
            generation,
            index: index as u32,
        };
        // Bounded by `aborted` or room: every turn waits for one or the other.
        loop {
            let seen = shard.room.epoch();
            let accepted = if owner == shard.index {
                match shard.core.borrow_mut().submit(operation, record, origin) {
                    Ok(()) => true,
                    Err(Backpressure::PoolExhausted { .. }) => {
                        ShardMetrics::add(&shard.metrics.pool_exhausted_total, 1);
                        false
                    }
                    Err(Backpressure::RingFull { .. }) => {
                        ShardMetrics::add(&shard.metrics.ring_full_total, 1);
                        false
                    }
                }
            } else {
                let token = Origin::pack_local(slot as u16, generation, index as u32);
                let message = MeshMessage::Forward {
                    operation: operation_code,
                    record: *record,
                    token,
                };
                let sent = shard.mesh.borrow_mut().send(owner, message).is_ok();
                forwarded += u64::from(sent);
                sent
            };
            if accepted {
                break;
            }
            if aborted() {
                ShardMetrics::add(&shard.metrics.tx_forwarded_out_total, forwarded);
                return;
            }
            // Full: let the batcher and the other shards make room, then retry this record.
            let recheck_us = if owner == shard.index {
                ROOM_RECHECK_US
            } else {
                MESH_ROOM_RECHECK_US
            };
            wait_for_room(shard, slot, seen, recheck_us).await;
        }
    }
    ShardMetrics::add(&shard.metrics.tx_forwarded_out_total, forwarded);
    shard.mesh.borrow_mut().ring_doorbells();
    shard.batcher.notify();
}

/// Delivers one result to whoever waits for it.
pub(crate) fn complete<S>(shard: &Shard<S>, origin: Origin, result: &S::Result)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    match origin {
        Origin::Local {
            connection,
            generation,
            index,
        } => {
            complete_local(
                shard,
                connection as usize,
                generation,
                index as usize,
                result,
            );
        }
        Origin::Forwarded {
            shard: origin_shard,
            token,
        } => {
            let message = MeshMessage::Result {
                token,
                result: *result,
            };
            shard
                .mesh
                .borrow_mut()
                .send_or_queue(origin_shard as usize, message);
        }
        Origin::Ingress { slot, generation } => shard.ingest.complete(slot, generation, result),
        Origin::Internal => {}
    }
}

/// Ends a local connection's request without results: its records were dropped here (this
/// replica stopped leading, or their op was truncated). The client is told `NOT_LEADER`.
/// Ends connection `slot`'s wait for its request's results and wakes it: answered as
/// aborted (not committed here), and results that arrive later dropped (the slot's
/// generation moves on).
fn abort_waiting<S: StateMachine>(shard: &Shard<S>, slot: usize) {
    {
        let mut connections = shard.connections.borrow_mut();
        let connection = &mut connections[slot];
        if connection.remaining == 0 {
            return;
        }
        connection.aborted = true;
        connection.remaining = 0;
        connection.generation = connection.generation.wrapping_add(1);
    }
    shard.connection_done[slot].notify();
    // If the connection is still submitting its request, it sees the abort when it looks
    // again, not only after its next recheck.
    shard.room.notify_all();
}

/// [`abort_waiting`] for every connection waiting for results.
fn abort_all_waiting<S: StateMachine>(shard: &Shard<S>) {
    for slot in 0..shard.connection_done.len() {
        abort_waiting(shard, slot);
    }
}

pub(crate) fn abort_local<S: StateMachine>(shard: &Shard<S>, origin: Origin) {
    if let Origin::Ingress { slot, generation } = origin {
        shard.ingest.abort(slot, generation);
        return;
    }
    let Origin::Local {
        connection,
        generation,
        ..
    } = origin
    else {
        return;
    };
    let connection = connection as usize;
    {
        let connections = shard.connections.borrow();
        let slot = &connections[connection];
        if !slot.active || slot.generation != generation || slot.remaining == 0 {
            return;
        }
    }
    // Results of this request's other records that commit later must not land in the
    // connection's next request (the generation moves on).
    abort_waiting(shard, connection);
}

/// Writes a result into a local connection's reply and wakes it when the request is done.
pub(crate) fn complete_local<S: StateMachine>(
    shard: &Shard<S>,
    connection: usize,
    generation: u16,
    index: usize,
    result: &S::Result,
) {
    let mut connections = shard.connections.borrow_mut();
    let slot = &mut connections[connection];
    if !slot.active || slot.generation != generation || slot.remaining == 0 {
        // The connection went away; its results have no reader.
        return;
    }
    slot.results[index] = *result;
    slot.remaining -= 1;
    if slot.remaining == 0 {
        drop(connections);
        shard.connection_done[connection].notify();
    }
}

/// Seals and applies batches, forwards state-machine messages, and drains on shutdown.
async fn batcher_loop<S>(shard: Rc<Shard<S>>, mut journal: Option<Journal>) -> Option<Journal>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    loop {
        let progressed = batcher_turn(&shard, journal.as_mut()).await;
        if shard.room.waiting.get() > 0 && shard.core.borrow_mut().client_room() > 0 {
            shard.room.notify_all();
        }
        if progressed {
            glommio::yield_if_needed().await;
            continue;
        }
        let (idle, deadline) = {
            let core = shard.core.borrow();
            (
                core.is_idle() && shard.mesh.borrow().is_idle(),
                core.seal_deadline_us(),
            )
        };
        if shard.stopping() {
            // A replicated leader waits for its pipeline to commit, but not forever: its
            // followers may be gone. Uncommitted ops stay in its journal.
            // A BFT replica owes nothing at shutdown: what it has not committed, the other
            // replicas answer (clients ask every replica).
            let expired = shard.replication.is_some() && crate::replication::drain_expired(&shard);
            if expired {
                // With its followers gone nothing commits: the requests still waiting are
                // answered as not committed here (they may yet commit in the group, and a
                // retry finds its reply in the session). Their connections, and so the
                // shutdown, waited for ever; so did embedders' tickets. Records not sealed
                // are dropped (freeing their pool slots for a connection still submitting,
                // which then sees its request aborted); sealed ones stay in the journal.
                abort_all_waiting(&shard);
                let mut core = shard.core.borrow_mut();
                core.abort_unsealed(|origin| abort_local(&shard, origin));
                core.abort_sealed_origins(|origin| abort_local(&shard, origin));
            }
            let idle = idle || shard.bft.is_some() || expired;
            let drained = idle
                && shard.ingest.is_retired(shard.index)
                && shard.connections.borrow().iter().all(|c| !c.active);
            shard.quiet[shard.index].store(drained, Ordering::Release);
            if drained && node_quiescent(&shard) {
                return journal;
            }
            if drained {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        }
        let wait_us = match deadline {
            Some(deadline_us) => deadline_us.saturating_sub(shard.now_us()).max(1),
            None => STOP_POLL_MS * 1_000,
        };
        futures_lite::future::or(
            shard.batcher.wait(),
            glommio::timer::sleep(Duration::from_micros(wait_us)),
        )
        .await;
    }
}

/// Whether every shard is drained and no mesh message is in flight: all quiet flags set and
/// the node-wide sent and received counts equal, twice in a row with the same values.
fn node_quiescent<S: StateMachine>(shard: &Shard<S>) -> bool {
    if shard.shard_failed.load(Ordering::Acquire) != SHARD_FAILED_NONE {
        return true;
    }
    let count = || {
        let quiet = shard.quiet.iter().all(|q| q.load(Ordering::Acquire));
        let received: u64 = shard
            .all_metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.mesh_messages_received_total))
            .sum();
        let sent: u64 = shard
            .all_metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.mesh_messages_sent_total))
            .sum();
        (quiet, sent, received)
    };
    let first = count();
    let second = count();
    first.0 && first.1 == first.2 && first == second
}

/// Checksums of the last ops recovered that the replica core keeps (twice its pipeline).
const RECENT_CHECKSUMS: usize = 2 * percore_engine::replica::PIPELINE_PREPARES_MAX_DEFAULT as usize;

/// Staging buffer of each shard's journal: one group commit writes at most this much at once,
/// so one entry (one batch) must fit.
pub const JOURNAL_WRITE_BUFFER_BYTES: usize = 512 * 1024;

/// Largest number of batches sealed, journaled together and applied in one turn.
const GROUP_COMMIT_BATCHES_MAX: usize = 64;

/// One turn: retry queued mesh messages; seal what the controller allows; make the sealed
/// batches durable with one group commit (when journaling); apply them and answer; forward
/// the state machine's messages to other shards.
async fn batcher_turn<S>(shard: &Shard<S>, journal: Option<&mut Journal>) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    // Sealing never waits for this shard's outbound mesh queue to drain: sealing frees the
    // transaction slots that other shards' messages to this one need, so holding it back
    // made two shards wait on each other (throughput fell 8x with 30% cross-shard load).
    // The queue stays bounded without it: credit legs by `credit_legs_max` in flight,
    // acknowledgements by legs received, results by records forwarded.
    if shard.replication.is_some() {
        let journal = journal.expect("a replicated shard journals");
        return crate::replication::replicated_turn(shard, journal).await;
    }
    if shard.bft.is_some() {
        let journal = journal.expect("a BFT shard journals");
        return crate::bft::bft_turn(shard, journal).await;
    }
    let mut progressed = shard.mesh.borrow_mut().flush_queued();
    let now_us = shard.now_us();
    shard.core.borrow_mut().observe_depth();
    let mut sealed = 0;
    while sealed < GROUP_COMMIT_BATCHES_MAX {
        let Some(batch) = shard.core.borrow_mut().poll_seal(now_us) else {
            break;
        };
        tracing::debug!(shard = shard.index, op = batch.op, entries = batch.entries, reason = ?batch.reason, "sealed");
        sealed += 1;
    }
    let mut journal = journal;
    if sealed == 0 {
        if let Some(journal) = journal.as_deref_mut() {
            progressed |= checkpoint_install(shard, journal, u64::MAX).await.is_some();
        }
        shard.mesh.borrow_mut().ring_doorbells();
        return progressed;
    }
    progressed = true;
    shard.commit_gap_work_waiting(now_us);
    if let Some(journal) = journal.as_deref_mut() {
        let span = tracing::debug_span!("journal_commit", shard = shard.index, batches = sealed);
        journal_commit(shard, journal, sealed)
            .instrument(span)
            .await;
    }
    for _ in 0..sealed {
        apply_one(shard);
    }
    // One advance per group commit: its ops became durable together.
    shard.commit_gap_advanced();
    if let Some(journal) = journal {
        // No peers: nothing beyond the retained checkpoints needs keeping.
        checkpoint_install(shard, journal, u64::MAX).await;
    }
    shard.core.borrow().publish_pool_metrics();
    shard.mesh.borrow_mut().ring_doorbells();
    progressed
}

/// Applies the oldest sealed batch, answers its records and forwards what it produced.
fn apply_one<S>(shard: &Shard<S>)
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let _apply = tracing::debug_span!("apply", shard = shard.index).entered();
    let mut core = shard.core.borrow_mut();
    apply_next_timed(shard, &mut core).expect("a sealed batch is waiting");
    while let Some(outbound) = core.poll_outbound() {
        send_outbound(shard, outbound);
    }
}

/// [`ShardCore::apply_next`], answering each record's origin, timed into
/// `percore_apply_seconds`. Returns the op applied, if a batch was waiting.
pub(crate) fn apply_next_timed<S>(shard: &Shard<S>, core: &mut ShardCore<S>) -> Option<u64>
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let started = Instant::now();
    let op = core.apply_next(|origin, result| complete(shard, origin, result))?;
    shard
        .metrics
        .apply_latency
        .record(started.elapsed().as_micros() as u64, 1);
    Some(op)
}

/// Sends a message the state machine produced to its shard over the ring mesh (queued
/// while that ring is full).
pub(crate) fn send_outbound<S>(
    shard: &Shard<S>,
    outbound: percore_engine::state_machine::Outbound<S::Operation, S::Record>,
) where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let (to, message) = MeshMessage::outbound(outbound);
    shard.mesh.borrow_mut().send_or_queue(to, message);
    ShardMetrics::add(&shard.metrics.credit_legs_out_total, 1);
}

/// Stages the `sealed` oldest sealed batches and commits them: one write and one
/// `fdatasync` per group (more only when the staging buffer or a segment fills).
/// A journal that cannot write stops the process: an engine that cannot make data durable
/// must not answer clients as if it had.
async fn journal_commit<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal, sealed: usize) {
    let started = Instant::now();
    let record_bytes = size_of::<S::Record>();
    for index in 0..sealed {
        let body_bytes = {
            let core = shard.core.borrow();
            let batch = core.sealed_batch(index).expect("sealed this turn");
            batch.records.len() + batch.requests.len()
        };
        if journal.staged_bytes() + entry_bytes_padded(body_bytes) > JOURNAL_WRITE_BUFFER_BYTES {
            // Staging buffer full: commit what is staged first.
            if let Err(err) = journal.commit().await {
                panic!(
                    "shard {}: journal write failed, stopping: {err}",
                    shard.index
                );
            }
        }
        let core = shard.core.borrow();
        let batch = core.sealed_batch(index).expect("sealed this turn");
        let meta = crate::replication::entry_meta(shard.index, 0, &batch, record_bytes);
        if let Err(err) = journal.stage_parts(meta, batch.records, batch.requests) {
            panic!("shard {}: journal refused a batch: {err}", shard.index);
        }
    }
    if let Err(err) = journal.commit().await {
        panic!(
            "shard {}: journal write failed, stopping: {err}",
            shard.index
        );
    }
    shard
        .metrics
        .journal_commit_latency
        .record(started.elapsed().as_micros() as u64, 1);
    ShardMetrics::add(&shard.metrics.journal_commits_total, 1);
}
