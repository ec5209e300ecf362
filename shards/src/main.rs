//! The `percore` command line: run a node, or benchmark one.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use percore_engine::batch::BatchLimits;
use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_engine::session::Sessioned;
use percore_shards::loadgen::{self, BenchConfig};
use std::path::PathBuf;

use percore_shards::bft::{BftSettings, Byzantine, FaultModel};
use percore_shards::journal::FsyncPolicy;
use percore_shards::replication::{self, ReplicationSettings};
use percore_shards::runtime::{self, JournalSettings, Node, NodeConfig};

/// Writes one line to stderr, ignoring errors: an operator closing the terminal or a log
/// pipe must not turn a clean shutdown into a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
    /// Create a replica's data directory, once, before its first start: takes the arguments
    /// of `node`. A replica (--peers, or --fault-model bft) refuses to start on a directory
    /// that was not formatted, and after its first start never creates a missing journal:
    /// an empty one would forget what it acknowledged. `--replace` formats a replica that
    /// ran and lost its disk: it rebuilds from its peers before it votes.
    Format(FormatArgs),
    /// Start a node on this machine, drive transfers at it over loopback, and print
    /// per-core committed TPS and latency percentiles.
    Bench(BenchArgs),
    /// Read a data directory offline: superblocks, segments, entries, checksums and the
    /// first problem found (exit status 1 if there is one).
    Inspect(InspectArgs),
    /// Write a new random 256-bit cluster key (64 hex digits) for `node --cluster-key-file`.
    ClusterKey(ClusterKeyArgs),
    /// BFT mode: write one ed25519 secret-key file per replica (replica-N.key, mode 0600)
    /// and the cluster file listing every public key (cluster.keys) into a new directory.
    Keygen(KeygenArgs),
    /// Scrape every node's metrics twice and print, per node and shard: role, view, commit
    /// op, durable op, peer lag and connections, TPS and the peers digest (exit status 1 if
    /// a node is down or the peers digests differ).
    Status(StatusArgs),
    /// Read a `bench --series-out` file and say where its slow seconds came from: the
    /// per-second latency percentiles, the seconds split by CPU steal and by checkpoint
    /// work, and each second with a p99 over 10 ms with its slowest journal commit,
    /// executor lag, steal and checkpoint work.
    Series(SeriesArgs),
}

#[derive(Debug, Args)]
struct SeriesArgs {
    /// The series file (one JSON object per line, as `bench --series-out` writes it).
    file: PathBuf,
    /// Leave out the seconds before this one, in seconds into the measurement window
    /// (the bench's own warm-up is never in the series).
    #[arg(long, default_value_t = 0.0)]
    from_s: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `percore series`.
fn run_series(args: SeriesArgs) -> Result<(), Box<dyn std::error::Error>> {
    use percore_shards::series_report;
    let series = series_report::read(&args.file)?;
    let summary = series_report::summarize(&series, args.from_s);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", series_report::render_text(&summary, args.from_s));
    }
    Ok(())
}

/// Shard layout, limits and sizes shared by `node` and `bench`.
#[derive(Debug, Args, Clone)]
struct ShardArgs {
    /// CPU cores to run shards on, one shard per core (e.g. 0,1). Default: every core this
    /// process may run on (its CPU affinity).
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
    /// Run two or more shards on one core (the local benchmark on a small machine).
    #[arg(long)]
    allow_shared_cores: bool,
    /// Interval of each shard's executor lag probe, a timer that measures how late the
    /// executor gets to it (`percore_executor_lag_us`; microseconds, 0: off). 1000 sees
    /// every stall over 1 ms, at a cost (docs/operations.md).
    #[arg(long, default_value_t = percore_shards::metrics::EXECUTOR_PROBE_INTERVAL_US_DEFAULT)]
    executor_probe_us: u64,
    #[command(flatten)]
    ledger: LedgerArgs,
}

/// Sizes of the reference ledger on each shard.
#[derive(Debug, Args, Clone, Copy)]
struct LedgerArgs {
    /// Accounts each shard can hold.
    #[arg(long, default_value_t = 100_000)]
    accounts_max: usize,
    /// Transfers each shard remembers for duplicate-id detection (a sliding window of the
    /// most recent ones; about 160 bytes each, allocated at start-up).
    #[arg(long, default_value_t = 1_000_000)]
    transfers_max: usize,
    /// Cross-shard credit legs each shard may have in flight (unacknowledged) at once.
    #[arg(long, default_value_t = 65_536)]
    credit_legs_max: usize,
    /// Client sessions each shard keeps (replicated state): a retried request of a client
    /// with a session is applied once and answered with its original reply. Each holds 4
    /// replies of up to one batch (about 32 KiB at the default batch size). Every replica of
    /// a cluster must use the same value.
    #[arg(long, default_value_t = percore_engine::session::SESSION_CLIENTS_MAX_DEFAULT)]
    session_clients_max: usize,
}

/// `value` must lie in `min..=max`; the error names the flag and the config key.
fn in_range(flag: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        return Ok(());
    }
    let key = flag.trim_start_matches("--").replace('-', "_");
    Err(format!(
        "{flag} (config key {key}) = {value}: must be between {min} and {max}"
    ))
}

impl LedgerArgs {
    /// The ranges the ledger and the session table need, refused by name before a shard
    /// allocates (they asserted on the shard's thread, which aborts a release build).
    fn check(&self, batch_entries_max: usize) -> Result<(), String> {
        use percore_engine::ledger::{
            ACCOUNTS_MAX_LIMIT, CREDIT_LEGS_IN_FLIGHT_MAX_LIMIT, TRANSFERS_MAX_LIMIT,
        };
        let limit = |value: usize| value as u64;
        in_range(
            "--accounts-max",
            limit(self.accounts_max),
            1,
            limit(ACCOUNTS_MAX_LIMIT),
        )?;
        in_range(
            "--transfers-max",
            limit(self.transfers_max),
            1,
            limit(TRANSFERS_MAX_LIMIT),
        )?;
        in_range(
            "--credit-legs-max",
            limit(self.credit_legs_max),
            1,
            limit(CREDIT_LEGS_IN_FLIGHT_MAX_LIMIT),
        )?;
        in_range(
            "--session-clients-max",
            limit(self.session_clients_max),
            1,
            u64::from(u32::MAX),
        )?;
        in_range(
            "--batch-entries-max",
            limit(batch_entries_max),
            1,
            limit(percore_engine::limits::BATCH_ENTRIES_MAX_LIMIT),
        )
    }

    fn config(&self, shard_count: usize, batch_entries_max: usize) -> LedgerConfig {
        loadgen::ledger_config(
            shard_count,
            self.accounts_max,
            self.transfers_max,
            self.credit_legs_max,
            batch_entries_max,
        )
    }
}

/// Where and how shards journal their batches.
#[derive(Debug, Args, Clone)]
struct JournalArgs {
    /// Data directory: shard i journals under DATA_DIR/shard-`i`/.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// When a batch counts as durable: `always` fdatasyncs every group commit; `dsync` opens
    /// the segments O_DSYNC, so each commit's write is durable by itself (no fdatasync; a
    /// disk with FUA writes may finish it sooner); `never` is for benchmarks only (a power
    /// loss loses acknowledged transactions).
    #[arg(long, value_enum, default_value_t = FsyncPolicy::Always)]
    fsync: FsyncPolicy,
    /// Size of one journal segment file (MiB).
    #[arg(long, default_value_t = 1024)]
    segment_mib: u64,
    /// Take a checkpoint (state snapshot; old journal segments are then removed) once every
    /// this many ops (0: never, the journal grows without bound). Shard k of S checkpoints
    /// k x interval / S ops before the multiples of the interval, so that the shards of a
    /// node do not all write a snapshot at once.
    #[arg(long, default_value_t = runtime::CHECKPOINT_INTERVAL_OPS_DEFAULT)]
    checkpoint_interval_ops: u64,
    /// Snapshot file writes of all the node's checkpoint followers together (MiB/s): one
    /// budget shared by the shards, so that checkpoints do not crowd out the journals'
    /// writes on the disk.
    #[arg(
        long,
        default_value_t = percore_shards::checkpoint::SNAPSHOT_WRITE_MIB_PER_S_DEFAULT,
        value_parser = clap::value_parser!(u64).range(1..=1 << 20)
    )]
    snapshot_write_mib_per_s: u64,
    /// Cluster identity recorded in each shard's superblock (hex); another cluster's data
    /// directory is refused.
    #[arg(long, default_value = "1", value_parser = parse_cluster_id)]
    cluster_id: u128,
    /// Zero-fill the next journal segment in the background, ahead of its use, so that
    /// appends overwrite written blocks and their `fdatasync` commits no file system
    /// metadata. Costs every journal byte written twice and one more segment of disk per
    /// shard; on the 2-vCPU reference VM it did not pay (docs/benchmarks.md, "Journal
    /// segments written ahead"). Default: each segment is created by `fallocate` at its
    /// roll-over (config key `segment_spare = true`).
    #[arg(long)]
    segment_spare: bool,
}

fn parse_cluster_id(text: &str) -> Result<u128, String> {
    u128::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|err| format!("not a hex cluster id: {err}"))
}

impl JournalArgs {
    fn settings(&self, data_dir: PathBuf) -> JournalSettings {
        JournalSettings {
            data_dir,
            fsync: self.fsync,
            segment_bytes: self.segment_mib << 20,
            cluster_id: self.cluster_id,
            checkpoint_interval_ops: self.checkpoint_interval_ops,
            snapshot_write_bytes_per_s: self.snapshot_write_mib_per_s << 20,
            segment_spare: self.segment_spare,
        }
    }
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// The node's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Also replay each shard's journal into a reference ledger and print every account's
    /// balance and the conservation sum.
    #[arg(long)]
    replay: bool,
    /// Largest batch the journal may hold (entries).
    #[arg(long, default_value_t = percore_engine::limits::BATCH_ENTRIES_MAX_LIMIT)]
    batch_entries_max: usize,
    #[command(flatten)]
    ledger: LedgerArgs,
}

impl ShardArgs {
    /// Values a flag's parser cannot judge alone (or that a config file gave, which no
    /// parser saw): refused by name before anything starts.
    fn check(&self) -> Result<(), String> {
        self.ledger.check(self.batch_entries_max)?;
        in_range(
            "--batch-bytes-max",
            self.batch_bytes_max as u64,
            percore_engine::record::RECORD_BYTES as u64,
            u64::MAX,
        )?;
        in_range("--transactions", self.transactions as u64, 1, u64::MAX)?;
        in_range("--batches", self.batches as u64, 1, u64::MAX)?;
        in_range(
            "--connections-max",
            self.connections_max as u64,
            1,
            runtime::CONNECTIONS_MAX_LIMIT as u64,
        )?;
        Ok(())
    }

    fn node_config(&self) -> NodeConfig {
        // Default: every core this process may run on (its affinity mask: a unit's
        // CPUAffinity, a cpuset), not every online one.
        let cores = if self.cores.is_empty() {
            percore_shards::config::cpus_allowed().map_or_else(
                || (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
                |(_, allowed)| allowed,
            )
        } else {
            self.cores.clone()
        };
        let batch = BatchLimits {
            entries_max: self.batch_entries_max,
            bytes_max: self.batch_bytes_max,
            linger_us_max: self.linger_us,
            // The default floor of the adaptive batch size, never above the ceiling (a
            // `--batch-entries-max` below 16 was refused naming this hidden value).
            entries_min: BatchLimits::default()
                .entries_min
                .min(self.batch_entries_max),
        };
        NodeConfig {
            cores,
            batch,
            // A full batch of records, and a BFT client's signature after them.
            frame_bytes_max: percore_engine::frame::FRAME_HEADER_BYTES
                + self.batch_entries_max * 128
                + percore_engine::frame::SIGNATURE_TRAILER_BYTES,
            transactions: self.transactions,
            batches: self.batches,
            connections_max: self.connections_max,
            io_memory_bytes: self.io_memory_kib * 1024,
            allow_shared_cores: self.allow_shared_cores,
            executor_probe_interval_us: self.executor_probe_us,
            ..NodeConfig::default()
        }
    }
}

#[derive(Debug, Args)]
struct FormatArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// This replica ran before and lost its disk (crash-fault mode): format it to take its
    /// own place. At its first start every shard neither acknowledges nor votes until it
    /// has heard the view of a majority of the other replicas and installed a log at least
    /// that new from its group's leader (docs/protocol.md 8; docs/operations.md, "A
    /// replica lost its disk"). Needs every group's leader and at least f + 1 other
    /// replicas up (with 3 replicas: both others).
    #[arg(long)]
    replace: bool,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// Read settings from this TOML file: its keys are these flags with underscores (e.g.
    /// client_port_base = 7000); a flag given on the command line overrides the file.
    #[arg(long)]
    config: Option<PathBuf>,
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
    #[command(flatten)]
    journal: JournalArgs,
    #[command(flatten)]
    replication: ReplicationArgs,
    #[command(flatten)]
    bft: BftArgs,
}

/// Byzantine fault tolerance (docs/bft.md).
#[derive(Debug, Args, Clone)]
struct BftArgs {
    /// Faults each replication group tolerates: `crash` (Viewstamped Replication, 2f + 1
    /// replicas) or `bft` (PBFT-shaped, n >= 3f + 1 replicas, ed25519-signed votes, each
    /// shard its own group, transfers between shards refused; needs --bft-keys-dir).
    #[arg(long, value_enum, default_value_t = FaultModel::Crash)]
    fault_model: FaultModel,
    /// BFT: the directory `percore keygen` wrote: this node reads replica-`replica`.key and
    /// cluster.keys from it.
    #[arg(long)]
    bft_keys_dir: Option<PathBuf>,
    /// TESTS ONLY: make this replica Byzantine on purpose (equivocate: conflicting signed
    /// proposals and votes; silent: sends nothing; wrong-digest: votes for digests that are
    /// not the batch's; corrupt-snapshot: flips a byte of every snapshot chunk it serves;
    /// invalid-batch: admits requests correct replicas refuse, such as records of another
    /// shard, and proposes them as leader;
    /// forge-request: as leader, adds a request no client signed to each proposal;
    /// forge-leg: as leader, proposes other groups' outputs with a made-up leg;
    /// replay-request: as leader, proposes an old signed request again in each proposal).
    /// All but forge-request, forge-leg and replay-request also lie to clients
    /// (corrupt-snapshot and invalid-batch answer none). Never use in production.
    #[arg(long, value_enum)]
    bft_test_byzantine: Option<Byzantine>,
    /// BFT: journal ops each replica keeps below its stable checkpoint so that peers behind
    /// can fetch them by log (a peer further behind fetches the latest certified snapshot
    /// instead). A knob for tests, which lower it to run out of log quickly; the default
    /// suits production.
    #[arg(
        long,
        default_value_t = percore_shards::bft::BFT_RETAIN_OPS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    bft_retain_ops: u64,
}

impl BftArgs {
    /// The BFT settings of `--fault-model bft`: keys loaded and checked against the peers
    /// (`n >= 3f + 1`, the secret key is this replica's); `outputs_legs_max` is the ledger's
    /// `credit_legs_in_flight_max` (it sizes the outputs collector).
    fn settings(
        &self,
        replication: &ReplicationArgs,
        outputs_legs_max: usize,
    ) -> Result<Option<BftSettings>, Box<dyn std::error::Error>> {
        use percore_engine::bft::keys;
        if self.fault_model == FaultModel::Crash {
            if self.bft_keys_dir.is_some() || self.bft_test_byzantine.is_some() {
                return Err(
                    "--bft-keys-dir and --bft-test-byzantine need --fault-model bft".into(),
                );
            }
            return Ok(None);
        }
        let Some(replica) = replication.replica else {
            return Err("--fault-model bft needs --replica and --peers".into());
        };
        if !replication.view_change {
            return Err("--fixed-view is crash-fault mode's; BFT always changes views".into());
        }
        let dir = self
            .bft_keys_dir
            .as_ref()
            .ok_or("--fault-model bft needs --bft-keys-dir (written by `percore keygen`)")?;
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|error| format!("{}: {error}", path.display()))
        };
        let secret = keys::parse_secret_key(&read(format!("replica-{replica}.key"))?)?;
        if secret.replica != replica {
            return Err(format!(
                "replica-{replica}.key holds the key of replica {}",
                secret.replica
            )
            .into());
        }
        let cluster = keys::parse_cluster(&read("cluster.keys".into())?)?;
        let settings = BftSettings {
            replica,
            peers: replication.peers.clone(),
            keys: replication.peer_keys()?,
            secret_key: secret.key,
            public_keys: cluster.keys,
            faults_max: cluster.faults_max,
            clients: percore_engine::bft::ClientKeys::new(cluster.clients),
            send_queue_bytes: percore_shards::bft::BFT_SEND_QUEUE_BYTES_DEFAULT,
            byzantine: self.bft_test_byzantine,
            retain_ops: self.bft_retain_ops,
            outputs_legs_max,
        };
        settings.check()?;
        Ok(Some(settings))
    }
}

/// Log replication to peer nodes.
#[derive(Debug, Args, Clone)]
struct ReplicationArgs {
    /// This node's replica index: its position in --peers.
    #[arg(long)]
    replica: Option<u8>,
    /// Peer address of every replica, in replica order (shard k listens on port + k), e.g.
    /// 127.0.0.1:7100,127.0.0.1:7200,127.0.0.1:7300. Needs --data-dir and a cluster key.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// File holding the 256-bit cluster key as 64 hex digits (`percore cluster-key`);
    /// default: the PERCORE_CLUSTER_KEY environment variable.
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// During a key rotation only: a second key file, whose key this node also accepts
    /// from a peer it dials (the key before the rotation, or the next one); default: the
    /// PERCORE_CLUSTER_KEY_ACCEPT environment variable, if set. It answers dials with the
    /// cluster key alone (docs/operations.md section 7).
    #[arg(long)]
    cluster_key_accept_file: Option<PathBuf>,
    /// No leader failover: every group keeps its first leader (replica `k mod N`), and a
    /// group whose leader is down stops committing until it returns; the leader then also
    /// makes each group commit durable before it sends it (docs/protocol.md section 0).
    /// By default a silent leader is replaced by a view change (section 7). The same on
    /// every node (config key `view_change = false`).
    #[arg(long = "fixed-view", action = clap::ArgAction::SetFalse)]
    view_change: bool,
    /// Ops below the previous checkpoint kept for a lagging peer (ops). A peer further
    /// behind no longer holds back segment removal: it catches up by state sync (a
    /// checkpoint's snapshot, then the journal after it).
    #[arg(long, default_value_t = replication::RETAIN_OPS_DEFAULT)]
    retain_ops: u64,
    /// Leader rebalancing (crash-fault mode with view change): a group whose leader is not
    /// its preferred one (replica `k mod N`, view 0's) is handed back to it by a view
    /// change once that replica has been connected and caught up this long (ms), so a node
    /// that failed and returned leads its share again. 0: never. At least the leader
    /// timeout (300 ms). BFT mode does not rebalance.
    #[arg(long, default_value_t = replication::LEADER_REBALANCE_MS_DEFAULT)]
    leader_rebalance_ms: u64,
}

impl ReplicationArgs {
    /// The cluster key and the key accepted during a rotation.
    fn peer_keys(&self) -> Result<percore_engine::message::PeerKeys, replication::ClusterKeyError> {
        replication::peer_keys(
            self.cluster_key_file.as_deref(),
            self.cluster_key_accept_file.as_deref(),
        )
    }

    fn settings(&self) -> Result<Option<ReplicationSettings>, Box<dyn std::error::Error>> {
        let Some(replica) = self.replica else {
            return Ok(None);
        };
        let leader_timeout_ms = percore_engine::replica::LEADER_TIMEOUT_US_MAX_DEFAULT / 1_000;
        if self.leader_rebalance_ms != 0 && self.leader_rebalance_ms < leader_timeout_ms {
            return Err(format!(
                "--leader-rebalance-ms {}: 0 (never) or at least the leader timeout, \
                 {leader_timeout_ms} ms",
                self.leader_rebalance_ms
            )
            .into());
        }
        Ok(Some(ReplicationSettings {
            replica,
            peers: self.peers.clone(),
            keys: self.peer_keys()?,
            send_queue_bytes: replication::PEER_SEND_QUEUE_BYTES_DEFAULT,
            view_change: self.view_change,
            retain_ops: self.retain_ops,
            leader_rebalance_ms: self.leader_rebalance_ms,
        }))
    }
}

#[derive(Debug, Args)]
struct ClusterKeyArgs {
    /// Where to write the key (created with mode 0600; an existing file is kept).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Replicas in the group (n).
    #[arg(long)]
    replicas: usize,
    /// Byzantine replicas to tolerate (f); n must be at least 3f + 1. Default: (n - 1) / 3.
    #[arg(long)]
    faults: Option<u8>,
    /// Client keys to write (client-1.key .. client-N.key, listed in cluster.keys): only
    /// these clients can submit requests, each under its own id (1..=N) and signing each
    /// request with its key.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=u64::from(u32::MAX)))]
    clients: usize,
    /// Directory to create (it must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct BenchArgs {
    #[command(flatten)]
    shards: ShardArgs,
    /// `bft`: run the load on a crash-fault cluster (3 replicas) and then on a BFT cluster
    /// (4 replicas, f = 1, a shard on each of --cores) in this one run, and report
    /// both with the signature cost per batch (docs/bft.md). Uses --duration-s,
    /// --warmup-s, --records-per-request, --connections-per-shard (client threads, one
    /// request in flight each), the node sizes and --fsync.
    #[arg(long, value_enum, default_value_t = FaultModel::Crash)]
    fault_model: FaultModel,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Transfers per request frame.
    #[arg(long, default_value_t = 1_000)]
    records_per_request: usize,
    /// Requests in flight per client connection: at most the replies a client session
    /// keeps (4), so that a request resent after a leader change finds its reply.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=percore_engine::session::SESSION_REPLIES_PER_CLIENT as u64))]
    window: usize,
    /// Client connections (one thread each) per shard.
    #[arg(long, default_value_t = 1)]
    connections_per_shard: usize,
    /// Accounts created per shard.
    #[arg(long, default_value_t = 10_000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    accounts_per_shard: usize,
    /// Percentage of transfers whose credit account lives on another shard (0-100).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    cross_shard_percent: u32,
    /// Open loop: offer this many transfers per second in all, split evenly over the client
    /// connections, each sending its requests on a fixed schedule (--window still bounds
    /// those in flight); latency counts from each request's intended send time, so a client
    /// that falls behind records the wait. Default: closed loop, every connection keeps its
    /// window full.
    #[arg(long, value_parser = parse_rate, conflicts_with = "load")]
    rate: Option<f64>,
    /// Open loop at a share of the peak (0 < FRACTION <= 1): first measure the committed
    /// peak with full load for --peak-s seconds (after the warm-up), then offer FRACTION of
    /// it, after a second warm-up, during the measured window.
    #[arg(long, value_parser = parse_fraction)]
    load: Option<f64>,
    /// With --load: seconds of full load that measure the peak. Short windows scatter:
    /// 5-second means of one closed-loop minute ranged over 0.91-1.10 of its mean, so for
    /// a share near 1 measure 30 s or more (docs/benchmarks.md, "How long to measure the
    /// peak").
    #[arg(long, default_value_t = 10, requires = "load")]
    peak_s: u64,
    /// Print the report as one JSON object instead of a table (with a local cluster it
    /// includes the per-second series, as with --series).
    #[arg(long)]
    json: bool,
    /// Local cluster only: every second record committed tx/s, client latency, each
    /// node's RSS, the pool high-water marks and the longest commit gap the leaders
    /// measured themselves (a progress line each on stderr), and summarize RSS growth, the
    /// commit gaps (in-node, and each leader's commit op sampled every 100 ms) and p999.
    #[arg(long)]
    series: bool,
    /// Local cluster only: draw the series (TPS, latency with the longest commit gap of
    /// each second, RSS per node) into this SVG (implies --series); drawn every 30 s while
    /// the run goes on, and once more at its end.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Local cluster only: append each second's point of the series to this file as it is
    /// measured, one JSON object per line (implies --series), so that a run cut short
    /// keeps what it measured (--json writes the whole report only at the end).
    #[arg(long)]
    series_out: Option<PathBuf>,
    /// Run without a journal (measures the in-memory pipeline only; --replicas 1 only:
    /// replication needs a journal, use --fsync never to leave durability out instead).
    #[arg(long, conflicts_with = "data_dir")]
    in_memory: bool,
    /// Replicas per replication group. 1 runs one node in this process; more start a
    /// local cluster of `percore node` child processes (shards share the cores) and load
    /// each group through its leader.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=7))]
    replicas: u8,
    /// First port of the local cluster (replica r: clients on +100r+k, peers on +100r+50+k,
    /// metrics on +100r+99). Default: a free range.
    #[arg(long)]
    port_base: Option<u16>,
    /// Local cluster only: give replica r the cores `--cores` + r x STRIDE (e.g. `--cores
    /// 0,1,2,3 --replica-core-stride 4` puts three replicas on cores 0-11, one shard per
    /// core). Default 0: the replicas share `--cores`, each rotated by one more (replica r
    /// runs shard k on the ((k + r) mod n)-th of them), so a group's replicas spread over
    /// the cores.
    #[arg(long, default_value_t = 0)]
    replica_core_stride: usize,
    /// Keep the benchmark's data directory (default: removed afterwards).
    #[arg(long)]
    keep_data: bool,
    /// Local cluster only: start the nodes with `--fixed-view` (no leader failover; the
    /// leader's journal write then precedes its Prepares instead of overlapping the
    /// followers', docs/protocol.md 6.1).
    #[arg(long)]
    fixed_view: bool,
    /// Load a cluster that is already running instead of starting one: the client address
    /// of each group's leader, one per shard in shard order (e.g.
    /// 10.0.0.1:7000,10.0.0.2:7001,10.0.0.3:7002). Node flags (--cores, --replicas, sizes,
    /// journal) do not apply; accounts are created on the cluster first.
    #[arg(long, value_delimiter = ',')]
    addresses: Vec<SocketAddr>,
    /// With --addresses: every node's metrics address, so committed TPS, batch sizes and
    /// commit latency are read from the group leaders (default: TPS from acknowledgements).
    #[arg(long, value_delimiter = ',', requires = "addresses")]
    metrics_addresses: Vec<SocketAddr>,
    #[command(flatten)]
    journal: JournalArgs,
}

/// `--rate`: a positive, finite number of transfers per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        Ok(_) => Err("the rate must be a positive number of transfers per second".into()),
        Err(err) => Err(format!("not a rate: {err}")),
    }
}

/// `--load`: a share of the peak, 0 < FRACTION <= 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(fraction) if fraction > 0.0 && fraction <= 1.0 => Ok(fraction),
        Ok(_) => Err("the load must be a fraction of the peak, 0 < FRACTION <= 1".into()),
        Err(err) => Err(format!("not a fraction: {err}")),
    }
}

impl BenchArgs {
    /// Whether a flag asks for the per-second series of a local cluster.
    fn wants_series(&self) -> bool {
        self.series || self.plot.is_some() || self.series_out.is_some()
    }

    /// The load `--rate` or `--load` asks for (a closed loop without either).
    fn offered(&self) -> loadgen::Offered {
        match (self.rate, self.load) {
            (Some(tx_per_s), _) => loadgen::Offered::Rate { tx_per_s },
            (None, Some(fraction)) => loadgen::Offered::PeakFraction {
                fraction,
                peak_duration: Duration::from_secs(self.peak_s),
            },
            (None, None) => loadgen::Offered::Full,
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,percore=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `node --config FILE`: every key the file sets applies unless its flag was given on the
/// command line (`matches` are the `node` subcommand's).
fn node_args_with_file(
    mut args: NodeArgs,
    matches: Option<&clap::ArgMatches>,
) -> Result<NodeArgs, Box<dyn std::error::Error>> {
    let (Some(path), Some(matches)) = (args.config.clone(), matches) else {
        return Ok(args);
    };
    // Exhaustive: a key added to the file format does not compile until it is merged here.
    let percore_shards::config::NodeFile {
        cores,
        batch_entries_max,
        batch_bytes_max,
        linger_us,
        transactions,
        batches,
        connections_max,
        io_memory_kib,
        allow_shared_cores,
        executor_probe_us,
        accounts_max,
        transfers_max,
        credit_legs_max,
        session_clients_max,
        listen,
        client_port_base,
        metrics,
        data_dir,
        fsync,
        segment_mib,
        checkpoint_interval_ops,
        snapshot_write_mib_per_s,
        segment_spare,
        cluster_id,
        replica,
        peers,
        cluster_key_file,
        cluster_key_accept_file,
        view_change,
        retain_ops,
        leader_rebalance_ms,
        fault_model,
        bft_keys_dir,
        bft_test_byzantine,
        bft_retain_ops,
    } = percore_shards::config::NodeFile::read(&path)?;
    if cores.as_ref().is_some_and(Vec::is_empty) {
        return Err(format!(
            "{}: cores = []: list at least one core, or leave the key out for every core \
             this process may run on",
            path.display()
        )
        .into());
    }
    let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    macro_rules! merge {
        ($($key:ident => $target:expr),* $(,)?) => {$(
            if let Some(value) = $key {
                if !given(stringify!($key)) {
                    $target = value.into();
                }
            }
        )*};
    }
    merge! {
        cores => args.shards.cores,
        batch_entries_max => args.shards.batch_entries_max,
        batch_bytes_max => args.shards.batch_bytes_max,
        linger_us => args.shards.linger_us,
        transactions => args.shards.transactions,
        batches => args.shards.batches,
        connections_max => args.shards.connections_max,
        io_memory_kib => args.shards.io_memory_kib,
        allow_shared_cores => args.shards.allow_shared_cores,
        executor_probe_us => args.shards.executor_probe_us,
        accounts_max => args.shards.ledger.accounts_max,
        transfers_max => args.shards.ledger.transfers_max,
        credit_legs_max => args.shards.ledger.credit_legs_max,
        session_clients_max => args.shards.ledger.session_clients_max,
        listen => args.listen,
        client_port_base => args.client_port_base,
        metrics => args.metrics,
        data_dir => args.journal.data_dir,
        fsync => args.journal.fsync,
        segment_mib => args.journal.segment_mib,
        checkpoint_interval_ops => args.journal.checkpoint_interval_ops,
        snapshot_write_mib_per_s => args.journal.snapshot_write_mib_per_s,
        segment_spare => args.journal.segment_spare,
        cluster_id => args.journal.cluster_id,
        replica => args.replication.replica,
        peers => args.replication.peers,
        cluster_key_file => args.replication.cluster_key_file,
        cluster_key_accept_file => args.replication.cluster_key_accept_file,
        view_change => args.replication.view_change,
        retain_ops => args.replication.retain_ops,
        leader_rebalance_ms => args.replication.leader_rebalance_ms,
        fault_model => args.bft.fault_model,
        bft_keys_dir => args.bft.bft_keys_dir,
        bft_test_byzantine => args.bft.bft_test_byzantine,
        bft_retain_ops => args.bft.bft_retain_ops,
    }
    say!(
        "config file {} read (flags given on the command line override it)",
        path.display()
    );
    Ok(args)
}

/// The start-up checks and reports that need the whole configuration: every value checked
/// (an error names the key), each shard's core and NUMA node printed, the peers and
/// settings digests printed. Returns the node-level metric samples.
fn node_start_checks(args: &NodeArgs) -> Result<String, Box<dyn std::error::Error>> {
    use percore_shards::config::{self as node_file, PeersDigest, SettingsDigest};
    node_values_check(args)?;
    let node_config = args.shards.node_config();
    let cores = node_config.cores;
    start_check(args).run()?;
    let placements = node_file::placement(&cores);
    for line in node_file::placement_report(&placements) {
        say!("{line}");
    }
    let replicas = args.replication.peers.len().max(1);
    let digest = PeersDigest::of(&args.replication.peers);
    say!(
        "peers digest {digest} ({replicas} replica(s)): every node of the cluster must print the same"
    );
    let ledger = args
        .shards
        .ledger
        .config(cores.len(), node_config.batch.entries_max);
    let mut settings =
        SettingsDigest::of_ledger(cores.len(), &ledger, args.shards.ledger.session_clients_max);
    if args.bft.fault_model == FaultModel::Bft {
        settings = settings.with_bft_batch(
            node_config
                .batch
                .entries_cap(percore_engine::record::RECORD_BYTES),
        );
    }
    if replicas > 1 {
        say!(
            "settings digest {settings} (shards, accounts_max, transfers_max, credit_legs_max, \
             session_clients_max; in BFT mode the batch cap): every node of the cluster must \
             print the same"
        );
    }
    Ok(node_file::render_node_gauges(
        (digest, settings),
        args.replication.replica,
        replicas,
        &placements,
    ))
}

/// The whole-configuration checks of `node` and `format`, for these arguments.
fn start_check(args: &NodeArgs) -> percore_shards::config::StartCheck {
    percore_shards::config::StartCheck {
        cores: args.shards.node_config().cores,
        allow_shared_cores: args.shards.allow_shared_cores,
        listen: args.listen,
        client_port_base: args.client_port_base,
        metrics: args.metrics,
        data_dir: args.journal.data_dir.clone(),
        cluster_id: args.journal.cluster_id,
        replica: args.replication.replica,
        peers: args.replication.peers.clone(),
    }
}

/// Every value `node` and `format` take that no flag parser judged: a config file's values
/// skip the parsers, and some limits depend on others. An error names the flag and key.
fn node_values_check(args: &NodeArgs) -> Result<(), String> {
    args.shards.check()?;
    in_range("--segment-mib", args.journal.segment_mib, 1, 1 << 20)?;
    in_range(
        "--snapshot-write-mib-per-s",
        args.journal.snapshot_write_mib_per_s,
        1,
        1 << 20,
    )?;
    in_range("--bft-retain-ops", args.bft.bft_retain_ops, 1, u64::MAX)?;
    if args.journal.data_dir.is_some() {
        journal_entry_check(&args.shards.node_config().batch)?;
    }
    Ok(())
}

/// With a journal, one batch is one entry, which must fit the journal's write buffer: the
/// batch limits are refused by name here rather than by the journal at the shards' start.
fn journal_entry_check(batch: &percore_engine::batch::BatchLimits) -> Result<(), String> {
    use percore_engine::journal::{entry_body_bytes_max, entry_bytes_padded};
    use percore_engine::record::RECORD_BYTES;
    let entry_bytes = |records| entry_bytes_padded(entry_body_bytes_max(records, RECORD_BYTES));
    let records = batch.entries_cap(RECORD_BYTES);
    let buffer = percore_shards::runtime::JOURNAL_WRITE_BUFFER_BYTES;
    if entry_bytes(records) <= buffer {
        return Ok(());
    }
    let fitting = (1..records)
        .rev()
        .find(|&records| entry_bytes(records) <= buffer)
        .unwrap_or(1);
    Err(format!(
        "--batch-entries-max {} (with --batch-bytes-max {}) makes batches of up to {records} \
         records, whose journal entry of {} bytes does not fit the journal's {buffer}-byte \
         write buffer: with --data-dir, batches hold at most {fitting} records",
        batch.entries_max,
        batch.bytes_max,
        entry_bytes(records)
    ))
}

/// The node configuration `node` and `format` derive from the same arguments.
fn node_config(args: &NodeArgs) -> Result<NodeConfig, Box<dyn std::error::Error>> {
    let mut config = args.shards.node_config();
    config.listen = args.listen;
    config.client_port_base = args.client_port_base;
    if let Some(data_dir) = &args.journal.data_dir {
        config.journal = Some(args.journal.settings(data_dir.clone()));
    }
    let ledger = args
        .shards
        .ledger
        .config(config.cores.len(), config.batch.entries_max);
    config.bft = args
        .bft
        .settings(&args.replication, ledger.credit_legs_in_flight_max)?;
    if let Some(bft) = &config.bft {
        let (sessions, clients) = (args.shards.ledger.session_clients_max, bft.clients.len());
        if sessions < clients {
            return Err(format!(
                "--session-clients-max {sessions} is below the {clients} clients cluster.keys \
                 authorises: in BFT mode every client needs a session of its own, since one \
                 evicted could not tell the client's old requests from new ones \
                 (docs/bft.md section 13)"
            )
            .into());
        }
    }
    if config.bft.is_none() {
        config.replication = args.replication.settings()?;
    }
    Ok(config)
}

/// `percore format`: creates a replica's data directory, once (`percore_shards::format`).
fn run_format(args: NodeArgs, replace: bool) -> Result<(), Box<dyn std::error::Error>> {
    // What `node` would refuse, refused before the directory is written (a format with a
    // bad replica index or peers list left a directory `node` refused and `format` would
    // not write again).
    node_values_check(&args)?;
    start_check(&args).check_layout()?;
    let config = node_config(&args)?;
    let Some(journal) = &config.journal else {
        return Err("format needs --data-dir".into());
    };
    let Some(identity) = config.format_identity() else {
        return Err(
            "format is for replicas (--peers, or --fault-model bft): a node without peers \
             creates its journals at start"
                .into(),
        );
    };
    let kind = if replace {
        if config.bft.is_none()
            && !config
                .replication
                .as_ref()
                .is_some_and(|replication| replication.view_change)
        {
            return Err(
                "format --replace needs view change (a replaced replica installs its group's \
                 current log from the leader); do not set view_change = false"
                    .into(),
            );
        }
        percore_shards::format::FormatKind::Replace
    } else {
        percore_shards::format::FormatKind::New
    };
    percore_shards::format::format(&journal.data_dir, identity, kind)?;
    let described = percore_shards::format::describe(&journal.data_dir)?.unwrap_or_default();
    say!(
        "formatted {} ({described}): start it with `percore node` and the same arguments",
        journal.data_dir.display()
    );
    Ok(())
}

fn run_node(args: NodeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let node_text = node_start_checks(&args)?;
    let mut config = node_config(&args)?;
    let shards = config.cores.len();
    if config.journal.is_some() {
        if args.journal.fsync == FsyncPolicy::Never {
            say!(
                "WARNING: --fsync never: acknowledged transactions do not survive a power loss (benchmarks only)"
            );
        }
    } else {
        say!("WARNING: no --data-dir: nothing is journaled, a restart loses everything");
    }
    let ledger = args.shards.ledger.config(shards, config.batch.entries_max);
    config.seed = runtime::random_seed();
    // Replicas must build identical ledgers, so the table hash seed comes from the cluster
    // key (secret, so clients still cannot predict it); a single node draws its own.
    let seed = match (&config.replication, &config.bft) {
        (Some(settings), _) => replication::ledger_hash_seed(&settings.keys.current),
        (None, Some(settings)) => replication::ledger_hash_seed(&settings.keys.current),
        (None, None) => runtime::random_seed(),
    };
    if let Some(settings) = &config.bft {
        say!(
            "BFT replica {} of {} (f = {}): peers {:?}",
            settings.replica,
            settings.peers.len(),
            settings.faults_max,
            settings.peers
        );
        if let Some(behaviour) = settings.byzantine {
            say!("WARNING: TEST ONLY: this replica is Byzantine on purpose ({behaviour:?})");
        }
    }
    if let Some(settings) = &config.replication {
        say!(
            "replica {} of {}: peers {:?}",
            settings.replica,
            settings.peers.len(),
            settings.peers
        );
    }
    let session_clients_max = args.shards.ledger.session_clients_max;
    let request_records_max = config
        .batch
        .entries_cap(percore_engine::record::RECORD_BYTES);
    let node = Node::start(config.clone(), move |shard, _| {
        Sessioned::new(
            Ledger::with_hash_seed(
                LedgerConfig {
                    shard_index: shard as u32,
                    ..ledger
                },
                seed,
            ),
            session_clients_max,
            request_records_max,
        )
    })?;
    let stop = node.stop_flag();
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let metrics_thread = match args.metrics {
        Some(address) => {
            let (bound, handle) = percore_shards::metrics::serve_with_node_text(
                address,
                node.metrics().to_vec(),
                node_text,
                stop.clone(),
                node.helper_cores().to_vec(),
            )?;
            say!("metrics on http://{bound}/metrics");
            Some(handle)
        }
        None => None,
    };
    for (shard, address) in node.client_addresses().iter().enumerate() {
        say!(
            "shard {shard} on core {} serving clients at {address}",
            config.cores[shard]
        );
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    say!("stopping: no new connections, draining accepted transactions");
    let reports = node.wait()?;
    for report in &reports {
        say!("shard {} stopped at op {}", report.shard, report.op_last);
    }
    if let Some(handle) = metrics_thread {
        let _ = handle.join();
    }
    Ok(())
}

fn run_bench(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.fault_model == FaultModel::Bft {
        return run_bench_bft(args);
    }
    if !args.addresses.is_empty() {
        if args.wants_series() {
            return Err(
                "--series, --series-out and --plot need a local cluster, not --addresses".into(),
            );
        }
        return run_bench_remote(args);
    }
    if args.replicas > 1 {
        return run_bench_cluster(args);
    }
    if args.wants_series() {
        return Err(
            "--series, --series-out and --plot need a local cluster (--replicas 2 or more)".into(),
        );
    }
    let mut node = args.shards.node_config();
    node.client_port_base = 0;
    let temporary = if args.in_memory {
        None
    } else {
        let data_dir = match &args.journal.data_dir {
            Some(dir) => dir.clone(),
            None => std::env::temp_dir().join(format!("percore-bench-{}", std::process::id())),
        };
        node.journal = Some(args.journal.settings(data_dir.clone()));
        (args.journal.data_dir.is_none() && !args.keep_data).then_some(data_dir)
    };
    let fsync = match (&node.journal, args.journal.fsync) {
        (None, _) => "none: in memory, no journal",
        (Some(_), FsyncPolicy::Always) => "always (fdatasync per group commit)",
        (Some(_), FsyncPolicy::Dsync) => "dsync (O_DSYNC segment writes, no fdatasync)",
        (Some(_), FsyncPolicy::Never) => {
            "never (journal written, not fdatasynced: benchmarks only)"
        }
    };
    if !args.json {
        say!("fsync policy: {fsync}");
    }
    if node.journal.is_some() && args.journal.fsync == FsyncPolicy::Never {
        say!("WARNING: --fsync never: these numbers do not include durability (benchmarks only)");
    }
    let ledger = args
        .shards
        .ledger
        .config(node.cores.len(), node.batch.entries_max);
    let config = BenchConfig {
        node,
        ledger,
        session_clients_max: args.shards.ledger.session_clients_max,
        accounts_per_shard: args.accounts_per_shard,
        warmup: Duration::from_secs(args.warmup_s),
        duration: Duration::from_secs(args.duration_s),
        records_per_request: args.records_per_request,
        window: args.window,
        connections_per_shard: args.connections_per_shard,
        cross_shard_percent: args.cross_shard_percent,
        offered: args.offered(),
        progress: !args.json,
        fsync,
    };
    let report = loadgen::run(config);
    if let Some(dir) = temporary {
        let _ = std::fs::remove_dir_all(dir);
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        loadgen::print_text(&report);
    }
    Ok(())
}

/// `percore bench --fault-model bft`: crash-fault and BFT clusters under the same load,
/// one after the other, and the signature cost per batch.
fn run_bench_bft(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    use percore_shards::bft_bench::{self, Mode};
    use percore_shards::cluster::{LocalCluster, LocalClusterConfig, free_port_base};
    // What this comparison does not do, refused rather than ignored.
    let ignored = [
        ("--addresses", !args.addresses.is_empty()),
        ("--metrics-addresses", !args.metrics_addresses.is_empty()),
        ("--replicas (it runs 3, then 4)", args.replicas != 3),
        ("--rate", args.rate.is_some()),
        ("--load", args.load.is_some()),
        ("--series, --series-out and --plot", args.wants_series()),
        ("--port-base", args.port_base.is_some()),
        ("--in-memory", args.in_memory),
        ("--fixed-view", args.fixed_view),
        (
            "--window (one request in flight per client)",
            args.window != 4,
        ),
    ];
    if let Some((flag, _)) = ignored.iter().find(|(_, given)| *given) {
        return Err(format!("bench --fault-model bft: {flag} is not supported").into());
    }
    let cores = args.shards.node_config().cores;
    let shards = cores.len();
    let data_root = match &args.journal.data_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("percore-bench-bft-{}", std::process::id())),
    };
    std::fs::create_dir_all(&data_root)?;
    let keys = data_root.join("bft-keys");
    // Client 1 sets up the accounts, one more per load thread.
    let clients = args.connections_per_shard * shards + 1;
    if !keys.join("cluster.keys").exists() {
        run_keygen(KeygenArgs {
            replicas: 4,
            faults: Some(1),
            clients,
            out: keys.clone(),
        })?;
    }
    let client_keys = (1..=clients)
        .map(|client| read_client_key(&keys, client as u128))
        .collect::<Result<Vec<_>, _>>()?;
    let signatures = bft_bench::signature_cost();
    let (shard, ledger, journal) = (&args.shards, &args.shards.ledger, &args.journal);
    let sizes: Vec<String> = [
        ("--batch-entries-max", shard.batch_entries_max.to_string()),
        ("--linger-us", shard.linger_us.to_string()),
        ("--transactions", shard.transactions.to_string()),
        ("--batches", shard.batches.to_string()),
        ("--connections-max", shard.connections_max.to_string()),
        ("--io-memory-kib", shard.io_memory_kib.to_string()),
        ("--accounts-max", ledger.accounts_max.to_string()),
        ("--transfers-max", ledger.transfers_max.to_string()),
        ("--credit-legs-max", ledger.credit_legs_max.to_string()),
        // A session per client: BFT mode refuses to start with fewer.
        (
            "--session-clients-max",
            ledger.session_clients_max.max(clients).to_string(),
        ),
        ("--segment-mib", journal.segment_mib.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    let fsync = journal.fsync.arg_name();
    let mut reports = Vec::new();
    let mut core_us_per_op = 0.0;
    for (mode, replicas) in [(Mode::Crash, 3), (Mode::Bft { faults_max: 1 }, 4)] {
        let bft = matches!(mode, Mode::Bft { .. });
        let mut extra_args = sizes.clone();
        if bft {
            extra_args.extend([
                "--fault-model".into(),
                "bft".into(),
                "--bft-keys-dir".into(),
            ]);
            extra_args.push(keys.display().to_string());
        }
        let name = if bft { "bft" } else { "crash" };
        say!(
            "starting {replicas} {name} replicas of {shards} shard(s) on cores {cores:?} \
             (fsync {fsync}, {}% of transfers cross shards)",
            if shards > 1 {
                args.cross_shard_percent
            } else {
                0
            }
        );
        let mut cluster = LocalCluster::start(LocalClusterConfig {
            binary: std::env::current_exe()?,
            replicas,
            cores: cores.clone(),
            replica_core_stride: 0,
            data_root: data_root.join(name),
            port_base: free_port_base(replicas, shards)?,
            fsync,
            extra_args,
            metrics: true,
        })?;
        let addresses: Vec<Vec<SocketAddr>> = (0..replicas)
            .map(|r| (0..shards).map(|k| cluster.client_address(r, k)).collect())
            .collect();
        let shape = bft_bench::LoadShape {
            shards,
            threads_per_shard: args.connections_per_shard,
            records_per_request: args.records_per_request,
            cross_shard_percent: args.cross_shard_percent,
        };
        let report = bft_bench::closed_loop(
            mode,
            (&addresses, &client_keys),
            shape,
            Duration::from_secs(args.warmup_s),
            Duration::from_secs(args.duration_s),
        );
        if bft {
            // The leader's time in the BFT core per op: signing, verifying, bookkeeping.
            for replica in 0..replicas {
                let Ok(text) = cluster.scrape(replica) else {
                    continue;
                };
                let metric = |name| percore_shards::cluster::shard_metric(&text, name, 0);
                if metric("percore_bft_is_leader") == 1 {
                    core_us_per_op = metric("percore_bft_core_us_total") as f64
                        / metric("percore_bft_commit_op").max(1) as f64;
                }
            }
        }
        cluster.stop_all();
        reports.push(report?);
    }
    if !(args.keep_data || args.journal.data_dir.is_some()) {
        let _ = std::fs::remove_dir_all(&data_root);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "modes": reports,
                "signatures": signatures,
                "bft_leader_core_us_per_op": core_us_per_op,
            })
        );
        return Ok(());
    }
    println!("mode   replicas  shards  cross %  committed tx/s  requests  p50 us  p99 us  failed");
    for report in &reports {
        println!(
            "{:<6} {:>8}  {:>6}  {:>7}  {:>14.0}  {:>8}  {:>6}  {:>6}  {:>6}",
            report.mode,
            report.replicas,
            report.shards,
            report.cross_shard_percent,
            report.tps,
            report.requests,
            report.latency_p50_us,
            report.latency_p99_us,
            report.failed
        );
    }
    if let [crash, bft] = &reports[..] {
        println!(
            "bft / crash: {:.2}x committed tx/s, {:.2}x p50 latency",
            bft.tps / crash.tps.max(1e-9),
            bft.latency_p50_us as f64 / crash.latency_p50_us.max(1) as f64
        );
    }
    println!(
        "ed25519 (this process): sign {:.1} us, verify_strict {:.1} us; per batch per replica \
         {} signs + {} verifies = {:.1} us, whatever the batch holds, plus {} verify per \
         client request (its signature); BFT leader core time {:.1} us per op",
        signatures.sign_us,
        signatures.verify_us,
        signatures.signs_per_batch,
        signatures.verifies_per_batch,
        signatures.per_batch_us,
        signatures.verifies_per_request,
        core_us_per_op
    );
    Ok(())
}

/// `percore bench --replicas N`, N > 1: the same load on a local cluster of child processes.
fn run_bench_cluster(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.in_memory {
        return Err(
            "--in-memory runs without a journal, and replication needs one: use \
                    --replicas 1 --in-memory, or --fsync never to leave durability out"
                .into(),
        );
    }
    // Before anything starts: a series file that cannot be written is refused now.
    let mut sink =
        percore_shards::soak::SeriesSink::create(args.plot.as_deref(), args.series_out.as_deref())
            .map_err(|error| format!("--series-out {error}"))?;
    let replicas = usize::from(args.replicas);
    let cores = args.shards.node_config().cores;
    let fsync_arg = args.journal.fsync.arg_name();
    let fsync = match args.journal.fsync {
        FsyncPolicy::Always => "always (fdatasync per group commit, every replica)",
        FsyncPolicy::Dsync => "dsync (O_DSYNC segment writes, no fdatasync, every replica)",
        FsyncPolicy::Never => "never (journals written, not fdatasynced: benchmarks only)",
    };
    say!("fsync policy: {fsync}");
    if args.journal.fsync == FsyncPolicy::Never {
        say!("WARNING: --fsync never: these numbers do not include durability (benchmarks only)");
    }
    let data_root = match &args.journal.data_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("percore-bench-{}", std::process::id())),
    };
    let port_base = match args.port_base {
        Some(port) => port,
        None => percore_shards::cluster::free_port_base(replicas, cores.len())?,
    };
    // Every size and limit the operator gave `bench` applies to each node.
    let (shard, ledger, journal) = (&args.shards, &args.shards.ledger, &args.journal);
    let mut extra_args: Vec<String> = [
        ("--batch-entries-max", shard.batch_entries_max.to_string()),
        ("--batch-bytes-max", shard.batch_bytes_max.to_string()),
        ("--linger-us", shard.linger_us.to_string()),
        ("--transactions", shard.transactions.to_string()),
        ("--batches", shard.batches.to_string()),
        ("--connections-max", shard.connections_max.to_string()),
        ("--io-memory-kib", shard.io_memory_kib.to_string()),
        ("--executor-probe-us", shard.executor_probe_us.to_string()),
        ("--accounts-max", ledger.accounts_max.to_string()),
        ("--transfers-max", ledger.transfers_max.to_string()),
        ("--credit-legs-max", ledger.credit_legs_max.to_string()),
        (
            "--session-clients-max",
            ledger.session_clients_max.to_string(),
        ),
        ("--segment-mib", journal.segment_mib.to_string()),
        (
            "--checkpoint-interval-ops",
            journal.checkpoint_interval_ops.to_string(),
        ),
        (
            "--snapshot-write-mib-per-s",
            journal.snapshot_write_mib_per_s.to_string(),
        ),
        ("--cluster-id", format!("{:x}", journal.cluster_id)),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect();
    if journal.segment_spare {
        extra_args.push("--segment-spare".into());
        say!("spare segments: each shard zero-fills its next journal segment ahead of use");
    }
    if args.fixed_view {
        extra_args.push("--fixed-view".into());
        say!("fixed view (no leader failover; the leader sends after its own fsync)");
    }
    say!(
        "starting {replicas} replicas x {} shard(s) on cores {cores:?}{} (ports from {port_base}, data in {})",
        cores.len(),
        match args.replica_core_stride {
            0 => String::new(),
            stride => format!(" + replica x {stride}"),
        },
        data_root.display()
    );
    let config = loadgen::ClusterBenchConfig {
        cluster: percore_shards::cluster::LocalClusterConfig {
            binary: std::env::current_exe()?,
            replicas,
            cores,
            replica_core_stride: args.replica_core_stride,
            data_root: data_root.clone(),
            port_base,
            fsync: fsync_arg,
            extra_args,
            metrics: true,
        },
        load: loadgen::LoadConfig {
            accounts_per_shard: args.accounts_per_shard,
            warmup: Duration::from_secs(args.warmup_s),
            duration: Duration::from_secs(args.duration_s),
            records_per_request: args.records_per_request,
            window: args.window,
            connections_per_shard: args.connections_per_shard,
            cross_shard_percent: args.cross_shard_percent,
            offered: args.offered(),
            progress: !args.json,
            fsync,
        },
        series: args.wants_series() || args.json,
    };
    let report = loadgen::run_cluster(config, &mut sink);
    if args.keep_data || args.journal.data_dir.is_some() {
        say!("data and node logs kept in {}", data_root.display());
    } else {
        let _ = std::fs::remove_dir_all(&data_root);
    }
    let report = report?;
    if let Some(soak) = &report.soak {
        for line in percore_shards::soak::summary_lines(soak) {
            eprintln!("{line}");
        }
        if let Some(path) = &args.plot {
            percore_shards::soak::plot_svg(path, &soak.series)?;
            eprintln!("plot written to {}", path.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        loadgen::print_text(&report);
    }
    Ok(())
}

/// `percore bench --addresses`: the same load on a cluster that is already running.
fn run_bench_remote(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !args.json {
        say!(
            "loading {} shard(s) through {:?} (a running cluster: nothing is started or stopped)",
            args.addresses.len(),
            args.addresses
        );
    }
    let config = loadgen::RemoteBenchConfig {
        leaders: args.addresses.clone(),
        metrics: args.metrics_addresses.clone(),
        load: loadgen::LoadConfig {
            accounts_per_shard: args.accounts_per_shard,
            warmup: Duration::from_secs(args.warmup_s),
            duration: Duration::from_secs(args.duration_s),
            records_per_request: args.records_per_request,
            window: args.window,
            connections_per_shard: args.connections_per_shard,
            cross_shard_percent: args.cross_shard_percent,
            offered: args.offered(),
            progress: !args.json,
            fsync: "as the nodes were started (not visible to the client)",
        },
    };
    let report = loadgen::run_remote(config)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        loadgen::print_text(&report);
    }
    Ok(())
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Metrics address (host:port of `node --metrics`) of every node, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    addresses: Vec<String>,
    /// Time between the two scrapes that TPS is measured over (milliseconds).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// `percore status`; `Ok(false)` when a node is down or the peers digests differ.
fn run_status(args: StatusArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let status = percore_shards::status::run(&percore_shards::status::StatusConfig {
        addresses: args.addresses,
        interval: Duration::from_millis(args.interval_ms),
    });
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", percore_shards::status::render_text(&status));
    }
    Ok(status.healthy)
}

fn run_inspect(args: InspectArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let body_bytes_max = percore_engine::journal::entry_body_bytes_max(
        args.batch_entries_max,
        percore_engine::record::RECORD_BYTES,
    );
    let shards = std::fs::read_dir(&args.data_dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("shard-"))
        .count();
    let replay = args
        .replay
        .then(|| args.ledger.config(shards.max(1), args.batch_entries_max));
    let config = percore_shards::inspect::InspectConfig {
        data_dir: args.data_dir,
        body_bytes_max,
        replay,
        session_clients_max: args.ledger.session_clients_max,
    };
    let (report, problem) = percore_shards::inspect::run(&config)?;
    print!("{report}");
    Ok(problem)
}

/// Reads `client-<client>.key` from a `percore keygen` directory and checks it is that
/// client's.
fn read_client_key(
    dir: &std::path::Path,
    client: u128,
) -> Result<percore_engine::bft::SigningKey, Box<dyn std::error::Error>> {
    let path = dir.join(format!("client-{client}.key"));
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("{}: {error} (percore keygen --clients)", path.display()))?;
    let file = percore_engine::bft::keys::parse_client_key(&text)?;
    if file.client != client {
        return Err(format!("{} holds the key of client {}", path.display(), file.client).into());
    }
    Ok(file.key)
}

/// `percore keygen`: seeds from the OS CSPRNG (getrandom), one 0600 file per secret key
/// (replicas, then clients), then the cluster file. Nothing is written if the fault model
/// or the client count is refused.
fn run_keygen(args: KeygenArgs) -> Result<(), Box<dyn std::error::Error>> {
    use percore_engine::bft::{SigningKey, keys};
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let faults_max = args
        .faults
        .unwrap_or(u8::try_from(args.replicas.saturating_sub(1) / 3).unwrap_or(u8::MAX));
    percore_engine::bft::check_fault_model(args.replicas, faults_max)?;
    let clients_max = percore_engine::bft::request::CLIENTS_MAX;
    if args.clients > clients_max {
        return Err(format!("--clients {}: at most {clients_max}", args.clients).into());
    }
    std::fs::create_dir_all(&args.out)?;
    if std::fs::read_dir(&args.out)?.next().is_some() {
        return Err(format!(
            "{} is not empty: refusing to overwrite keys",
            args.out.display()
        )
        .into());
    }
    let write_secret = |name: String, text: String| -> Result<(), Box<dyn std::error::Error>> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(args.out.join(name))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        Ok(())
    };
    let fresh_key = || -> Result<SigningKey, Box<dyn std::error::Error>> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|error| format!("OS random source: {error}"))?;
        let key = SigningKey::from_bytes(&seed);
        seed.fill(0);
        Ok(key)
    };
    let mut public = Vec::with_capacity(args.replicas);
    for replica in 0..args.replicas {
        let key = fresh_key()?;
        public.push(key.verifying_key());
        let text = keys::format_secret_key(replica as u8, &key);
        write_secret(format!("replica-{replica}.key"), text)?;
    }
    let mut clients = Vec::with_capacity(args.clients);
    for client in 1..=args.clients as u128 {
        let key = fresh_key()?;
        clients.push(key.verifying_key());
        write_secret(
            format!("client-{client}.key"),
            keys::format_client_key(client, &key),
        )?;
    }
    let cluster = keys::ClusterKeys {
        faults_max,
        keys: public,
        clients,
    };
    let path = args.out.join("cluster.keys");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)?;
    file.write_all(keys::format_cluster(&cluster).as_bytes())?;
    file.sync_all()?;
    say!(
        "wrote replica-0.key .. replica-{}.key, client-1.key .. client-{}.key (mode 0600) and \
         {} (n = {}, f = {faults_max}, {} clients)",
        args.replicas - 1,
        args.clients,
        path.display(),
        args.replicas,
        args.clients
    );
    Ok(())
}

fn main() -> ExitCode {
    init_tracing();
    // Parsed in two steps so `node --config` can tell flags given from defaults.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let outcome = match cli.command {
        Command::Node(args) => {
            node_args_with_file(args, matches.subcommand_matches("node")).and_then(run_node)
        }
        Command::Format(FormatArgs { node, replace }) => {
            node_args_with_file(node, matches.subcommand_matches("format"))
                .and_then(|node| run_format(node, replace))
        }
        Command::Status(args) => match run_status(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(err) => Err(err),
        },
        Command::Bench(args) => run_bench(args),
        Command::ClusterKey(args) => replication::cluster_key_write(&args.out)
            .map(|()| say!("cluster key written to {}", args.out.display()))
            .map_err(Into::into),
        Command::Keygen(args) => run_keygen(args),
        Command::Series(args) => run_series(args),
        Command::Inspect(args) => match run_inspect(args) {
            Ok(false) => Ok(()),
            Ok(true) => return ExitCode::FAILURE,
            Err(err) => Err(err),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            say!("percore: error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_keys_that_parse_and_refuses_too_few_replicas() {
        use percore_engine::bft::keys;
        use std::os::unix::fs::PermissionsExt as _;
        let out = std::env::temp_dir().join(format!("percore-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let refused = run_keygen(KeygenArgs {
            replicas: 3,
            faults: Some(1),
            clients: 1,
            out: out.clone(),
        });
        assert!(refused.unwrap_err().to_string().contains("3f + 1"));
        assert!(!out.exists(), "nothing written for a refused configuration");
        run_keygen(KeygenArgs {
            replicas: 4,
            faults: None,
            clients: 3,
            out: out.clone(),
        })
        .expect("keygen");
        let cluster =
            keys::parse_cluster(&std::fs::read_to_string(out.join("cluster.keys")).unwrap())
                .expect("cluster file");
        assert_eq!((cluster.keys.len(), cluster.faults_max), (4, 1));
        assert_eq!(cluster.clients.len(), 3);
        for client in 1..=3u128 {
            let key = read_client_key(&out, client).expect("client key");
            assert_eq!(key.verifying_key(), cluster.clients[client as usize - 1]);
            let path = out.join(format!("client-{client}.key"));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        for replica in 0..4u8 {
            let path = out.join(format!("replica-{replica}.key"));
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let secret = keys::parse_secret_key(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(secret.replica, replica);
            assert_eq!(
                secret.key.verifying_key(),
                cluster.keys[usize::from(replica)]
            );
        }
        assert!(
            run_keygen(KeygenArgs {
                replicas: 4,
                faults: None,
                clients: 1,
                out: out.clone()
            })
            .is_err()
        );
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn every_node_flag_has_a_config_file_key() {
        let command = Cli::command();
        let node = command.find_subcommand("node").expect("node subcommand");
        let flags: Vec<&str> = node
            .get_arguments()
            .map(|arg| arg.get_id().as_str())
            .filter(|id| !matches!(*id, "config" | "help" | "version"))
            .collect();
        for flag in &flags {
            assert!(
                percore_shards::config::NODE_FILE_KEYS.contains(flag),
                "--{flag} has no key in the node file (config::NODE_FILE_KEYS, NodeFile)"
            );
        }
        assert_eq!(flags.len(), percore_shards::config::NODE_FILE_KEYS.len());
    }
}
