//! The `percore` command line: run a node, or benchmark one.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use percore_engine::batch::BatchLimits;
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_shards::loadgen::{self, BenchConfig};
use percore_shards::runtime::{self, Node, NodeConfig};

/// percore: a thread-per-core, shared-nothing transaction engine.
#[derive(Debug, Parser)]
#[command(name = "percore", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: one pinned shard per core, serving clients until SIGINT/SIGTERM.
    Node(NodeArgs),
    /// Start a node on this machine, drive transfers at it over loopback, and print
    /// per-core committed TPS and latency percentiles.
    Bench(BenchArgs),
}

/// Shard layout, limits and sizes shared by `node` and `bench`.
#[derive(Debug, Args, Clone)]
struct ShardArgs {
    /// CPU cores to run shards on, one shard per core (e.g. 0,1). Default: every online core.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Largest number of transfers in one batch (entries).
    #[arg(long, default_value_t = percore_engine::limits::BATCH_ENTRIES_MAX_DEFAULT)]
    batch_entries_max: usize,
    /// Largest number of record bytes in one batch (bytes).
    #[arg(long, default_value_t = percore_engine::batch::BATCH_BYTES_MAX_DEFAULT)]
    batch_bytes_max: usize,
    /// Longest time the adaptive batcher may wait to fill a batch (microseconds; 0: never wait).
    #[arg(long, default_value_t = percore_engine::batch::LINGER_US_MAX_DEFAULT)]
    linger_us: u64,
    /// Transaction pool slots per shard (records accepted and not yet sealed).
    #[arg(long, default_value_t = percore_engine::limits::POOL_TRANSACTIONS_DEFAULT)]
    transactions: usize,
    /// Batch buffers per shard (sealed and not yet applied).
    #[arg(long, default_value_t = percore_engine::limits::POOL_BATCHES_DEFAULT)]
    batches: usize,
    /// Client connections served at once per shard.
    #[arg(long, default_value_t = runtime::CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// io_uring registered memory per shard (KiB); counts against RLIMIT_MEMLOCK.
    #[arg(long, default_value_t = runtime::IO_MEMORY_BYTES_DEFAULT / 1024)]
    io_memory_kib: usize,
    /// Accounts each shard can hold.
    #[arg(long, default_value_t = 1_000_000)]
    accounts_max: usize,
    /// Transfers each shard can hold (kept for idempotency).
    #[arg(long, default_value_t = 16_000_000)]
    transfers_max: usize,
}

impl ShardArgs {
    fn node_config(&self) -> NodeConfig {
        let cores = if self.cores.is_empty() {
            (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
        } else {
            self.cores.clone()
        };
        let batch = BatchLimits {
            entries_max: self.batch_entries_max,
            bytes_max: self.batch_bytes_max,
            linger_us_max: self.linger_us,
            ..BatchLimits::default()
        };
        NodeConfig {
            cores,
            batch,
            frame_bytes_max: percore_engine::frame::FRAME_HEADER_BYTES
                + self.batch_entries_max * 128,
            transactions: self.transactions,
            batches: self.batches,
            connections_max: self.connections_max,
            io_memory_bytes: self.io_memory_kib * 1024,
            ..NodeConfig::default()
        }
    }
}

#[derive(Debug, Args)]
struct NodeArgs {
    #[command(flatten)]
    shards: ShardArgs,
    /// Address the client listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Shard i listens for clients on client-port-base + i.
    #[arg(long, default_value_t = runtime::CLIENT_PORT_BASE_DEFAULT)]
    client_port_base: u16,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    shards: ShardArgs,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Transfers per request frame.
    #[arg(long, default_value_t = 1_000)]
    records_per_request: usize,
    /// Requests in flight per client connection.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Client connections (one thread each) per shard.
    #[arg(long, default_value_t = 1)]
    connections_per_shard: usize,
    /// Accounts created per shard.
    #[arg(long, default_value_t = 10_000)]
    accounts_per_shard: usize,
    /// Percentage of transfers whose credit account lives on another shard (0-100).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    cross_shard_percent: u32,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,percore=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn run_node(args: NodeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = args.shards.node_config();
    config.listen = args.listen;
    config.client_port_base = args.client_port_base;
    let shards = config.cores.len();
    let ledger = LedgerConfig {
        shard_index: 0,
        shard_count: shards as u32,
        accounts_max: args.shards.accounts_max,
        transfers_max: args.shards.transfers_max,
        credit_legs_max: args.shards.transfers_max,
        batch_entries_max: config.batch.entries_max,
    };
    let seed = runtime::random_seed();
    let node = Node::start(config.clone(), move |shard, _| {
        Ledger::with_hash_seed(
            LedgerConfig {
                shard_index: shard as u32,
                ..ledger
            },
            seed,
        )
    })?;
    let stop = node.stop_flag();
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let metrics_thread = match args.metrics {
        Some(address) => {
            let (bound, handle) =
                percore_shards::metrics::serve(address, node.metrics().to_vec(), stop.clone())?;
            eprintln!("metrics on http://{bound}/metrics");
            Some(handle)
        }
        None => None,
    };
    for (shard, address) in node.client_addresses().iter().enumerate() {
        eprintln!(
            "shard {shard} on core {} serving clients at {address}",
            config.cores[shard]
        );
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("stopping: no new connections, draining accepted transactions");
    let reports = node.wait()?;
    for report in &reports {
        eprintln!("shard {} stopped at op {}", report.shard, report.op_last);
    }
    if let Some(handle) = metrics_thread {
        let _ = handle.join();
    }
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut node = args.shards.node_config();
    node.client_port_base = 0;
    let config = BenchConfig {
        node,
        accounts_per_shard: args.accounts_per_shard,
        transfers_max_per_shard: args.shards.transfers_max,
        warmup: Duration::from_secs(args.warmup_s),
        duration: Duration::from_secs(args.duration_s),
        records_per_request: args.records_per_request,
        window: args.window,
        connections_per_shard: args.connections_per_shard,
        cross_shard_percent: args.cross_shard_percent,
        progress: !args.json,
    };
    let report = loadgen::run(config)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        loadgen::print_text(&report);
    }
    Ok(())
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Node(args) => run_node(args),
        Command::Bench(args) => run_bench(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("percore: error: {err}");
            ExitCode::FAILURE
        }
    }
}
