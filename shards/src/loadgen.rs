//! The end-to-end load generator behind `percore bench`.
//!
//! With one replica it starts a node in-process (one pinned executor per core, real io_uring
//! sockets on loopback). With more it starts a [`LocalCluster`] of `percore node` child
//! processes and sends every shard's records to that shard's group leader, following the
//! group to its new leader after a view change ([`LoadTarget`]). Either way it
//! creates accounts on every shard through the client protocol, funds them, then drives
//! transfers from client threads that each keep a window of requests in flight on their own
//! connection to one shard: as many as they can (closed loop, the default) or, with a rate
//! ([`Offered`]), on a fixed schedule ([`crate::pacing`]), latency counted from each
//! request's intended send time. It reports per-core committed TPS measured from the shards' own
//! applied counters over the measurement window (in a cluster: the leaders', scraped from
//! their metrics endpoints), client-observed request latency percentiles (HdrHistogram), the
//! batch sizes the adaptive batcher chose and, in a cluster, the leaders' commit latency
//! (bucket resolution) and the bytes replicated. It never leaves a child process behind.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use percore_engine::frame;
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_engine::record::{
    Account, CreateAccountResult, CreateTransferResult, RecordResult, Transfer, account_flags,
    shard_of,
};
use percore_net::client::{
    Client, ClientConfig, ClientError, LeaderProbe, Pipeline, PipelineReceiver, PipelineSender,
};
use serde::Serialize;

use crate::cluster::{self, ClusterError, LocalCluster, LocalClusterConfig};
use crate::metrics::{LATENCY_BUCKETS_US, ShardMetrics};
use crate::pacing::{self, PaceSchedule};
use crate::runtime::{Node, NodeConfig, NodeError};
use crate::soak::{self, SoakReport};

/// [`BenchReport::pacing`] of a closed loop.
pub const PACING_CLOSED: &str = "closed loop: every connection keeps its window full";
/// [`BenchReport::pacing`] of an open loop.
pub const PACING_OPEN: &str =
    "open loop: requests on a fixed schedule, latency from each one's intended send time";

/// Ledger id every benchmark account and transfer uses.
const LEDGER_ID: u32 = 1;
/// Account id space: shard-owned ids are searched from here upwards.
const ACCOUNT_ID_BASE: u128 = 1 << 64;
/// Buckets of the fixed histograms the shards export (the last is the overflow bucket).
const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;
/// How the committed TPS is measured, as the report states it.
const COMMITTED_SOURCE_NODE: &str = "shard percore_tx_applied_total delta over the window";
/// See [`COMMITTED_SOURCE_NODE`].
const COMMITTED_SOURCE_CLUSTER: &str = "percore_tx_applied_total delta over the window, summed over \
     each group's replicas (only the leader that sealed a batch counts it; scraped metrics)";
/// See [`COMMITTED_SOURCE_NODE`].
const COMMITTED_SOURCE_ACKNOWLEDGED: &str =
    "client acknowledgements per shard over the window (no --metrics-addresses)";

/// How much load the client threads offer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offered {
    /// Closed loop: every connection keeps its window of requests in flight, so the shards
    /// take as much as they can (the default).
    Full,
    /// Open loop: this many transfers per second in all, split evenly over the connections,
    /// each sending on a fixed schedule ([`crate::pacing`]); the window still bounds the
    /// requests in flight.
    Rate {
        /// Transfers per second offered, all connections together.
        tx_per_s: f64,
    },
    /// Measure the peak first, with a closed loop for `peak_duration` after the warm-up,
    /// then offer `fraction` of it open loop (after a second warm-up) during the window.
    PeakFraction {
        /// Share of the measured peak offered (0 < fraction ≤ 1).
        fraction: f64,
        /// Length of the full-load run that measures the peak.
        peak_duration: Duration,
    },
}

/// What `percore bench` runs on a single in-process node.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Node configuration (cores, batch limits, pools...).
    pub node: NodeConfig,
    /// Ledger sizes of every shard (`shard_index` is set per shard).
    pub ledger: LedgerConfig,
    /// Client sessions per shard (the node runs `Sessioned<Ledger>`, as `percore node`).
    pub session_clients_max: usize,
    /// Accounts created per shard.
    pub accounts_per_shard: usize,
    /// Warm-up before measuring.
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
    /// Transfers per request frame.
    pub records_per_request: usize,
    /// Requests in flight per connection.
    pub window: usize,
    /// Client connections (threads) per shard.
    pub connections_per_shard: usize,
    /// Percentage of transfers whose credit account lives on another shard.
    pub cross_shard_percent: u32,
    /// How much load the clients offer.
    pub offered: Offered,
    /// Print a progress line every second.
    pub progress: bool,
    /// The fsync policy in effect, as the report states it.
    pub fsync: &'static str,
}

impl BenchConfig {
    /// The load part of this configuration.
    pub fn load(&self) -> LoadConfig {
        LoadConfig {
            accounts_per_shard: self.accounts_per_shard,
            warmup: self.warmup,
            duration: self.duration,
            records_per_request: self.records_per_request,
            window: self.window,
            connections_per_shard: self.connections_per_shard,
            cross_shard_percent: self.cross_shard_percent,
            offered: self.offered,
            progress: self.progress,
            fsync: self.fsync,
        }
    }
}

/// The offered load and how it is measured, whatever runs the shards.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    /// Accounts created per shard.
    pub accounts_per_shard: usize,
    /// Warm-up before measuring.
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
    /// Transfers per request frame.
    pub records_per_request: usize,
    /// Requests in flight per connection.
    pub window: usize,
    /// Client connections (threads) per shard.
    pub connections_per_shard: usize,
    /// Percentage of transfers whose credit account lives on another shard.
    pub cross_shard_percent: u32,
    /// How much load the clients offer.
    pub offered: Offered,
    /// Print a progress line every second.
    pub progress: bool,
    /// The fsync policy in effect, as the report states it.
    pub fsync: &'static str,
}

/// What `percore bench --replicas N` (N > 1) runs: a local cluster of child processes.
#[derive(Debug, Clone)]
pub struct ClusterBenchConfig {
    /// The cluster (its `metrics` must be on: the report is read from them).
    pub cluster: LocalClusterConfig,
    /// The load.
    pub load: LoadConfig,
    /// Sample a per-second series (TPS, latency, RSS, pool high-water marks) and the
    /// longest commit gap ([`crate::soak`]) instead of only measuring the window as a whole.
    pub series: bool,
}

/// What `percore bench --addresses` runs: load on a cluster that is already running.
#[derive(Debug, Clone)]
pub struct RemoteBenchConfig {
    /// Per shard, in shard order, the client address of its group leader.
    pub leaders: Vec<SocketAddr>,
    /// Metrics address of every node; empty: committed TPS is read from acknowledgements.
    pub metrics: Vec<SocketAddr>,
    /// The load.
    pub load: LoadConfig,
}

/// Per-shard results.
#[derive(Debug, Clone, Serialize)]
pub struct ShardRow {
    /// Shard index (= replication group).
    pub shard: usize,
    /// CPU core the shard ran on (on every replica); `None` when a remote cluster's
    /// metrics were not read.
    pub core: Option<usize>,
    /// Replica leading the shard's group (0 on a single node).
    pub leader_replica: usize,
    /// Client transfers applied by this shard (its leader) during the window, per second
    /// (credit legs and acknowledgements between shards are not counted).
    pub committed_tx_per_s: f64,
    /// Transfers the clients of this shard saw acknowledged during the window, per second.
    pub acknowledged_tx_per_s: f64,
    /// Batches sealed during the window.
    pub batches: u64,
    /// Mean entries per batch during the window.
    pub mean_batch_entries: f64,
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Always "percore-bench".
    pub benchmark: &'static str,
    /// Replicas per replication group (1: a single in-process node; 0: unknown, a remote
    /// cluster whose metrics were not read).
    pub replicas: usize,
    /// Journal fsync policy in effect.
    pub fsync: &'static str,
    /// Shards (cores).
    pub shards: usize,
    /// Seconds measured.
    pub duration_s: f64,
    /// Transfers applied per second, all shards (the achieved rate).
    pub total_committed_tx_per_s: f64,
    /// How the load was offered: [`PACING_CLOSED`] or [`PACING_OPEN`].
    pub pacing: &'static str,
    /// Open loop: transfers per second offered during the window, all connections
    /// together; `None` in a closed loop.
    pub offered_tx_per_s: Option<f64>,
    /// With a share of the peak (`--load`): the committed tx/s the full-load run measured
    /// before the window.
    pub peak_tx_per_s: Option<f64>,
    /// With `--load`: the share of that peak offered.
    pub load_fraction: Option<f64>,
    /// Where the committed TPS comes from.
    pub committed_source: &'static str,
    /// Per-shard rows.
    pub per_shard: Vec<ShardRow>,
    /// Transfers acknowledged to clients during the window.
    pub acknowledged: u64,
    /// Acknowledged transfers whose result was not `Ok`.
    pub failed: u64,
    /// Times a client connection found its group led by another replica (a view change)
    /// and moved there, sending its unanswered requests again (the whole load, warm-up
    /// included). Their latency counts from when they were first due.
    pub leader_follows: u64,
    /// Client-observed request latency percentiles (µs): p50, p99, p999, max. Closed loop:
    /// the requests answered during the window, from when each was sent. Open loop: the
    /// requests due during the window, from when each was due, answered in it or after it
    /// (the load drains what is in flight), and those never sent
    /// ([`Self::requests_unsent_at_end`]).
    pub request_latency_us: LatencyRow,
    /// Requests in [`Self::request_latency_us`].
    pub requests_measured: u64,
    /// Open loop: requests due during the window that their connection had not sent when
    /// the window ended (its window of requests in flight was full: the cluster was behind
    /// the offered rate). Each counts in [`Self::request_latency_us`] as answered at the
    /// window's end, a lower bound, so an overloaded run's tail is never shorter than its
    /// backlog. `None` in a closed loop.
    pub requests_unsent_at_end: Option<u64>,
    /// Leader commit latency (stage to quorum commit) over the window, all groups, at the
    /// resolution of the exported histogram buckets; `None` on a single node.
    pub commit_latency_us: Option<BucketLatencyRow>,
    /// Bytes of peer messages every replica sent during the window (0 on a single node).
    pub bytes_replicated: u64,
    /// Sizes of the batches sealed during the window.
    pub batch_sizes: Vec<BatchSizeBucket>,
    /// Transfers per request.
    pub records_per_request: usize,
    /// Requests in flight per connection.
    pub window: usize,
    /// Connections per shard.
    pub connections_per_shard: usize,
    /// Cross-shard transfer percentage.
    pub cross_shard_percent: u32,
    /// Machine description.
    pub machine: String,
    /// The per-second series and its summary (`--series`, local cluster only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakReport>,
}

/// Batches whose entry count fell in one histogram bucket.
#[derive(Debug, Clone, Serialize)]
pub struct BatchSizeBucket {
    /// Upper bound of the bucket (entries); `None` for the overflow bucket.
    pub entries_at_most: Option<u64>,
    /// Batches sealed in the window with that many entries.
    pub batches: u64,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LatencyRow {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

/// Percentiles read from a fixed-bucket histogram: each is the upper bound (µs) of the
/// bucket holding that quantile, `None` when it fell in the overflow bucket (above the
/// last bound, [`LATENCY_BUCKETS_US`]).
#[derive(Debug, Clone, Serialize)]
pub struct BucketLatencyRow {
    /// Median, at most this many µs.
    pub p50_at_most: Option<u64>,
    /// 99th percentile, at most this many µs.
    pub p99_at_most: Option<u64>,
    /// 99.9th percentile, at most this many µs.
    pub p999_at_most: Option<u64>,
    /// Observations in the window (ops committed, one per op).
    pub samples: u64,
}

/// Benchmark failures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The local cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A client failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Setup went wrong (accounts not created...).
    #[error("setup: {0}")]
    Setup(String),
    /// A connection's replica stopped leading its group during the run (a view change: the
    /// nodes' default is leader failover) and the load knows no other replica of the group
    /// to follow it to (`--addresses` names each group's leader only).
    #[error(
        "the load's leader stopped leading during the run (a view change) and no other \
         replica of its group is known: {source}; rerun, or start the nodes with \
         --fixed-view to keep every group's first leader"
    )]
    LeaderChanged {
        /// The refusal or lost connection the load thread saw.
        source: ClientError,
    },
}

impl BenchError {
    /// A load thread's error: a refusal saying the replica no longer leads becomes
    /// [`BenchError::LeaderChanged`].
    fn from_load(error: ClientError) -> Self {
        match error {
            ClientError::Refused {
                code: percore_net::client::ERROR_NOT_LEADER,
                ..
            } => BenchError::LeaderChanged { source: error },
            error => BenchError::Client(error),
        }
    }
}

/// Ledger sizes for every shard of a node of `shard_count` shards (`shard_index` 0; the
/// node sets each shard's own).
pub fn ledger_config(
    shard_count: usize,
    accounts_max: usize,
    transfers_max: usize,
    credit_legs_max: usize,
    batch_entries_max: usize,
) -> LedgerConfig {
    LedgerConfig {
        shard_index: 0,
        shard_count: shard_count as u32,
        accounts_max,
        transfers_max,
        credit_legs_in_flight_max: credit_legs_max,
        batch_entries_max,
    }
}

/// Ids of `count` accounts owned by `shard` of `shards`, deterministic.
pub fn accounts_of_shard(shard: usize, shards: usize, count: usize) -> Vec<u128> {
    let mut ids = Vec::with_capacity(count);
    let mut id = ACCOUNT_ID_BASE;
    while ids.len() < count {
        if shard_of(id, shards as u32) as usize == shard {
            ids.push(id);
        }
        id += 1;
    }
    ids
}

/// A transfer of `amount` from `debit` to `credit`.
pub fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: LEDGER_ID,
        code: 1,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// An account on the benchmark ledger.
pub fn account(id: u128, flags: u16) -> Account {
    Account {
        id,
        ledger: LEDGER_ID,
        code: 1,
        flags,
        ..bytemuck::Zeroable::zeroed()
    }
}

/// The shard a ledger record belongs to (the debit account's shard for transfers).
pub fn route_transfer(transfer: &Transfer, shards: usize) -> usize {
    shard_of(transfer.debit_account_id, shards as u32) as usize
}

/// Whether a create result means the record now exists as sent: `Ok`, or `Exists` (the same
/// code, 1, for accounts and transfers), which a request gets when the client resent it
/// after losing the connection and the first attempt had been applied.
fn created(code: u32) -> bool {
    code == CreateAccountResult::Ok as u32
        || code == CreateAccountResult::Exists as u32
        || code == CreateTransferResult::Exists as u32
}

/// Creates `per_shard` accounts on every shard plus one mint per shard (first in each list,
/// allowed to go negative), and funds every account with `funding` from its shard's mint.
/// Returns each shard's ids, mint first. Used by the benchmark and by the tests.
pub fn create_funded_accounts(
    client: &mut Client,
    per_shard: usize,
    funding: u128,
) -> Result<Vec<Vec<u128>>, BenchError> {
    let shards = client.shards();
    let mut owned = Vec::with_capacity(shards);
    for shard in 0..shards {
        let ids = accounts_of_shard(shard, shards, per_shard + 1);
        for (k, chunk) in ids.chunks(1000).enumerate() {
            let accounts: Vec<Account> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let mint = k == 0 && i == 0;
                    account(
                        *id,
                        if mint {
                            account_flags::ALLOW_NEGATIVE
                        } else {
                            0
                        },
                    )
                })
                .collect();
            let results: Vec<RecordResult> = client.submit(
                frame::Operation::CreateAccounts.into(),
                &accounts,
                |a: &Account| shard_of(a.id, shards as u32) as usize,
            )?;
            if let Some(bad) = results.iter().find(|r| !created(r.code)) {
                return Err(BenchError::Setup(format!("create account failed: {bad:?}")));
            }
        }
        let mint = ids[0];
        for (k, chunk) in ids[1..].chunks(1000).enumerate() {
            let transfers: Vec<Transfer> = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let transfer_id = (1 << 120) | ((shard as u128) << 64) | (k * 1000 + i) as u128;
                    transfer(transfer_id, mint, *id, funding)
                })
                .collect();
            let results: Vec<RecordResult> = client.submit(
                frame::Operation::CreateTransfers.into(),
                &transfers,
                |t: &Transfer| route_transfer(t, shards),
            )?;
            if let Some(bad) = results.iter().find(|r| !created(r.code)) {
                return Err(BenchError::Setup(format!(
                    "funding transfer failed: {bad:?}"
                )));
            }
        }
        owned.push(ids);
    }
    Ok(owned)
}

fn setup_accounts(
    client_config: ClientConfig,
    per_shard: usize,
) -> Result<Vec<Vec<u128>>, BenchError> {
    let mut client = Client::new(client_config);
    client.ping_all(Instant::now() + Duration::from_secs(10))?;
    let owned = create_funded_accounts(&mut client, per_shard, 1 << 40)?;
    Ok(owned.into_iter().map(|ids| ids[1..].to_vec()).collect())
}

struct LoadThreadReport {
    shard: usize,
    acknowledged: u64,
    failed: u64,
    latency: Histogram<u64>,
    /// Open loop: requests due in the window and not yet sent when it ended
    /// ([`censor_unsent`]).
    unsent_at_end: u64,
}

/// Builds one client thread's requests: random transfers from its shard's accounts.
struct RequestMaker {
    shard: usize,
    accounts: Arc<Vec<Vec<u128>>>,
    cross_shard_percent: u32,
    rng: u64,
    transfer_id: u128,
    records_per_request: usize,
}

impl RequestMaker {
    fn new(
        thread: usize,
        shard: usize,
        accounts: Arc<Vec<Vec<u128>>>,
        config: &LoadConfig,
        transfer_id_base: u128,
    ) -> Self {
        Self {
            shard,
            accounts,
            cross_shard_percent: config.cross_shard_percent,
            rng: (thread as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            transfer_id: transfer_id_base | ((thread as u128 + 1) << 96) | (1 << 127),
            records_per_request: config.records_per_request,
        }
    }

    /// xorshift64.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Fills `records` with the next request's transfers (fresh ids).
    fn next_request(&mut self, records: &mut [Transfer]) {
        let shards = self.accounts.len();
        let shard = self.shard;
        for record in records.iter_mut() {
            let r = self.next_random();
            let local = &self.accounts[shard];
            let debit = local[(r as usize) % local.len()];
            let cross = shards > 1 && ((r >> 32) % 100) < u64::from(self.cross_shard_percent);
            let credit_shard = if cross {
                (shard + 1 + (r >> 40) as usize % (shards - 1)) % shards
            } else {
                shard
            };
            let pool = &self.accounts[credit_shard];
            let mut credit = pool[((r >> 20) as usize) % pool.len()];
            if credit == debit {
                credit = pool[(((r >> 20) as usize) + 1) % pool.len()];
            }
            self.transfer_id += 1;
            *record = transfer(self.transfer_id, debit, credit, 1);
        }
    }
}

/// What one client thread's replies said, counted while the window is measured.
struct ReplyTally {
    shard: usize,
    /// Replies count towards throughput while this is set (the window).
    measuring: Arc<AtomicBool>,
    /// Open loop: a reply's latency counts when its request was due in this window, even if
    /// it comes after the window ended; closed loop (`None`): when `measuring`.
    due_window: Option<Arc<MeasuredWindow>>,
    acknowledged_live: Arc<AtomicU64>,
    interval_latency: Arc<Mutex<Histogram<u64>>>,
    latency: Histogram<u64>,
    acknowledged: u64,
    failed: u64,
    /// Open loop: set once the thread stops ([`censor_unsent`]).
    unsent_at_end: u64,
}

impl ReplyTally {
    /// Counts one reply whose results are `results`, to a request meant to leave at
    /// `started` (sent then, or in a paced thread, due then).
    fn record(&mut self, results: &[u8], started: Instant) {
        let count = results.len() / size_of::<RecordResult>();
        let measuring = self.measuring.load(Ordering::Relaxed);
        let micros = (started.elapsed().as_micros() as u64).max(1);
        let counted = match &self.due_window {
            Some(window) => window.contains(started),
            None => measuring,
        };
        if counted {
            self.latency.saturating_record(micros);
        }
        if measuring {
            // Once per reply (a whole request), uncontended except when the sampler
            // drains it once a second. The series' seconds are seconds of replies.
            self.interval_latency
                .lock()
                .expect("no panics under this lock")
                .saturating_record(micros);
            self.acknowledged += count as u64;
            self.failed += results
                .chunks_exact(size_of::<RecordResult>())
                .filter(|chunk| bytemuck::pod_read_unaligned::<RecordResult>(chunk).code != 0)
                .count() as u64;
        }
        self.acknowledged_live
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    fn into_report(self) -> LoadThreadReport {
        LoadThreadReport {
            shard: self.shard,
            acknowledged: self.acknowledged,
            failed: self.failed,
            latency: self.latency,
            unsent_at_end: self.unsent_at_end,
        }
    }
}

/// The measured window of a load, as seen by its client threads. In an open loop a request
/// counts in the run's latency when it was due inside the window ([`Self::contains`]),
/// whether it was answered inside it, after it (while the load drains), or not at all (its
/// thread stopped before sending it: [`censor_unsent`]). Counting the replies that came
/// inside the window instead left out the requests a backlog still held at its end, the
/// slowest ones: under overload the run's tail was optimistic.
struct MeasuredWindow {
    base: Instant,
    /// When the window opened, in ns after `base` (`u64::MAX`: not yet).
    start_ns: AtomicU64,
    /// When it closed, in ns after `base` (`u64::MAX`: not yet).
    end_ns: AtomicU64,
}

impl MeasuredWindow {
    /// A window not yet open; every due time the threads ask about is after `base`.
    fn new(base: Instant) -> Self {
        Self {
            base,
            start_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn since_base(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    fn at(&self, ns: u64) -> Option<Instant> {
        (ns != u64::MAX).then(|| self.base + Duration::from_nanos(ns))
    }

    fn open(&self, at: Instant) {
        self.start_ns.store(self.since_base(at), Ordering::Release);
    }

    fn close(&self, at: Instant) {
        self.end_ns.store(self.since_base(at), Ordering::Release);
    }

    /// When it opened and when it closed, once they are known.
    fn bounds(&self) -> (Option<Instant>, Option<Instant>) {
        (
            self.at(self.start_ns.load(Ordering::Acquire)),
            self.at(self.end_ns.load(Ordering::Acquire)),
        )
    }

    /// Whether a request due at `due` is one the window measures. A reply arrives after its
    /// request's due time, so while the window is open its end does not matter yet.
    fn contains(&self, due: Instant) -> bool {
        match self.bounds() {
            (Some(start), end) => due >= start && end.is_none_or(|end| due < end),
            (None, _) => false,
        }
    }
}

/// Most histogram entries [`censor_unsent`] makes: past it, unsent requests are recorded
/// in this many equal runs, each at the latency of its latest-due request.
const CENSORED_RUNS_MAX: u64 = 65_536;

/// Records, for one open-loop thread that has stopped after sending `sent` requests, every
/// request due inside `window` that it never sent (its window of requests in flight was
/// full when the load stopped): as answered at the window's end, a lower bound of what its
/// latency would have been. Returns how many there were. Runs of them beyond
/// [`CENSORED_RUNS_MAX`] share one entry at the run's smallest latency, so that the bound
/// stays a lower bound and the work stays bounded under any overload.
fn censor_unsent(
    schedule: &PaceSchedule,
    sent: u64,
    window: &MeasuredWindow,
    latency: &mut Histogram<u64>,
) -> u64 {
    let (Some(start), Some(end)) = window.bounds() else {
        return 0;
    };
    let first = schedule.due_before(start).max(sent);
    let last = schedule.due_before(end);
    let Some(unsent) = last.checked_sub(first).filter(|&unsent| unsent > 0) else {
        return 0;
    };
    let runs = unsent.min(CENSORED_RUNS_MAX);
    for run in 0..runs {
        let (low, high) = (
            first + unsent * run / runs,
            first + unsent * (run + 1) / runs,
        );
        let micros = end
            .saturating_duration_since(schedule.due(high - 1))
            .as_micros() as u64;
        latency.saturating_record_n(micros.max(1), high - low);
    }
    unsent
}

/// Longest a load connection looks for its group's new leader after its replica stopped
/// leading (or its connection broke) before the run fails.
pub const LEADER_FOLLOW_TIMEOUT_MS: u64 = 10_000;

/// Socket timeout of a load connection: a reply or a write slower than this fails it.
const LOAD_IO_TIMEOUT_S: u64 = 30;

/// Where one shard's load goes: the client address of each replica of its group, and the
/// one that leads it now.
#[derive(Clone, Debug)]
pub struct LoadTarget {
    replicas: Arc<[SocketAddr]>,
    leader: usize,
}

impl LoadTarget {
    /// A group whose leader is `replicas[leader]`; the load follows it to another replica.
    pub fn group(replicas: Vec<SocketAddr>, leader: usize) -> Self {
        assert!(leader < replicas.len(), "the leader is one of the replicas");
        Self {
            replicas: replicas.into(),
            leader,
        }
    }

    /// One address and nothing to follow (one node, or a remote cluster's known leader).
    pub fn single(address: SocketAddr) -> Self {
        Self::group(vec![address], 0)
    }

    /// The address of the replica that led the group when the load started.
    pub fn leader_address(&self) -> SocketAddr {
        self.replicas[self.leader]
    }
}

/// The requests one connection has sent and not had answered (at most `window`: request `n`
/// is built in slot `n % window`), kept to send again to a new leader.
struct Unanswered {
    slots: Vec<Vec<Transfer>>,
}

impl Unanswered {
    fn new(window: usize, records_per_request: usize) -> Self {
        let slot = vec![<Transfer as bytemuck::Zeroable>::zeroed(); records_per_request];
        Self {
            slots: vec![slot; window],
        }
    }

    /// Builds request `number` with `maker` in its slot (the window bounds what is
    /// unanswered, so the slot's previous request was answered) and returns it.
    fn build(&mut self, number: u64, maker: &mut RequestMaker) -> &[Transfer] {
        let index = (number % self.slots.len() as u64) as usize;
        maker.next_request(&mut self.slots[index]);
        &self.slots[index]
    }

    fn get(&self, number: u64) -> &[Transfer] {
        &self.slots[(number % self.slots.len() as u64) as usize]
    }
}

/// One connection's way to its group's leader: whom to try, and how often it moved.
struct LeaderLink {
    shard: usize,
    client_id: u128,
    /// Request `k` of this connection goes out as number `number_base + k`
    /// ([`percore_net::client::request_number_base`]): client ids are reused from run to
    /// run, and a run against a cluster that served an earlier one must not send numbers
    /// the sessions there hold replies for.
    number_base: u64,
    target: LoadTarget,
    /// Index in `target.replicas` of the replica connected to now.
    current: usize,
    /// Times this connection moved to another leader (shared by the load's threads).
    follows: Arc<AtomicU64>,
}

impl LeaderLink {
    fn new(shard: usize, client_id: u128, target: LoadTarget, follows: Arc<AtomicU64>) -> Self {
        let current = target.leader;
        Self {
            shard,
            client_id,
            number_base: percore_net::client::request_number_base(),
            target,
            current,
            follows,
        }
    }

    /// The first connection, to the replica the target names.
    fn connect(&self) -> Result<Pipeline, ClientError> {
        Pipeline::connect(
            self.shard,
            self.target.replicas[self.current],
            self.client_id,
            frame::FRAME_BYTES_MAX_DEFAULT,
            Duration::from_secs(LOAD_IO_TIMEOUT_S),
        )
    }

    /// After `error` on the connection: whether to look for another leader. Only a group
    /// with other replicas, and only for what a leader change looks like (a refusal as not
    /// the leader or busy in a view change, a connection that broke).
    fn should_follow(&self, error: &ClientError) -> bool {
        self.target.replicas.len() > 1 && error.is_redirect()
    }

    /// Connects to the group's leader now (the replicas in turn from the one after the
    /// current) and sends the unanswered requests `pending` again, in order, under their
    /// own numbers: the client session answers one that committed with its original reply.
    /// Gives up after [`LEADER_FOLLOW_TIMEOUT_MS`].
    fn follow(
        &mut self,
        pending: std::ops::RangeInclusive<u64>,
        unanswered: &Unanswered,
    ) -> Result<Pipeline, ClientError> {
        self.follows.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_millis(LEADER_FOLLOW_TIMEOUT_MS);
        // Bounded by the deadline: `connect_leader` returns by then, and a resend that fails
        // again comes back here.
        loop {
            let (mut pipeline, leader) = Pipeline::connect_leader(
                self.shard,
                &self.target.replicas,
                self.current + 1,
                self.client_id,
                frame::FRAME_BYTES_MAX_DEFAULT,
                Duration::from_secs(LOAD_IO_TIMEOUT_S),
                LeaderProbe {
                    operation: frame::Operation::CreateTransfers.into(),
                    deadline,
                },
            )?;
            self.current = leader;
            let resent = pending.clone().try_for_each(|number| {
                pipeline.send(
                    frame::Operation::CreateTransfers.into(),
                    self.number_base + number,
                    unanswered.get(number),
                )
            });
            match resent {
                Ok(()) => return Ok(pipeline),
                Err(error) if self.should_follow(&error) && Instant::now() < deadline => {}
                Err(error) => return Err(error),
            }
        }
    }
}

/// One client thread: a pipelined connection to one shard's group leader, `window` requests
/// in flight; closed loop, or open loop on `schedule`. When the leader changes (a view
/// change) it follows the group to its new leader and sends what was unanswered again.
#[allow(clippy::too_many_arguments)]
fn load_thread(
    thread: usize,
    target: LoadTarget,
    follows: Arc<AtomicU64>,
    window: usize,
    schedule: Option<PaceSchedule>,
    stop: Arc<AtomicBool>,
    mut maker: RequestMaker,
    mut tally: ReplyTally,
) -> Result<LoadThreadReport, ClientError> {
    let mut link = LeaderLink::new(maker.shard, 1_000 + thread as u128, target, follows);
    let pipeline = link.connect()?;
    let mut unanswered = Unanswered::new(window, maker.records_per_request);
    if let Some(schedule) = schedule {
        let paced_load = PacedLoad {
            schedule: &schedule,
            window,
            stop: &stop,
        };
        let sent = paced(
            paced_load,
            link,
            pipeline,
            &mut maker,
            &mut unanswered,
            &mut tally,
        )?;
        // Acquire: pairs with `Load::finish`'s Release, so that the window's end is known.
        if let (true, Some(window)) = (stop.load(Ordering::Acquire), tally.due_window.clone()) {
            tally.unsent_at_end = censor_unsent(&schedule, sent, &window, &mut tally.latency);
        }
        return Ok(tally.into_report());
    }
    let mut pipeline = pipeline;
    let mut sent_at = std::collections::VecDeque::with_capacity(window);
    let (mut sent, mut answered) = (0u64, 0u64);
    // Bounded by `stop`: once set, no request is sent and each loop answers one.
    loop {
        while sent - answered < window as u64 && !stop.load(Ordering::Relaxed) {
            sent += 1;
            let records = unanswered.build(sent, &mut maker);
            sent_at.push_back(Instant::now());
            let Err(error) = pipeline.send(
                frame::Operation::CreateTransfers.into(),
                link.number_base + sent,
                records,
            ) else {
                continue;
            };
            if !link.should_follow(&error) {
                return Err(error);
            }
            pipeline = link.follow(answered + 1..=sent, &unanswered)?;
        }
        if sent == answered {
            break;
        }
        let error = match pipeline.receive(size_of::<RecordResult>()) {
            Ok(reply) => {
                answered += 1;
                let started = sent_at.pop_front().expect("one per request");
                tally.record(reply.body, started);
                continue;
            }
            Err(error) => error,
        };
        if !link.should_follow(&error) {
            return Err(error);
        }
        pipeline = link.follow(answered + 1..=sent, &unanswered)?;
    }
    Ok(tally.into_report())
}

/// What an open-loop connection sends on: its schedule, window and stop flag.
#[derive(Clone, Copy)]
struct PacedLoad<'a> {
    schedule: &'a PaceSchedule,
    window: usize,
    stop: &'a AtomicBool,
}

/// Counts shared by a paced connection's sender and receiver.
struct PacedCounts {
    /// Requests sent (request `k + 1` is the `k`-th, due at `schedule.due(k)`).
    sent: AtomicU64,
    /// Replies received.
    received: AtomicU64,
    /// The sender has stopped: `sent` is final.
    sender_done: AtomicBool,
    /// The receiver failed: the sender stops.
    receiver_failed: AtomicBool,
    /// The receiver's read failed as a leader change does: it waits for `handover`, and
    /// `received` is final until then.
    broken: AtomicBool,
    /// The receiving half of the connection to the new leader, from the sender.
    handover: Mutex<Option<PipelineReceiver>>,
    /// The group has other replicas to follow its leader to ([`LeaderLink::should_follow`]).
    can_follow: bool,
    /// The connection's [`LeaderLink::number_base`].
    number_base: u64,
}

/// Open loop on one connection: a scoped sender thread sends request `k` at
/// `schedule.due(k)` (later only while `window` requests are unanswered), this thread
/// receives and counts each reply's latency from its request's due time. Replies come in
/// request order, so the due time of the `k`-th reply is known without a queue. Ends when
/// `stop` is set and every request sent is answered; returns how many were sent.
///
/// A leader change: the receiver's read fails, it marks the connection `broken` and waits;
/// the sender (which also shuts the connection down when its own write fails, so that the
/// receiver's read fails too) connects to the new leader, sends the unanswered requests
/// again and hands the receiving half over. Their latency still counts from their due times.
fn paced(
    load: PacedLoad<'_>,
    mut link: LeaderLink,
    pipeline: Pipeline,
    maker: &mut RequestMaker,
    unanswered: &mut Unanswered,
    tally: &mut ReplyTally,
) -> Result<u64, ClientError> {
    let (mut sender, mut receiver) = pipeline.split()?;
    let counts = PacedCounts {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        sender_done: AtomicBool::new(false),
        receiver_failed: AtomicBool::new(false),
        broken: AtomicBool::new(false),
        handover: Mutex::new(None),
        can_follow: link.target.replicas.len() > 1,
        number_base: link.number_base,
    };
    let receiving = std::thread::current();
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            let sent = paced_send(
                load,
                &mut link,
                &mut sender,
                maker,
                unanswered,
                &counts,
                &receiving,
            );
            // Release: the receiver that sees `sender_done` sees the final `sent`.
            counts.sender_done.store(true, Ordering::Release);
            receiving.unpark();
            sent
        });
        let received = paced_receive(
            &mut receiver,
            load.schedule,
            tally,
            &counts,
            sending.thread(),
        );
        if received.is_err() {
            counts.receiver_failed.store(true, Ordering::Relaxed);
            sending.thread().unpark();
        }
        let sent = sending.join().expect("paced sender panicked");
        received.and(sent)
    })
}

/// The sending half of [`paced`]; it also moves the connection to a new leader. Returns how
/// many requests it sent.
fn paced_send(
    load: PacedLoad<'_>,
    link: &mut LeaderLink,
    sender: &mut PipelineSender,
    maker: &mut RequestMaker,
    unanswered: &mut Unanswered,
    counts: &PacedCounts,
    receiving: &std::thread::Thread,
) -> Result<u64, ClientError> {
    let PacedLoad {
        schedule,
        window,
        stop,
    } = load;
    let spin = schedule.spins();
    let mut sent = 0u64;
    loop {
        if counts.broken.load(Ordering::Acquire) {
            *sender = paced_follow(link, unanswered, counts, sent, receiving)?;
        }
        if !pacing::sleep_until(schedule.due(sent), spin, stop) {
            return Ok(sent);
        }
        // A full window holds the request back; it is then late, and its latency (counted
        // from the due time) shows it.
        while sent - counts.received.load(Ordering::Acquire) >= window as u64 {
            if stop.load(Ordering::Relaxed) || counts.receiver_failed.load(Ordering::Relaxed) {
                return Ok(sent);
            }
            if counts.broken.load(Ordering::Acquire) {
                *sender = paced_follow(link, unanswered, counts, sent, receiving)?;
                continue;
            }
            std::thread::park_timeout(Duration::from_millis(pacing::PACE_STOP_POLL_MS));
        }
        if counts.receiver_failed.load(Ordering::Relaxed) {
            return Ok(sent);
        }
        let records = unanswered.build(sent + 1, maker);
        // Counted before it is written: if the write fails, a reply is owed, so the receiver
        // is reading and its read fails once the connection is shut down.
        sent += 1;
        // Release, paired with the receiver's Acquire: it reads only replies owed.
        counts.sent.store(sent, Ordering::Release);
        receiving.unpark();
        if let Err(error) = sender.send(
            frame::Operation::CreateTransfers.into(),
            link.number_base + sent,
            records,
        ) {
            if !link.should_follow(&error) {
                return Err(error);
            }
            sender.shutdown();
            // Bounded: the receiver owes request `sent`'s reply, so it reads, and its read
            // fails on the shut connection (or it fails for good and stops us).
            while !counts.broken.load(Ordering::Acquire) {
                if counts.receiver_failed.load(Ordering::Relaxed) {
                    return Ok(sent);
                }
                std::thread::park_timeout(Duration::from_millis(pacing::PACE_STOP_POLL_MS));
            }
        }
    }
}

/// The sender's side of a leader change: the receiver has stopped on a broken connection
/// with `received` final; connects to the new leader, sends requests `received + 1..=sent`
/// again and hands the receiving half over. Returns the new sending half.
fn paced_follow(
    link: &mut LeaderLink,
    unanswered: &Unanswered,
    counts: &PacedCounts,
    sent: u64,
    receiving: &std::thread::Thread,
) -> Result<PipelineSender, ClientError> {
    // Acquire (with the `broken` load before this call): the receiver's last store.
    let received = counts.received.load(Ordering::Acquire);
    let pipeline = link.follow(received + 1..=sent, unanswered)?;
    let (sender, receiver) = pipeline.split()?;
    *counts.handover.lock().expect("no panics under this lock") = Some(receiver);
    // Release: the receiver that sees `broken` cleared finds the new half.
    counts.broken.store(false, Ordering::Release);
    receiving.unpark();
    Ok(sender)
}

/// The receiving half of [`paced`]: reads a reply only when one is owed, so it never blocks
/// on a connection with nothing in flight.
fn paced_receive(
    receiver: &mut PipelineReceiver,
    schedule: &PaceSchedule,
    tally: &mut ReplyTally,
    counts: &PacedCounts,
    sending: &std::thread::Thread,
) -> Result<(), ClientError> {
    let mut received = 0u64;
    loop {
        // `sender_done` first: once it is seen, the `sent` read after it is final.
        let sender_done = counts.sender_done.load(Ordering::Acquire);
        if received == counts.sent.load(Ordering::Acquire) {
            if sender_done {
                return Ok(());
            }
            std::thread::park_timeout(Duration::from_millis(pacing::PACE_STOP_POLL_MS));
            continue;
        }
        match receiver.receive(size_of::<RecordResult>(), counts.number_base + received + 1) {
            Ok(reply) => {
                tally.record(reply.body, schedule.due(received));
                received += 1;
                counts.received.store(received, Ordering::Release);
                sending.unpark();
            }
            Err(error) if counts.can_follow && error.is_redirect() && !sender_done => {
                // Release: the sender that sees `broken` sees the final `received`.
                counts.broken.store(true, Ordering::Release);
                sending.unpark();
                // Bounded by the sender: it hands a new half over, or stops (its error is
                // the run's).
                loop {
                    if let Some(next) = counts
                        .handover
                        .lock()
                        .expect("no panics under this lock")
                        .take()
                    {
                        *receiver = next;
                        break;
                    }
                    if counts.sender_done.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    std::thread::park_timeout(Duration::from_millis(pacing::PACE_STOP_POLL_MS));
                }
            }
            Err(error) => return Err(error),
        }
    }
}

struct Load {
    threads: Vec<JoinHandle<Result<LoadThreadReport, ClientError>>>,
    /// Times a connection moved to its group's new leader.
    follows: Arc<AtomicU64>,
    measuring: Arc<AtomicBool>,
    /// The window as the open-loop threads see it ([`MeasuredWindow`]).
    window: Arc<MeasuredWindow>,
    stop: Arc<AtomicBool>,
    acknowledged_live: Arc<AtomicU64>,
    /// Per thread, the latency since the sampler last drained it ([`Load::take_latency`]).
    interval_latency: Vec<Arc<Mutex<Histogram<u64>>>>,
    shards: usize,
}

/// What every client thread saw during the window, merged.
struct LoadTotals {
    /// Times a connection moved to its group's new leader (during the whole load).
    follows: u64,
    acknowledged: u64,
    acknowledged_per_shard: Vec<u64>,
    failed: u64,
    latency: Histogram<u64>,
    /// Open loop: requests due in the window and never sent ([`censor_unsent`]).
    unsent_at_end: u64,
}

impl Load {
    /// Starts `connections_per_shard` client threads per shard, shard `k`'s to
    /// `targets[k]`'s leader (followed when it changes): closed loop, or, with
    /// `rate_tx_per_s`, open loop at that rate in all.
    /// `transfer_id_base` (bits 64..96) is OR-ed into every transfer id, so that runs
    /// against a ledger that keeps earlier transfers do not repeat ids.
    fn start(
        targets: &[LoadTarget],
        accounts: Vec<Vec<u128>>,
        config: LoadConfig,
        transfer_id_base: u128,
        rate_tx_per_s: Option<f64>,
    ) -> Self {
        debug_assert_eq!(transfer_id_base & !(u128::from(u32::MAX) << 64), 0);
        let threads_total = targets.len() * config.connections_per_shard;
        let follows = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let accounts = Arc::new(accounts);
        let measuring = Arc::new(AtomicBool::new(false));
        let window = Arc::new(MeasuredWindow::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged_live = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut interval_latency = Vec::new();
        for (shard, target) in targets.iter().enumerate() {
            for k in 0..config.connections_per_shard {
                let thread = shard * config.connections_per_shard + k;
                let (accounts, measuring, stop, live) = (
                    accounts.clone(),
                    measuring.clone(),
                    stop.clone(),
                    acknowledged_live.clone(),
                );
                let interval = Arc::new(Mutex::new(latency_histogram()));
                interval_latency.push(interval.clone());
                let maker = RequestMaker::new(thread, shard, accounts, &config, transfer_id_base);
                let tally = ReplyTally {
                    shard,
                    measuring,
                    due_window: rate_tx_per_s.map(|_| window.clone()),
                    acknowledged_live: live,
                    interval_latency: interval,
                    latency: latency_histogram(),
                    acknowledged: 0,
                    failed: 0,
                    unsent_at_end: 0,
                };
                let schedule = rate_tx_per_s.map(|rate| {
                    PaceSchedule::for_thread(
                        rate,
                        threads_total,
                        thread,
                        config.records_per_request,
                        start,
                    )
                });
                let window = config.window;
                let (target, follows) = (target.clone(), follows.clone());
                threads.push(std::thread::spawn(move || {
                    load_thread(
                        thread, target, follows, window, schedule, stop, maker, tally,
                    )
                }));
            }
        }
        Self {
            threads,
            follows,
            measuring,
            window,
            stop,
            acknowledged_live,
            interval_latency,
            shards: targets.len(),
        }
    }

    /// The client latency recorded since the last call, all threads merged; resets it.
    fn take_latency(&self) -> Histogram<u64> {
        let mut merged = latency_histogram();
        for interval in &self.interval_latency {
            let mut histogram = interval.lock().expect("no panics under this lock");
            merged.add(&*histogram).expect("same bounds");
            histogram.reset();
        }
        merged
    }

    /// Counts replies from now on, sleeps through the window (printing progress if asked)
    /// and returns when it started. The caller snapshots its counters right after.
    fn measure(&self, config: &LoadConfig) -> Instant {
        let started = self.open_window();
        let mut last_ack = self.acknowledged_live.load(Ordering::Relaxed);
        while started.elapsed() < config.duration {
            let left = config.duration.saturating_sub(started.elapsed());
            std::thread::sleep(left.min(Duration::from_secs(1)));
            if config.progress {
                let ack = self.acknowledged_live.load(Ordering::Relaxed);
                eprintln!(
                    "  {:>5.1}s  {:>12.0} tx/s acknowledged",
                    started.elapsed().as_secs_f64(),
                    (ack - last_ack) as f64
                );
                last_ack = ack;
            }
        }
        started
    }

    /// Opens the measured window: replies count from now on. Returns when.
    fn open_window(&self) -> Instant {
        let now = Instant::now();
        self.window.open(now);
        self.measuring.store(true, Ordering::Relaxed);
        now
    }

    /// Closes the window, stops the threads (each drains its requests in flight) and merges
    /// what they measured.
    fn finish(self) -> Result<LoadTotals, BenchError> {
        self.measuring.store(false, Ordering::Relaxed);
        self.window.close(Instant::now());
        // Release: a thread that sees `stop` (and then joins its own helpers, whose loads
        // may be relaxed) reads the window's end with Acquire after it.
        self.stop.store(true, Ordering::Release);
        let mut latency = latency_histogram();
        let (mut acknowledged, mut failed, mut unsent_at_end) = (0, 0, 0);
        let mut acknowledged_per_shard = vec![0; self.shards];
        let mut first_error = None;
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(report)) => {
                    acknowledged += report.acknowledged;
                    acknowledged_per_shard[report.shard] += report.acknowledged;
                    failed += report.failed;
                    unsent_at_end += report.unsent_at_end;
                    latency.add(&report.latency).expect("same bounds");
                }
                Ok(Err(error)) => {
                    first_error.get_or_insert(BenchError::from_load(error));
                }
                Err(_) => {
                    first_error.get_or_insert(BenchError::Setup("load thread panicked".into()));
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(LoadTotals {
                follows: self.follows.load(Ordering::Relaxed),
                acknowledged,
                acknowledged_per_shard,
                failed,
                latency,
                unsent_at_end,
            }),
        }
    }
}

/// Longest client latency recorded as measured (µs): one hour. An overloaded open-loop run
/// times requests from their intended send times, so its latencies grow with the backlog;
/// a longer one is recorded as this.
pub const LATENCY_RECORDED_MAX_US: u64 = 3_600_000_000;

/// The client latency histogram every thread and interval uses (µs, 1 µs to
/// [`LATENCY_RECORDED_MAX_US`], 3 significant digits).
fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, LATENCY_RECORDED_MAX_US, 3).expect("valid bounds")
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    // The machine's, not this thread's: the cluster bench confines its client threads to
    // the spare cores before it reports.
    let processors = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let cores = if processors > 0 {
        processors
    } else {
        std::thread::available_parallelism().map_or(0, |n| n.get())
    };
    format!("{model}, {cores} cores")
}

/// Counters of every shard at one moment. In a cluster, what only a group's leader counts
/// (client records applied from its own batches, batches sealed, the entries in them, their
/// sizes, commit latency) is summed over the replicas, so that a leader change between two
/// snapshots loses nothing (only the replica that seals a batch counts these), and
/// `bytes_replicated` sums every replica.
struct Snapshot {
    applied: Vec<u64>,
    batches: Vec<u64>,
    /// Entries in the batches sealed (client records and credit legs).
    batch_entries: Vec<u64>,
    batch_sizes: Vec<[u64; BUCKETS]>,
    commit_latency: Vec<[u64; BUCKETS]>,
    bytes_replicated: u64,
    /// From metrics texts: per shard, the index of the text whose node leads the group.
    leaders: Option<Vec<usize>>,
}

fn snapshot(metrics: &[Arc<ShardMetrics>]) -> Snapshot {
    Snapshot {
        applied: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.tx_applied_total))
            .collect(),
        batches: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.batches_sealed_total))
            .collect(),
        batch_entries: metrics.iter().map(|m| m.batch_size.sum()).collect(),
        batch_sizes: metrics.iter().map(|m| m.batch_size.buckets()).collect(),
        commit_latency: metrics.iter().map(|m| m.commit_latency.buckets()).collect(),
        bytes_replicated: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.replication_bytes_sent_total))
            .sum(),
        leaders: None,
    }
}

/// Per-bucket counts from Prometheus' cumulative ones.
fn per_bucket(cumulative: &[u64]) -> [u64; BUCKETS] {
    std::array::from_fn(|index| {
        let below = if index == 0 { 0 } else { cumulative[index - 1] };
        cumulative[index].saturating_sub(below)
    })
}

/// Scrapes every replica ([`Snapshot`] says which counters come from where).
fn scrape_snapshot(cluster: &LocalCluster) -> Result<Snapshot, BenchError> {
    let texts = (0..cluster.replicas())
        .map(|replica| cluster.scrape(replica))
        .collect::<Result<Vec<String>, ClusterError>>()?;
    Ok(snapshot_from_texts(&texts, cluster.shards(), |shard| {
        cluster.leader_of(shard)
    }))
}

/// Each shard's counters from the nodes' metrics `texts` ([`Snapshot`]); the current leader
/// is the node reporting `percore_replica_is_leader`, else `leader_of(shard)`.
fn snapshot_from_texts(
    texts: &[String],
    shards: usize,
    leader_of: impl Fn(usize) -> usize,
) -> Snapshot {
    let leaders: Vec<usize> = (0..shards)
        .map(|shard| {
            texts
                .iter()
                .position(|text| {
                    cluster::shard_metric(text, "percore_replica_is_leader", shard) == 1
                })
                .unwrap_or_else(|| leader_of(shard))
        })
        .collect();
    let summed = |name: &str| -> Vec<u64> {
        (0..shards)
            .map(|shard| {
                texts
                    .iter()
                    .map(|text| cluster::shard_metric(text, name, shard))
                    .sum()
            })
            .collect()
    };
    let histogram = |name: &str| -> Vec<[u64; BUCKETS]> {
        (0..shards)
            .map(|shard| {
                let mut sum = [0; BUCKETS];
                for text in texts {
                    let buckets = per_bucket(&cluster::histogram_buckets(text, name, shard));
                    for (total, count) in sum.iter_mut().zip(buckets) {
                        *total += count;
                    }
                }
                sum
            })
            .collect()
    };
    Snapshot {
        applied: summed("percore_tx_applied_total"),
        batches: summed("percore_batches_sealed_total"),
        batch_entries: (0..shards)
            .map(|shard| {
                let label = format!("shard=\"{shard}\"");
                texts
                    .iter()
                    .filter_map(|text| cluster::metric(text, "percore_batch_entries_sum", &label))
                    .map(|sum| sum as u64)
                    .sum()
            })
            .collect(),
        batch_sizes: histogram("percore_batch_entries"),
        commit_latency: histogram("percore_commit_seconds"),
        bytes_replicated: texts
            .iter()
            .map(|text| cluster::metric_sum(text, "percore_replication_bytes_sent_total", shards))
            .sum(),
        leaders: Some(leaders),
    }
}

/// Per-bucket deltas over the window, summed over every shard.
fn bucket_deltas(before: &[[u64; BUCKETS]], after: &[[u64; BUCKETS]]) -> [u64; BUCKETS] {
    std::array::from_fn(|index| {
        after
            .iter()
            .zip(before)
            .map(|(a, b)| a[index].saturating_sub(b[index]))
            .sum()
    })
}

/// Batches sealed during the window by size bucket, all shards.
fn batch_size_distribution(before: &Snapshot, after: &Snapshot) -> Vec<BatchSizeBucket> {
    let deltas = bucket_deltas(&before.batch_sizes, &after.batch_sizes);
    (0..BUCKETS)
        .map(|index| BatchSizeBucket {
            entries_at_most: LATENCY_BUCKETS_US.get(index).copied(),
            batches: deltas[index],
        })
        .filter(|bucket| bucket.batches > 0)
        .collect()
}

/// The upper bound of the bucket holding quantile `quantile` of `counts` (per bucket), or
/// `None` for the overflow bucket. `counts` must not be all zero.
fn bucket_quantile(counts: &[u64; BUCKETS], quantile: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    debug_assert!(total > 0);
    let rank = ((quantile * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    let index = counts
        .iter()
        .position(|count| {
            seen += count;
            seen >= rank
        })
        .expect("rank <= total");
    LATENCY_BUCKETS_US.get(index).copied()
}

/// Commit latency over the window from the leaders' histograms; `None` if nothing committed.
fn commit_latency(before: &Snapshot, after: &Snapshot) -> Option<BucketLatencyRow> {
    let deltas = bucket_deltas(&before.commit_latency, &after.commit_latency);
    let samples: u64 = deltas.iter().sum();
    (samples > 0).then(|| BucketLatencyRow {
        p50_at_most: bucket_quantile(&deltas, 0.50),
        p99_at_most: bucket_quantile(&deltas, 0.99),
        p999_at_most: bucket_quantile(&deltas, 0.999),
        samples,
    })
}

/// What the clients offered during the window.
#[derive(Debug, Clone, Copy, Default)]
struct OfferedLoad {
    /// Open loop: transfers per second, all connections; `None` for a closed loop.
    tx_per_s: Option<f64>,
    /// With [`Offered::PeakFraction`]: the peak measured first.
    peak_tx_per_s: Option<f64>,
}

/// The next transfer id base after `base` (bits 64..96, wrapping within them).
fn next_id_base(base: u128) -> u128 {
    u128::from(((base >> 64) as u32).wrapping_add(1)) << 64
}

/// Starts the client threads the window measures, as `config.offered` asks, and returns
/// once their warm-up is over. For [`Offered::PeakFraction`] it first measures the peak
/// ([`measure_peak`]), then starts the open loop with the next transfer id base.
/// `committed(load)` reads the transfers committed so far, all shards.
fn start_load(
    targets: &[LoadTarget],
    accounts: Vec<Vec<u128>>,
    config: &LoadConfig,
    transfer_id_base: u128,
    committed: impl Fn(&Load) -> Result<u64, BenchError>,
) -> Result<(Load, OfferedLoad), BenchError> {
    let offered = match config.offered {
        Offered::Full => OfferedLoad::default(),
        Offered::Rate { tx_per_s } => OfferedLoad {
            tx_per_s: Some(tx_per_s),
            peak_tx_per_s: None,
        },
        Offered::PeakFraction {
            fraction,
            peak_duration,
        } => {
            let base = transfer_id_base;
            let peak = measure_peak(targets, &accounts, config, base, peak_duration, committed)?;
            let rate = fraction * peak;
            if !(rate.is_finite() && rate > 0.0) {
                return Err(BenchError::Setup(format!(
                    "the full-load run committed nothing in {peak_duration:?}: no peak to take \
                     a share of"
                )));
            }
            if config.progress {
                eprintln!(
                    "  peak {peak:.0} tx/s committed; offering {:.0} % of it: {rate:.0} tx/s",
                    fraction * 100.0
                );
            }
            OfferedLoad {
                tx_per_s: Some(rate),
                peak_tx_per_s: Some(peak),
            }
        }
    };
    let base = if offered.peak_tx_per_s.is_some() {
        next_id_base(transfer_id_base)
    } else {
        transfer_id_base
    };
    let load = Load::start(targets, accounts, *config, base, offered.tx_per_s);
    std::thread::sleep(config.warmup);
    Ok((load, offered))
}

/// The peak committed rate (tx/s): a closed loop through the warm-up, then measured over
/// `peak_duration`; the load is stopped (its windows drained) before this returns.
fn measure_peak(
    targets: &[LoadTarget],
    accounts: &[Vec<u128>],
    config: &LoadConfig,
    transfer_id_base: u128,
    peak_duration: Duration,
    committed: impl Fn(&Load) -> Result<u64, BenchError>,
) -> Result<f64, BenchError> {
    if config.progress {
        eprintln!(
            "measuring the peak: full load for {:.1} s after {:.1} s of warm-up",
            peak_duration.as_secs_f64(),
            config.warmup.as_secs_f64()
        );
    }
    let probe = Load::start(targets, accounts.to_vec(), *config, transfer_id_base, None);
    std::thread::sleep(config.warmup);
    let measured = (|| {
        let before = committed(&probe)?;
        let window = LoadConfig {
            duration: peak_duration,
            ..*config
        };
        let started = probe.measure(&window);
        let after = committed(&probe)?;
        Ok::<_, BenchError>(after.saturating_sub(before) as f64 / started.elapsed().as_secs_f64())
    })();
    let finished = probe.finish();
    let peak = measured?;
    finished?;
    Ok(peak)
}

/// What one run measured, before it becomes a report.
struct Measured<'a> {
    load: &'a LoadConfig,
    offered: OfferedLoad,
    cores: &'a [usize],
    replicas: usize,
    before: Snapshot,
    after: Snapshot,
    elapsed_s: f64,
    totals: LoadTotals,
}

fn report(measured: Measured<'_>) -> BenchReport {
    let Measured {
        load,
        offered,
        cores,
        replicas,
        before,
        after,
        elapsed_s,
        totals,
    } = measured;
    let shards = cores.len();
    let per_shard: Vec<ShardRow> = (0..shards)
        .map(|shard| {
            let applied = after.applied[shard] - before.applied[shard];
            let batches = after.batches[shard] - before.batches[shard];
            let entries = after.batch_entries[shard] - before.batch_entries[shard];
            ShardRow {
                shard,
                core: Some(cores[shard]),
                leader_replica: after
                    .leaders
                    .as_ref()
                    .map_or(shard % replicas, |leaders| leaders[shard]),
                committed_tx_per_s: applied as f64 / elapsed_s,
                acknowledged_tx_per_s: totals.acknowledged_per_shard[shard] as f64 / elapsed_s,
                batches,
                mean_batch_entries: if batches == 0 {
                    0.0
                } else {
                    entries as f64 / batches as f64
                },
            }
        })
        .collect();
    let latency = &totals.latency;
    BenchReport {
        benchmark: "percore-bench",
        replicas,
        fsync: load.fsync,
        shards,
        duration_s: elapsed_s,
        total_committed_tx_per_s: per_shard.iter().map(|row| row.committed_tx_per_s).sum(),
        pacing: if offered.tx_per_s.is_some() {
            PACING_OPEN
        } else {
            PACING_CLOSED
        },
        offered_tx_per_s: offered.tx_per_s,
        peak_tx_per_s: offered.peak_tx_per_s,
        load_fraction: match load.offered {
            Offered::PeakFraction { fraction, .. } => Some(fraction),
            Offered::Full | Offered::Rate { .. } => None,
        },
        committed_source: if replicas == 1 {
            COMMITTED_SOURCE_NODE
        } else {
            COMMITTED_SOURCE_CLUSTER
        },
        per_shard,
        acknowledged: totals.acknowledged,
        failed: totals.failed,
        leader_follows: totals.follows,
        request_latency_us: LatencyRow {
            p50: latency.value_at_quantile(0.50),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
        },
        requests_measured: latency.len(),
        requests_unsent_at_end: offered.tx_per_s.map(|_| totals.unsent_at_end),
        commit_latency_us: if replicas == 1 {
            None
        } else {
            commit_latency(&before, &after)
        },
        bytes_replicated: after
            .bytes_replicated
            .saturating_sub(before.bytes_replicated),
        batch_sizes: batch_size_distribution(&before, &after),
        records_per_request: load.records_per_request,
        window: load.window,
        connections_per_shard: load.connections_per_shard,
        cross_shard_percent: load.cross_shard_percent,
        machine: machine_description(),
        soak: None,
    }
}

/// Runs the benchmark end to end on one in-process node and returns what it measured.
pub fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    let load_config = config.load();
    let ledger = config.ledger;
    let seed = crate::runtime::random_seed();
    let (sessions, records_max) = (
        config.session_clients_max,
        config
            .node
            .batch
            .entries_cap(percore_engine::record::RECORD_BYTES),
    );
    let node = Node::start(config.node.clone(), move |shard, _| {
        percore_engine::session::Sessioned::new(
            Ledger::with_hash_seed(
                LedgerConfig {
                    shard_index: shard as u32,
                    ..ledger
                },
                seed,
            ),
            sessions,
            records_max,
        )
    })?;
    let addresses = node.client_addresses().to_vec();
    let accounts = setup_accounts(
        ClientConfig::new(addresses.clone(), 1),
        load_config.accounts_per_shard,
    )?;
    let targets: Vec<LoadTarget> = addresses.into_iter().map(LoadTarget::single).collect();
    let committed = |_: &Load| Ok(snapshot(node.metrics()).applied.iter().sum());
    let (load, offered) = start_load(&targets, accounts, &load_config, 0, committed)?;
    let before = snapshot(node.metrics());
    let started = load.measure(&load_config);
    let after = snapshot(node.metrics());
    let elapsed_s = started.elapsed().as_secs_f64();
    let totals = load.finish()?;
    node.shutdown()?;
    Ok(report(Measured {
        load: &load_config,
        offered,
        cores: &config.node.cores,
        replicas: 1,
        before,
        after,
        elapsed_s,
        totals,
    }))
}

/// Runs the benchmark end to end on a local cluster of child processes: starts it, loads
/// every group through its leader, measures, stops every replica with SIGTERM. The caller
/// owns (and removes) the data directories. With `config.series`, `sink` gets the series
/// as it grows ([`soak::SeriesSink`]; `SeriesSink::default()` keeps nothing).
pub fn run_cluster(
    config: ClusterBenchConfig,
    sink: &mut soak::SeriesSink,
) -> Result<BenchReport, BenchError> {
    assert!(
        config.cluster.metrics,
        "the cluster report is read from metrics"
    );
    let load_config = config.load;
    let mut cluster = LocalCluster::start(config.cluster.clone())?;
    // The client's threads (started from this one, so they inherit it) stay off the
    // replicas' shard cores where the layout leaves cores spare.
    if let Err(error) = crate::affinity::confine_current(cluster.spare_cores()) {
        tracing::warn!(cores = ?cluster.spare_cores(), %error, "client threads not confined to the spare cores");
    }
    let replicas: Vec<Vec<SocketAddr>> = (0..cluster.replicas())
        .map(|replica| {
            (0..cluster.shards())
                .map(|shard| cluster.client_address(replica, shard))
                .collect()
        })
        .collect();
    let targets: Vec<LoadTarget> = (0..cluster.shards())
        .map(|shard| {
            let of_group = replicas.iter().map(|replica| replica[shard]).collect();
            LoadTarget::group(of_group, cluster.leader_of(shard))
        })
        .collect();
    let accounts = setup_accounts(
        ClientConfig::replicated(replicas, 1),
        load_config.accounts_per_shard,
    )?;
    let committed = |_: &Load| Ok(scrape_snapshot(&cluster)?.applied.iter().sum());
    let (load, offered) = start_load(&targets, accounts, &load_config, 0, committed)?;
    let measured = scrape_snapshot(&cluster).and_then(|before| {
        let (started, soak) = if config.series {
            load.open_window();
            let (started, soak) =
                soak::sample_window(&cluster, load_config.duration, || load.take_latency(), sink)?;
            (started, Some(soak))
        } else {
            (load.measure(&load_config), None)
        };
        let after = scrape_snapshot(&cluster)?;
        Ok((before, after, started.elapsed().as_secs_f64(), soak))
    });
    let totals = load.finish();
    let (before, after, elapsed_s, soak) = measured?;
    let totals = totals?;
    for (replica, stopped) in cluster.stop_all().into_iter().enumerate() {
        match stopped {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("WARNING: replica {replica} exited with {status}"),
            Err(error) => eprintln!("WARNING: {error}"),
        }
    }
    let mut report = report(Measured {
        load: &load_config,
        offered,
        cores: &config.cluster.cores,
        replicas: config.cluster.replicas,
        before,
        after,
        elapsed_s,
        totals,
    });
    report.soak = soak.map(|soak| SoakReport {
        p999_us: report.request_latency_us.p999,
        ..soak
    });
    Ok(report)
}

/// What the nodes of a remote cluster say about its groups, read once before the load.
struct RemoteLayout {
    /// Per shard, the index (in `--metrics-addresses`) of the node leading it.
    leader_node: Vec<usize>,
    /// Per shard, that node's replica index (its position if it does not say).
    leader_replica: Vec<usize>,
    /// Per shard, the leader's core for it.
    cores: Vec<Option<usize>>,
    /// Replicas per group (1 for a single node).
    replicas: usize,
}

fn scrape_remote(metrics: &[SocketAddr]) -> Result<Vec<String>, BenchError> {
    metrics
        .iter()
        .enumerate()
        .map(|(replica, &address)| {
            cluster::scrape_metrics(address).map_err(|source| {
                BenchError::Cluster(ClusterError::Scrape {
                    replica,
                    address,
                    source,
                })
            })
        })
        .collect()
}

/// Finds each shard's leader among the scraped nodes (`percore_replica_is_leader`; a single
/// node leads all its shards) and checks the shard count against `--addresses`.
fn remote_layout(texts: &[String], shards: usize) -> Result<RemoteLayout, BenchError> {
    let plain = |text: &str, name: &str| {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok().map(|value| value as usize)
        })
    };
    let replicas = plain(&texts[0], "percore_config_replica_count").unwrap_or(texts.len());
    let mut layout = RemoteLayout {
        leader_node: Vec::with_capacity(shards),
        leader_replica: Vec::with_capacity(shards),
        cores: Vec::with_capacity(shards),
        replicas,
    };
    for shard in 0..shards {
        let leads = |text: &String| {
            cluster::shard_metric(text, "percore_replica_is_leader", shard) == 1
                || (replicas == 1
                    && cluster::metric(text, "percore_commit_op", &format!("shard=\"{shard}\""))
                        .is_some())
        };
        let node = texts.iter().position(leads).ok_or_else(|| {
            BenchError::Setup(format!(
                "no node in --metrics-addresses leads shard {shard}: --addresses lists {shards} \
                 shard(s); is that the nodes' shard count?"
            ))
        })?;
        layout.leader_node.push(node);
        layout
            .leader_replica
            .push(plain(&texts[node], "percore_config_replica_index").unwrap_or(node));
        layout.cores.push(
            cluster::metric(
                &texts[node],
                "percore_config_shard_core",
                &format!("shard=\"{shard}\""),
            )
            .map(|core| core as usize),
        );
    }
    Ok(layout)
}

/// Drives the load at a running cluster's group leaders (`config.leaders`, one per shard)
/// and reports per-shard TPS: from the leaders' metrics when `config.metrics` names the
/// nodes, else from client acknowledgements. Accounts are created (or found, on a second
/// run) first; transfer ids carry a random base so runs do not collide.
pub fn run_remote(config: RemoteBenchConfig) -> Result<BenchReport, BenchError> {
    let load_config = config.load;
    let shards = config.leaders.len();
    assert!(shards > 0, "one leader address per shard");
    let layout = if config.metrics.is_empty() {
        None
    } else {
        Some(remote_layout(&scrape_remote(&config.metrics)?, shards)?)
    };
    let accounts = setup_accounts(
        ClientConfig::new(config.leaders.clone(), 1),
        load_config.accounts_per_shard,
    )?;
    let transfer_id_base = u128::from(crate::runtime::random_seed() as u32) << 64;
    let take = |layout: &RemoteLayout| -> Result<Snapshot, BenchError> {
        let texts = scrape_remote(&config.metrics)?;
        Ok(snapshot_from_texts(&texts, shards, |shard| {
            layout.leader_node[shard]
        }))
    };
    let committed = |load: &Load| match &layout {
        Some(layout) => Ok(take(layout)?.applied.iter().sum()),
        None => Ok(load.acknowledged_live.load(Ordering::Relaxed)),
    };
    let targets: Vec<LoadTarget> = config
        .leaders
        .iter()
        .copied()
        .map(LoadTarget::single)
        .collect();
    let (load, offered) = start_load(
        &targets,
        accounts,
        &load_config,
        transfer_id_base,
        committed,
    )?;
    let measured = (|| {
        let before = layout.as_ref().map(take).transpose()?;
        let started = load.measure(&load_config);
        let after = layout.as_ref().map(take).transpose()?;
        Ok::<_, BenchError>((before, after, started.elapsed().as_secs_f64()))
    })();
    let totals = load.finish();
    let (before, after, elapsed_s) = measured?;
    let totals = totals?;
    let zero = || {
        snapshot(
            &(0..shards)
                .map(|shard| Arc::new(ShardMetrics::new(shard as u32)))
                .collect::<Vec<_>>(),
        )
    };
    let replicas = layout.as_ref().map_or(1, |layout| layout.replicas.max(1));
    let mut report = report(Measured {
        load: &load_config,
        offered,
        cores: &vec![0; shards],
        replicas,
        before: before.unwrap_or_else(zero),
        after: after.unwrap_or_else(zero),
        elapsed_s,
        totals,
    });
    for row in &mut report.per_shard {
        match &layout {
            Some(layout) => {
                row.core = layout.cores[row.shard];
                row.leader_replica = layout.leader_replica[row.shard];
            }
            None => {
                row.core = None;
                row.committed_tx_per_s = row.acknowledged_tx_per_s;
            }
        }
    }
    if layout.is_none() {
        report.replicas = 0;
        report.committed_source = COMMITTED_SOURCE_ACKNOWLEDGED;
        report.total_committed_tx_per_s = report
            .per_shard
            .iter()
            .map(|row| row.committed_tx_per_s)
            .sum();
    }
    Ok(report)
}

fn at_most(bound: Option<u64>) -> String {
    bound.map_or_else(
        || format!(">{}", LATENCY_BUCKETS_US[BUCKETS - 2]),
        |us| format!("<={us}"),
    )
}

/// What was offered and what was achieved, in one line.
fn offered_line(report: &BenchReport) -> String {
    let Some(offered) = report.offered_tx_per_s else {
        return format!("offered: {}", report.pacing);
    };
    let share = match (report.load_fraction, report.peak_tx_per_s) {
        (Some(fraction), Some(peak)) => {
            format!(
                " = {:.0} % of the measured peak {peak:.0} tx/s",
                fraction * 100.0
            )
        }
        _ => String::new(),
    };
    format!(
        "offered: {offered:.0} tx/s{share}, open loop; achieved {:.0} tx/s committed ({:.1} % of offered)",
        report.total_committed_tx_per_s,
        report.total_committed_tx_per_s * 100.0 / offered
    )
}

/// Prints the report as a human-readable table.
pub fn print_text(report: &BenchReport) {
    let replicas = match report.replicas {
        0 => "unknown".to_string(),
        count => count.to_string(),
    };
    println!(
        "percore bench: {} shard(s), {replicas} replica(s), fsync: {}",
        report.shards, report.fsync
    );
    println!("machine: {}", report.machine);
    println!(
        "load: {} transfers/request, window {}, {} connection(s)/shard, {}% cross-shard, {:.1} s measured",
        report.records_per_request,
        report.window,
        report.connections_per_shard,
        report.cross_shard_percent,
        report.duration_s
    );
    println!("{}", offered_line(report));
    println!("committed: {}", report.committed_source);
    println!(
        "{:>6} {:>5} {:>7} {:>16} {:>14} {:>10} {:>12}",
        "shard", "core", "leader", "committed tx/s", "acked tx/s", "batches", "mean batch"
    );
    for row in &report.per_shard {
        println!(
            "{:>6} {:>5} {:>7} {:>16.0} {:>14.0} {:>10} {:>12.1}",
            row.shard,
            row.core
                .map_or_else(|| "-".to_string(), |core| core.to_string()),
            if report.replicas == 0 {
                "-".to_string()
            } else {
                row.leader_replica.to_string()
            },
            row.committed_tx_per_s,
            row.acknowledged_tx_per_s,
            row.batches,
            row.mean_batch_entries
        );
    }
    println!(
        "{:>6} {:>5} {:>7} {:>16.0}",
        "total", "", "", report.total_committed_tx_per_s
    );
    let l = &report.request_latency_us;
    println!(
        "request latency (client observed, µs): p50 {} p99 {} p999 {} max {} ({} requests)",
        l.p50, l.p99, l.p999, l.max, report.requests_measured
    );
    if let Some(unsent) = report.requests_unsent_at_end.filter(|&unsent| unsent > 0) {
        println!(
            "behind the offered rate: {unsent} requests due in the window were not yet sent \
             when it ended (every connection's window full); they count above as answered \
             at its end, a lower bound"
        );
    }
    if let Some(c) = &report.commit_latency_us {
        println!(
            "commit latency (leader stage to quorum commit, µs, bucket upper bounds): p50 {} p99 {} p999 {} ({} ops)",
            at_most(c.p50_at_most),
            at_most(c.p99_at_most),
            at_most(c.p999_at_most),
            c.samples
        );
    }
    if report.replicas > 1 {
        println!(
            "replicated: {} bytes sent between replicas during the window ({:.1} MiB/s)",
            report.bytes_replicated,
            report.bytes_replicated as f64 / report.duration_s / (1 << 20) as f64
        );
    }
    println!(
        "acknowledged {} transfers, {} with a non-Ok result",
        report.acknowledged, report.failed
    );
    if report.leader_follows > 0 {
        println!(
            "leader changes: client connections moved to a new group leader {} time(s) and \
             sent their unanswered requests again (a view change; see the nodes' logs)",
            report.leader_follows
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request of 1,000 transfers a millisecond, from `start`.
    fn one_request_a_ms(start: Instant) -> PaceSchedule {
        PaceSchedule::for_thread(1_000_000.0, 1, 0, 1_000, start)
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn an_open_loop_window_measures_the_requests_due_in_it() {
        let base = Instant::now();
        let window = MeasuredWindow::new(base);
        assert!(!window.contains(base + ms(20)), "not open yet");
        window.open(base + ms(10));
        assert!(!window.contains(base + ms(9)), "due before it opened");
        assert!(window.contains(base + ms(10)));
        assert!(window.contains(base + ms(500)), "open: any later due time");
        window.close(base + ms(110));
        assert!(window.contains(base + ms(109)), "due in it, answered after");
        assert!(!window.contains(base + ms(110)), "due after it closed");
    }

    #[test]
    fn requests_due_in_the_window_and_never_sent_count_from_their_due_time_to_its_end() {
        let start = Instant::now();
        let schedule = one_request_a_ms(start);
        let window = MeasuredWindow::new(start);
        let mut latency = latency_histogram();
        assert_eq!(censor_unsent(&schedule, 0, &window, &mut latency), 0);
        // Open at request 10's due time, closed at request 110's: requests 10..110 due in it.
        window.open(start + ms(10));
        window.close(start + ms(110));
        // Requests 0..50 sent: 50..110 were not, the oldest due 60 ms before the end.
        assert_eq!(censor_unsent(&schedule, 50, &window, &mut latency), 60);
        assert_eq!(latency.len(), 60);
        assert_eq!(
            latency.value_at_quantile(1.0),
            latency.highest_equivalent(60_000)
        );
        assert_eq!(latency.min(), latency.lowest_equivalent(1_000));
        // Requests due before the window are not its to count, sent or not.
        let mut latency = latency_histogram();
        assert_eq!(censor_unsent(&schedule, 5, &window, &mut latency), 100);
        assert_eq!(latency.len(), 100);
        assert_eq!(
            latency.value_at_quantile(1.0),
            latency.highest_equivalent(100_000)
        );
        // All sent: nothing to add.
        let mut latency = latency_histogram();
        assert_eq!(censor_unsent(&schedule, 110, &window, &mut latency), 0);
        assert_eq!(censor_unsent(&schedule, 200, &window, &mut latency), 0);
        assert_eq!(latency.len(), 0);
    }

    #[test]
    fn a_huge_backlog_is_recorded_in_bounded_work_and_never_above_its_latencies() {
        let start = Instant::now();
        // A request every 1 ns: 100 million due in a 100 ms window, none sent.
        let schedule = PaceSchedule::for_thread(1e9, 1, 0, 1, start);
        let window = MeasuredWindow::new(start);
        window.open(start);
        window.close(start + ms(100));
        let mut latency = latency_histogram();
        let unsent = censor_unsent(&schedule, 0, &window, &mut latency);
        assert_eq!(unsent, 100_000_000);
        assert_eq!(latency.len(), unsent);
        // Each run is recorded at its latest-due (shortest) latency: the longest recorded
        // is below the oldest request's 100 ms, by one run's span (about 1.5 µs).
        assert!(latency.max() <= latency.highest_equivalent(100_000));
        assert!(latency.max() >= latency.lowest_equivalent(99_990));
        assert_eq!(
            latency.min(),
            1,
            "the newest due a nanosecond before the end"
        );
    }

    /// An overloaded open-loop run's latencies grow with its backlog: minutes are recorded
    /// as measured (the histogram recorded a latency over 67 s as 60 s).
    #[test]
    fn latencies_of_minutes_are_recorded_as_measured() {
        let mut histogram = latency_histogram();
        for micros in [66_000_000, 90_000_000, 1_800_000_000] {
            histogram.saturating_record(micros);
        }
        let max = histogram.max();
        assert!(
            (1_799_000_000..=1_801_000_000).contains(&max),
            "max {max} µs"
        );
        histogram.saturating_record(2 * LATENCY_RECORDED_MAX_US);
        assert!(histogram.max() >= LATENCY_RECORDED_MAX_US);
    }

    #[test]
    fn bucket_quantiles_name_the_bucket_upper_bound() {
        let mut counts = [0u64; BUCKETS];
        counts[3] = 98; // <= 100 µs
        let one_ms = LATENCY_BUCKETS_US.iter().position(|b| *b == 1_000).unwrap();
        counts[one_ms] = 1; // <= 1 ms
        counts[BUCKETS - 1] = 1; // overflow
        assert_eq!(bucket_quantile(&counts, 0.50), Some(100));
        assert_eq!(bucket_quantile(&counts, 0.99), Some(1_000));
        assert_eq!(bucket_quantile(&counts, 0.999), None);
        assert_eq!(
            at_most(None),
            format!(">{}", LATENCY_BUCKETS_US[LATENCY_BUCKETS_US.len() - 1])
        );
    }

    #[test]
    fn the_next_transfer_id_base_stays_in_its_bits_and_differs() {
        let field = u128::from(u32::MAX) << 64;
        for base in [0, 7 << 64, field] {
            let next = next_id_base(base);
            assert_eq!(next & !field, 0, "{next:#x} left bits 64..96");
            assert_ne!(next, base);
        }
        assert_eq!(next_id_base(field), 0, "wraps within the field");
    }

    #[test]
    fn cumulative_buckets_become_per_bucket_counts() {
        let mut cumulative = vec![0u64; BUCKETS];
        cumulative[1] = 2;
        for bucket in &mut cumulative[2..] {
            *bucket = 5;
        }
        let counts = per_bucket(&cumulative);
        assert_eq!(counts[..3], [0, 2, 3]);
        assert_eq!(counts.iter().sum::<u64>(), 5);
    }
}
