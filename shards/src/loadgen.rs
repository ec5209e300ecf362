//! The end-to-end load generator behind `percore bench`.
//!
//! It starts a node (in-process, one pinned executor per core, real io_uring sockets on
//! loopback), creates accounts on every shard through the client protocol, funds them, then
//! drives transfers from client threads that each keep a window of requests in flight on
//! their own connection to one shard. It reports per-core committed TPS measured from the
//! shards' own applied counters over the measurement window, client-observed request latency
//! percentiles (HdrHistogram), and the batch sizes the adaptive batcher chose.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use percore_engine::frame;
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_engine::record::{Account, RecordResult, Transfer, account_flags, shard_of};
use percore_net::client::{Client, ClientConfig, ClientError, Pipeline};
use serde::Serialize;

use crate::metrics::{LATENCY_BUCKETS_US, ShardMetrics};
use crate::runtime::{Node, NodeConfig, NodeError};

/// Ledger id every benchmark account and transfer uses.
const LEDGER_ID: u32 = 1;
/// Account id space: shard-owned ids are searched from here upwards.
const ACCOUNT_ID_BASE: u128 = 1 << 64;

/// What `percore bench` runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Node configuration (cores, batch limits, pools...).
    pub node: NodeConfig,
    /// Ledger sizes of every shard (`shard_index` is set per shard).
    pub ledger: LedgerConfig,
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
    /// Print a progress line every second.
    pub progress: bool,
    /// The fsync policy in effect, as the report states it.
    pub fsync: &'static str,
}

/// Per-shard results.
#[derive(Debug, Clone, Serialize)]
pub struct ShardRow {
    /// Shard index.
    pub shard: usize,
    /// CPU core the shard ran on.
    pub core: usize,
    /// Client transfers applied by this shard during the window, per second (credit legs
    /// and acknowledgements between shards are not counted).
    pub committed_tx_per_s: f64,
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
    /// Replicas (1 until replication lands).
    pub replicas: usize,
    /// Journal fsync policy in effect.
    pub fsync: &'static str,
    /// Shards (cores).
    pub shards: usize,
    /// Seconds measured.
    pub duration_s: f64,
    /// Transfers applied per second, all shards.
    pub total_committed_tx_per_s: f64,
    /// Per-shard rows.
    pub per_shard: Vec<ShardRow>,
    /// Transfers acknowledged to clients during the window.
    pub acknowledged: u64,
    /// Acknowledged transfers whose result was not `Ok`.
    pub failed: u64,
    /// Client-observed request latency percentiles (µs): p50, p99, p999, max.
    pub request_latency_us: LatencyRow,
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
#[derive(Debug, Clone, Serialize)]
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

/// Benchmark failures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// A client failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Setup went wrong (accounts not created...).
    #[error("setup: {0}")]
    Setup(String),
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

/// Creates `accounts_per_shard` accounts on every shard plus one mint account (allowed to go
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
            if let Some(bad) = results.iter().find(|r| r.code != 0) {
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
            if let Some(bad) = results.iter().find(|r| r.code != 0) {
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
    addresses: &[SocketAddr],
    per_shard: usize,
) -> Result<Vec<Vec<u128>>, BenchError> {
    let mut client = Client::new(ClientConfig::new(addresses.to_vec(), 1));
    client.ping_all(Instant::now() + Duration::from_secs(10))?;
    let owned = create_funded_accounts(&mut client, per_shard, 1 << 40)?;
    Ok(owned.into_iter().map(|ids| ids[1..].to_vec()).collect())
}

struct LoadThreadReport {
    acknowledged: u64,
    failed: u64,
    latency: Histogram<u64>,
}

/// One client thread: a pipelined connection to one shard, `window` requests in flight.
#[allow(clippy::too_many_arguments)]
fn load_thread(
    thread: usize,
    shard: usize,
    address: SocketAddr,
    accounts: Arc<Vec<Vec<u128>>>,
    config: BenchConfig,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acknowledged_live: Arc<AtomicU64>,
) -> Result<LoadThreadReport, ClientError> {
    let shards = accounts.len();
    let mut pipeline = Pipeline::connect(
        shard,
        address,
        1_000 + thread as u128,
        frame::FRAME_BYTES_MAX_DEFAULT,
        Duration::from_secs(30),
    )?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut rng = (thread as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next_random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let local = &accounts[shard];
    let mut records = vec![<Transfer as bytemuck::Zeroable>::zeroed(); config.records_per_request];
    let mut sent_at = std::collections::VecDeque::with_capacity(config.window);
    let mut request_number = 0u64;
    let mut transfer_id = ((thread as u128 + 1) << 96) | (1 << 127);
    let (mut acknowledged, mut failed) = (0u64, 0u64);
    loop {
        while pipeline.in_flight() < config.window && !stop.load(Ordering::Relaxed) {
            for record in records.iter_mut() {
                let r = next_random();
                let debit = local[(r as usize) % local.len()];
                let cross = shards > 1 && ((r >> 32) % 100) < u64::from(config.cross_shard_percent);
                let credit_shard = if cross {
                    (shard + 1 + (r >> 40) as usize % (shards - 1)) % shards
                } else {
                    shard
                };
                let pool = &accounts[credit_shard];
                let mut credit = pool[((r >> 20) as usize) % pool.len()];
                if credit == debit {
                    credit = pool[(((r >> 20) as usize) + 1) % pool.len()];
                }
                transfer_id += 1;
                *record = transfer(transfer_id, debit, credit, 1);
            }
            request_number += 1;
            pipeline.send(
                frame::Operation::CreateTransfers.into(),
                request_number,
                &records,
            )?;
            sent_at.push_back(Instant::now());
        }
        if pipeline.in_flight() == 0 {
            break;
        }
        let reply = pipeline.receive(size_of::<RecordResult>())?;
        let started = sent_at.pop_front().expect("one per request");
        let results: &[u8] = reply.body;
        let count = results.len() / size_of::<RecordResult>();
        if measuring.load(Ordering::Relaxed) {
            let micros = started.elapsed().as_micros() as u64;
            latency.saturating_record(micros.max(1));
            acknowledged += count as u64;
            failed += results
                .chunks_exact(size_of::<RecordResult>())
                .filter(|chunk| bytemuck::pod_read_unaligned::<RecordResult>(chunk).code != 0)
                .count() as u64;
        }
        acknowledged_live.fetch_add(count as u64, Ordering::Relaxed);
    }
    Ok(LoadThreadReport {
        acknowledged,
        failed,
        latency,
    })
}

fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

struct Snapshot {
    applied: Vec<u64>,
    internal: Vec<u64>,
    batches: Vec<u64>,
    batch_sizes: Vec<[u64; LATENCY_BUCKETS_US.len() + 1]>,
}

fn snapshot(metrics: &[Arc<ShardMetrics>]) -> Snapshot {
    Snapshot {
        applied: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.tx_applied_total))
            .collect(),
        internal: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.internal_applied_total))
            .collect(),
        batches: metrics
            .iter()
            .map(|m| ShardMetrics::get(&m.batches_sealed_total))
            .collect(),
        batch_sizes: metrics.iter().map(|m| m.batch_size.buckets()).collect(),
    }
}

/// Batches sealed during the window by size bucket, all shards.
fn batch_size_distribution(before: &Snapshot, after: &Snapshot) -> Vec<BatchSizeBucket> {
    (0..=LATENCY_BUCKETS_US.len())
        .map(|index| BatchSizeBucket {
            entries_at_most: LATENCY_BUCKETS_US.get(index).copied(),
            batches: after
                .batch_sizes
                .iter()
                .zip(&before.batch_sizes)
                .map(|(a, b)| a[index] - b[index])
                .sum(),
        })
        .filter(|bucket| bucket.batches > 0)
        .collect()
}

/// Runs the benchmark end to end and returns what it measured.
pub fn run(config: BenchConfig) -> Result<BenchReport, BenchError> {
    let shards = config.node.cores.len();
    let ledger = config.ledger;
    let seed = crate::runtime::random_seed();
    let node = Node::start(config.node.clone(), move |shard, _| {
        Ledger::with_hash_seed(
            LedgerConfig {
                shard_index: shard as u32,
                ..ledger
            },
            seed,
        )
    })?;
    let addresses = node.client_addresses().to_vec();
    let accounts = Arc::new(setup_accounts(&addresses, config.accounts_per_shard)?);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged_live = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (shard, &address) in addresses.iter().enumerate() {
        for k in 0..config.connections_per_shard {
            let thread = shard * config.connections_per_shard + k;
            let (accounts, config, measuring, stop, live) = (
                accounts.clone(),
                config.clone(),
                measuring.clone(),
                stop.clone(),
                acknowledged_live.clone(),
            );
            threads.push(std::thread::spawn(move || {
                load_thread(
                    thread, shard, address, accounts, config, measuring, stop, live,
                )
            }));
        }
    }
    std::thread::sleep(config.warmup);
    let before = snapshot(node.metrics());
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last_ack = acknowledged_live.load(Ordering::Relaxed);
    while started.elapsed() < config.duration {
        let left = config.duration.saturating_sub(started.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(1)));
        if config.progress {
            let ack = acknowledged_live.load(Ordering::Relaxed);
            eprintln!(
                "  {:>5.1}s  {:>12.0} tx/s acknowledged",
                started.elapsed().as_secs_f64(),
                (ack - last_ack) as f64
            );
            last_ack = ack;
        }
    }
    let after = snapshot(node.metrics());
    let elapsed = started.elapsed().as_secs_f64();
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let (mut acknowledged, mut failed) = (0, 0);
    for thread in threads {
        let report = thread
            .join()
            .map_err(|_| BenchError::Setup("load thread panicked".into()))??;
        acknowledged += report.acknowledged;
        failed += report.failed;
        latency.add(&report.latency).expect("same bounds");
    }
    let cores = config.node.cores.clone();
    node.shutdown()?;
    let per_shard: Vec<ShardRow> = (0..shards)
        .map(|shard| {
            let applied = after.applied[shard] - before.applied[shard];
            let internal = after.internal[shard] - before.internal[shard];
            let batches = after.batches[shard] - before.batches[shard];
            ShardRow {
                shard,
                core: cores[shard],
                committed_tx_per_s: applied as f64 / elapsed,
                batches,
                mean_batch_entries: if batches == 0 {
                    0.0
                } else {
                    (applied + internal) as f64 / batches as f64
                },
            }
        })
        .collect();
    Ok(BenchReport {
        benchmark: "percore-bench",
        replicas: 1,
        fsync: config.fsync,
        shards,
        duration_s: elapsed,
        total_committed_tx_per_s: per_shard.iter().map(|row| row.committed_tx_per_s).sum(),
        per_shard,
        acknowledged,
        failed,
        request_latency_us: LatencyRow {
            p50: latency.value_at_quantile(0.50),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
        },
        batch_sizes: batch_size_distribution(&before, &after),
        records_per_request: config.records_per_request,
        window: config.window,
        connections_per_shard: config.connections_per_shard,
        cross_shard_percent: config.cross_shard_percent,
        machine: machine_description(),
    })
}

/// Prints the report as a human-readable table.
pub fn print_text(report: &BenchReport) {
    println!(
        "percore bench: {} shard(s), {} replica(s), fsync: {}",
        report.shards, report.replicas, report.fsync
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
    println!(
        "{:>6} {:>5} {:>16} {:>10} {:>12}",
        "shard", "core", "committed tx/s", "batches", "mean batch"
    );
    for row in &report.per_shard {
        println!(
            "{:>6} {:>5} {:>16.0} {:>10} {:>12.1}",
            row.shard, row.core, row.committed_tx_per_s, row.batches, row.mean_batch_entries
        );
    }
    println!(
        "{:>6} {:>5} {:>16.0}",
        "total", "", report.total_committed_tx_per_s
    );
    let l = &report.request_latency_us;
    println!(
        "request latency (client observed, µs): p50 {} p99 {} p999 {} max {}",
        l.p50, l.p99, l.p999, l.max
    );
    println!(
        "acknowledged {} transfers, {} with a non-Ok result",
        report.acknowledged, report.failed
    );
}
