//! A local replicated cluster: `replicas` child processes of `percore node` on loopback.
//!
//! [`LocalCluster`] owns the children: it writes the cluster key, lays out ports and data
//! directories, starts every replica, waits until every client port answers a ping, and
//! kills (SIGKILL), restarts or stops (SIGTERM, then SIGKILL after a deadline) single
//! replicas. It scrapes their Prometheus endpoints with a plain HTTP GET. The benchmark and
//! the end-to-end tests use it. It must never leave a process behind: dropping it kills
//! every child still running.
//!
//! Port layout, per replica `r` from `port_base`: clients on `port_base + 100 r + k`, peers
//! on `port_base + 100 r + 50 + k` (shard `k`), metrics on `port_base + 100 r + 99`.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use percore_engine::frame;
use percore_net::client::Pipeline;

/// Ports reserved per replica.
pub const REPLICA_PORT_STRIDE: u16 = 100;
/// Offset of a replica's first peer port from its client port base.
pub const PEER_PORT_OFFSET: u16 = 50;
/// Offset of a replica's metrics port from its client port base.
pub const METRICS_PORT_OFFSET: u16 = 99;
/// Most shards per replica the port layout has room for (peer ports end below metrics).
pub const SHARDS_MAX: usize = (METRICS_PORT_OFFSET - PEER_PORT_OFFSET) as usize;
/// Most replicas the port layout and the replication protocol allow.
pub const REPLICAS_MAX: usize = percore_engine::replica::REPLICA_COUNT_MAX;
/// How long `start` and `restart` wait for every client port to answer (ms).
pub const READY_TIMEOUT_MS: u64 = 20_000;
/// How long `stop` waits after SIGTERM before SIGKILL (ms); a node drains for up to ~3 s
/// when its peers are gone.
pub const STOP_TIMEOUT_MS: u64 = 10_000;
/// Socket timeout of one readiness ping or metrics scrape (ms).
pub const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Pause between readiness probes (ms).
pub const PROBE_INTERVAL_MS: u64 = 50;
/// Lines of each replica's log quoted in an error.
pub const LOG_TAIL_LINES: usize = 20;
/// Lowest port [`free_port_base`] hands out: below Linux's ephemeral range (32768+), so an
/// outgoing connection cannot take a port between the check and the node's bind.
pub const PORT_BASE_MIN: u16 = 10_000;
/// Highest port any replica of a cluster from [`free_port_base`] may use.
pub const PORT_MAX: u16 = 32_000;

const _: () = assert!(SHARDS_MAX <= PEER_PORT_OFFSET as usize);
const _: () = assert!(METRICS_PORT_OFFSET < REPLICA_PORT_STRIDE);
const _: () = assert!(
    PORT_BASE_MIN as usize + REPLICAS_MAX * (REPLICA_PORT_STRIDE as usize) < PORT_MAX as usize
);

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// The `percore` binary.
    pub binary: PathBuf,
    /// Replicas (processes); each runs every shard.
    pub replicas: usize,
    /// Cores of replica 0's shards; replica `r` runs shard `k` on
    /// `cores[k] + r * replica_core_stride`, or, with no stride, on `cores[(k + r) % n]`
    /// ([`LocalClusterConfig::replica_cores`]).
    pub cores: Vec<usize>,
    /// Offset between the cores of consecutive replicas: 0 shares `cores` between every
    /// replica (`--allow-shared-cores`); `cores.len()` gives each replica cores of its own.
    pub replica_core_stride: usize,
    /// Root of the data directories (`replica-<r>/`), the logs and the key file.
    pub data_root: PathBuf,
    /// First port of the layout (see the module docs); [`free_port_base`] picks one.
    pub port_base: u16,
    /// `--fsync` of every node: "always", "dsync" or "never".
    pub fsync: &'static str,
    /// More `percore node` arguments (sizes, limits...), passed to every replica.
    pub extra_args: Vec<String>,
    /// Serve metrics on `port_base + 100 r + 99`.
    pub metrics: bool,
}

impl LocalClusterConfig {
    /// Shards per replica.
    pub fn shards(&self) -> usize {
        self.cores.len()
    }

    /// The core of each of `replica`'s shards. With a stride, its own cores. Without one
    /// the replicas share `cores`, rotated by one per replica, so that the replicas of one
    /// shard group sit on different cores where there are enough: on a shared box a group's
    /// followers then take its Prepares beside its leader instead of after it on the same
    /// core (docs/benchmarks.md, "Shared cores, rotated").
    pub fn replica_cores(&self, replica: usize) -> Vec<usize> {
        let count = self.cores.len();
        (0..count)
            .map(|shard| match self.replica_core_stride {
                0 => self.cores[(shard + replica) % count],
                stride => self.cores[shard] + replica * stride,
            })
            .collect()
    }
}

/// What went wrong with a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The configuration cannot be laid out.
    #[error("{replicas} replica(s) x {shards} shard(s) from port {port_base}: outside the layout")]
    Layout {
        /// Replicas asked for.
        replicas: usize,
        /// Shards asked for.
        shards: usize,
        /// Port base asked for.
        port_base: u16,
    },
    /// A file or directory could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// What was accessed.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The cluster key could not be written.
    #[error(transparent)]
    ClusterKey(#[from] crate::replication::ClusterKeyError),
    /// A child process could not be started.
    #[error("replica {replica}: cannot start {binary}: {source}")]
    Spawn {
        /// Replica index.
        replica: usize,
        /// The binary.
        binary: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `percore format` refused a replica's data directory.
    #[error("replica {replica}: percore format failed ({status}): {stderr}")]
    Format {
        /// Replica index.
        replica: usize,
        /// How it ended.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// A replica exited while it was expected to run.
    #[error("replica {replica} exited with {status}; its log ends:\n{log_tail}")]
    Exited {
        /// Replica index.
        replica: usize,
        /// How it ended.
        status: ExitStatus,
        /// The end of its stderr log.
        log_tail: String,
    },
    /// A client port did not answer a ping in time.
    #[error(
        "replica {replica} shard {shard} at {address} did not answer within {waited_ms} ms; its log ends:\n{log_tail}"
    )]
    NotReady {
        /// Replica index.
        replica: usize,
        /// Shard index.
        shard: usize,
        /// The client address.
        address: SocketAddr,
        /// How long it was waited for.
        waited_ms: u64,
        /// The end of its stderr log.
        log_tail: String,
    },
    /// A replica did not exit within [`STOP_TIMEOUT_MS`] of SIGTERM and was killed.
    #[error(
        "replica {replica} ignored SIGTERM for {STOP_TIMEOUT_MS} ms and was killed; its log ends:\n{log_tail}"
    )]
    StopTimedOut {
        /// Replica index.
        replica: usize,
        /// The end of its stderr log.
        log_tail: String,
    },
    /// The operation needs the replica stopped (restart) or running (scrape, stop).
    #[error("replica {replica} is {}", if *.running { "running" } else { "not running" })]
    State {
        /// Replica index.
        replica: usize,
        /// Whether it runs.
        running: bool,
    },
    /// The metrics endpoint could not be read.
    #[error("replica {replica} metrics at {address}: {source}")]
    Scrape {
        /// Replica index.
        replica: usize,
        /// The metrics address.
        address: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The cluster was started without metrics.
    #[error("the cluster runs without metrics")]
    NoMetrics,
    /// No port range in [`PORT_BASE_MIN`]..[`PORT_MAX`] was free.
    #[error("no free range of ports for {replicas} replica(s) x {shards} shard(s)")]
    NoFreePorts {
        /// Replicas asked for.
        replicas: usize,
        /// Shards asked for.
        shards: usize,
    },
}

/// A running local cluster; see the module docs.
#[derive(Debug)]
pub struct LocalCluster {
    config: LocalClusterConfig,
    key_file: PathBuf,
    /// Per replica, the cluster key file and the accepted key file it starts with next,
    /// where they differ from `key_file` alone (a key rotation).
    key_files: Vec<Option<(PathBuf, Option<PathBuf>)>>,
    children: Vec<Option<Child>>,
    /// More arguments of single replicas (after `extra_args`), by replica.
    replica_args: Vec<Vec<String>>,
    /// The cores each replica's process may run on, by replica ([`LocalCluster::start`]).
    affinities: Vec<Option<Vec<usize>>>,
    /// The cores no replica's shards use, where replicas have cores of their own.
    spare_cores: Vec<usize>,
}

/// Client port base of `replica` in the layout from `port_base`.
pub fn client_port_base(port_base: u16, replica: usize) -> u16 {
    port_base + REPLICA_PORT_STRIDE * replica as u16
}

/// Every port `replicas` replicas of `shards` shards use, laid out from `port_base`.
fn layout_ports(port_base: u16, replicas: usize, shards: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(replicas * (2 * shards + 1));
    for replica in 0..replicas {
        let base = client_port_base(port_base, replica);
        ports.extend((0..shards as u16).map(|k| base + k));
        ports.extend((0..shards as u16).map(|k| base + PEER_PORT_OFFSET + k));
        ports.push(base + METRICS_PORT_OFFSET);
    }
    ports
}

/// A port base whose whole layout for `replicas` x `shards` binds on 127.0.0.1 right now
/// (`replicas` may exceed the cluster's, to leave room for an extra process).
/// Candidates start at a point drawn from the process id and the clock, so concurrent test
/// processes rarely probe the same range; the ports are free when checked, not reserved.
pub fn free_port_base(replicas: usize, shards: usize) -> Result<u16, ClusterError> {
    let span = REPLICA_PORT_STRIDE as usize * replicas;
    if replicas == 0
        || span > (PORT_MAX - PORT_BASE_MIN) as usize
        || shards == 0
        || shards > SHARDS_MAX
    {
        return Err(ClusterError::NoFreePorts { replicas, shards });
    }
    let slots = (PORT_MAX - PORT_BASE_MIN) as usize / span;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    let start = (std::process::id() as usize).wrapping_mul(7919) ^ nanos;
    for attempt in 0..slots {
        let slot = (start + attempt) % slots;
        let base = PORT_BASE_MIN + (slot * span) as u16;
        let all_free = layout_ports(base, replicas, shards)
            .into_iter()
            .all(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    Err(ClusterError::NoFreePorts { replicas, shards })
}

/// The last `lines` lines of the file at `path` (empty if it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Sends `SIGTERM` to `pid` (through kill(1): this crate links no libc bindings).
fn send_sigterm(pid: u32) -> std::io::Result<()> {
    send_signal(pid, "TERM")
}

/// Sends the signal named `signal` (`TERM`, `STOP`, `CONT`) to `pid` through kill(1).
fn send_signal(pid: u32, signal: &str) -> std::io::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "kill -{signal} {pid}: {status}"
        )))
    }
}

/// With a core stride each replica has cores of its own: its process may run on them and
/// on the cores no replica's shards use (of `allowed`), where its checkpoint followers go
/// (`crate::affinity`), never on another replica's shard cores. Returns each replica's
/// cores (`None`: no stride, the replicas share cores and run as this process) and the
/// spare ones.
fn replica_affinities(
    config: &LocalClusterConfig,
    allowed: &[usize],
) -> (Vec<Option<Vec<usize>>>, Vec<usize>) {
    if config.replica_core_stride == 0 {
        return (vec![None; config.replicas], Vec::new());
    }
    let used: Vec<usize> = (0..config.replicas)
        .flat_map(|replica| config.replica_cores(replica))
        .collect();
    let spare = crate::affinity::spare(allowed, &used);
    let affinities = (0..config.replicas)
        .map(|replica| {
            let mut cores = config.replica_cores(replica);
            cores.extend(&spare);
            Some(cores)
        })
        .collect();
    (affinities, spare)
}

impl LocalCluster {
    /// Writes the key (kept if `data_root` already has one), starts every replica and waits
    /// until all their client ports answer pings. On failure every child is killed.
    pub fn start(config: LocalClusterConfig) -> Result<Self, ClusterError> {
        Self::start_with_replica_args(config, Vec::new())
    }

    /// [`LocalCluster::start`], with more `percore node` arguments for single replicas:
    /// `replica_args[r]` is appended to replica `r`'s (e.g. a test-only Byzantine flag).
    pub fn start_with_replica_args(
        config: LocalClusterConfig,
        replica_args: Vec<Vec<String>>,
    ) -> Result<Self, ClusterError> {
        let (replicas, shards) = (config.replicas, config.shards());
        let top = u32::from(config.port_base) + u32::from(REPLICA_PORT_STRIDE) * replicas as u32;
        if replicas == 0
            || replicas > REPLICAS_MAX
            || shards == 0
            || shards > SHARDS_MAX
            || top > u32::from(u16::MAX)
        {
            return Err(ClusterError::Layout {
                replicas,
                shards,
                port_base: config.port_base,
            });
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ClusterError::Io { path, source }
        };
        std::fs::create_dir_all(&config.data_root).map_err(io(&config.data_root))?;
        let key_file = config.data_root.join("cluster.key");
        if !key_file.exists() {
            crate::replication::cluster_key_write(&key_file)?;
        }
        // Read once, now: the caller may confine itself later (the benchmark's client keeps
        // to the spare cores).
        let (affinities, spare_cores) = replica_affinities(&config, &crate::affinity::allowed());
        let mut cluster = Self {
            children: (0..replicas).map(|_| None).collect(),
            key_files: (0..replicas).map(|_| None).collect(),
            config,
            key_file,
            replica_args,
            affinities,
            spare_cores,
        };
        for replica in 0..replicas {
            cluster.format(replica)?;
            cluster.spawn(replica)?;
        }
        let all: Vec<usize> = (0..replicas).collect();
        cluster.wait_ready(&all)?;
        Ok(cluster)
    }

    /// The configuration the cluster runs.
    pub fn config(&self) -> &LocalClusterConfig {
        &self.config
    }

    /// Replicas.
    pub fn replicas(&self) -> usize {
        self.config.replicas
    }

    /// Shards per replica.
    pub fn shards(&self) -> usize {
        self.config.shards()
    }

    /// The key file every replica reads (unless [`LocalCluster::set_key_files`] changed
    /// one's).
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// The cluster key file `key` and the accepted key file `accept` (a key rotation,
    /// `--cluster-key-accept-file`) that `replica` starts with from its next start on.
    pub fn set_key_files(&mut self, replica: usize, key: PathBuf, accept: Option<PathBuf>) {
        self.key_files[replica] = Some((key, accept));
    }

    /// Data directory of `replica`.
    pub fn data_dir(&self, replica: usize) -> PathBuf {
        self.config.data_root.join(format!("replica-{replica}"))
    }

    /// Stderr log of `replica` (appended across restarts).
    pub fn log_path(&self, replica: usize) -> PathBuf {
        self.config.data_root.join(format!("replica-{replica}.log"))
    }

    /// The last lines of `replica`'s log.
    pub fn log_tail(&self, replica: usize) -> String {
        file_tail(&self.log_path(replica), LOG_TAIL_LINES)
    }

    /// Client address of `shard` on `replica`.
    pub fn client_address(&self, replica: usize, shard: usize) -> SocketAddr {
        let port = client_port_base(self.config.port_base, replica) + shard as u16;
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Peer address of `shard` on `replica`.
    pub fn peer_address(&self, replica: usize, shard: usize) -> SocketAddr {
        let port =
            client_port_base(self.config.port_base, replica) + PEER_PORT_OFFSET + shard as u16;
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// Metrics address of `replica` (whether or not metrics are on).
    pub fn metrics_address(&self, replica: usize) -> SocketAddr {
        let port = client_port_base(self.config.port_base, replica) + METRICS_PORT_OFFSET;
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    /// The replica that leads `shard`'s group first (view 0: `shard mod replicas`), and
    /// for good with `--fixed-view`. With view change (the nodes' default) another replica
    /// leads after a failover: read `percore_replica_is_leader` to know who leads now.
    pub fn leader_of(&self, shard: usize) -> usize {
        shard % self.config.replicas
    }

    /// Per shard, its group leader's client address: what a [`percore_net::client::Client`]
    /// routes each shard's records to.
    pub fn leader_addresses(&self) -> Vec<SocketAddr> {
        (0..self.shards())
            .map(|shard| self.client_address(self.leader_of(shard), shard))
            .collect()
    }

    /// The `percore node` arguments of `replica` (the peer list names every replica).
    pub fn node_args(&self, replica: usize) -> Vec<String> {
        let config = &self.config;
        let cores: Vec<String> = config
            .replica_cores(replica)
            .iter()
            .map(usize::to_string)
            .collect();
        let peers: Vec<String> = (0..config.replicas)
            .map(|r| self.peer_address(r, 0).to_string())
            .collect();
        let mut args: Vec<String> = vec![
            "node".into(),
            "--cores".into(),
            cores.join(","),
            "--allow-shared-cores".into(),
            "--data-dir".into(),
            self.data_dir(replica).display().to_string(),
            "--client-port-base".into(),
            client_port_base(config.port_base, replica).to_string(),
            "--replica".into(),
            replica.to_string(),
            "--peers".into(),
            peers.join(","),
            "--fsync".into(),
            config.fsync.into(),
        ];
        match &self.key_files[replica] {
            None => args.extend([
                "--cluster-key-file".into(),
                self.key_file.display().to_string(),
            ]),
            Some((key, accept)) => {
                args.extend(["--cluster-key-file".into(), key.display().to_string()]);
                if let Some(accept) = accept {
                    args.extend([
                        "--cluster-key-accept-file".into(),
                        accept.display().to_string(),
                    ]);
                }
            }
        }
        if config.metrics {
            args.push("--metrics".into());
            args.push(self.metrics_address(replica).to_string());
        }
        args.extend(config.extra_args.iter().cloned());
        if let Some(more) = self.replica_args.get(replica) {
            args.extend(more.iter().cloned());
        }
        args
    }

    /// Formats `replica`'s data directory (`percore format` with its node arguments) unless
    /// an earlier start of this data root did.
    fn format(&self, replica: usize) -> Result<(), ClusterError> {
        if self
            .data_dir(replica)
            .join(crate::format::FORMAT_FILE_NAME)
            .exists()
        {
            return Ok(());
        }
        let mut args = self.node_args(replica);
        args[0] = "format".into();
        let output = Command::new(&self.config.binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClusterError::Spawn {
                replica,
                binary: self.config.binary.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(ClusterError::Format {
                replica,
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(())
    }

    fn spawn(&mut self, replica: usize) -> Result<(), ClusterError> {
        let log_path = self.log_path(replica);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| ClusterError::Io {
                path: log_path.clone(),
                source,
            })?;
        // The child inherits the affinity of the thread that starts it.
        let restore = match &self.affinities[replica] {
            Some(cores) => {
                let previous = crate::affinity::current();
                match crate::affinity::confine_current(cores) {
                    Ok(()) => previous.ok(),
                    Err(error) => {
                        tracing::warn!(replica, ?cores, %error, "replica started without its core set");
                        None
                    }
                }
            }
            None => None,
        };
        let child = Command::new(&self.config.binary)
            .args(self.node_args(replica))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn();
        if let Some(previous) = restore {
            let _ = crate::affinity::confine_current(&previous);
        }
        let child = child.map_err(|source| ClusterError::Spawn {
            replica,
            binary: self.config.binary.clone(),
            source,
        })?;
        self.children[replica] = Some(child);
        Ok(())
    }

    /// The cores no replica's shards use, where each replica has cores of its own
    /// (`replica_core_stride`); empty where the replicas share cores or none are left. The
    /// benchmark's client threads keep to them.
    pub fn spare_cores(&self) -> &[usize] {
        &self.spare_cores
    }

    /// Whether `replica`'s process runs (reaps it if it exited).
    pub fn is_running(&mut self, replica: usize) -> bool {
        match self.children[replica].as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.children[replica] = None;
                false
            }
            None => false,
        }
    }

    /// Fails with [`ClusterError::Exited`] if `replica` is no longer running.
    fn check_alive(&mut self, replica: usize) -> Result<(), ClusterError> {
        let Some(child) = self.children[replica].as_mut() else {
            return Err(ClusterError::State {
                replica,
                running: false,
            });
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.children[replica] = None;
                Err(ClusterError::Exited {
                    replica,
                    status,
                    log_tail: self.log_tail(replica),
                })
            }
            Err(source) => Err(ClusterError::Io {
                path: self.config.binary.clone(),
                source,
            }),
        }
    }

    /// Waits until every client port of `replicas` answers a ping (and their metrics
    /// endpoints accept connections, when on). Kills every child on failure.
    fn wait_ready(&mut self, replicas: &[usize]) -> Result<(), ClusterError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(READY_TIMEOUT_MS);
        let outcome = self.poll_ready(replicas, started, deadline);
        if outcome.is_err() {
            self.kill_all();
        }
        outcome
    }

    fn poll_ready(
        &mut self,
        replicas: &[usize],
        started: Instant,
        deadline: Instant,
    ) -> Result<(), ClusterError> {
        for &replica in replicas {
            for shard in 0..self.shards() {
                let address = self.client_address(replica, shard);
                while !ping(shard, address) {
                    self.check_alive(replica)?;
                    if Instant::now() >= deadline {
                        return Err(ClusterError::NotReady {
                            replica,
                            shard,
                            address,
                            waited_ms: started.elapsed().as_millis() as u64,
                            log_tail: self.log_tail(replica),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(PROBE_INTERVAL_MS));
                }
            }
            if self.config.metrics {
                let address = self.metrics_address(replica);
                let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
                while TcpStream::connect_timeout(&address, timeout).is_err() {
                    self.check_alive(replica)?;
                    if Instant::now() >= deadline {
                        return Err(ClusterError::NotReady {
                            replica,
                            shard: 0,
                            address,
                            waited_ms: started.elapsed().as_millis() as u64,
                            log_tail: self.log_tail(replica),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(PROBE_INTERVAL_MS));
                }
            }
        }
        Ok(())
    }

    /// The process id of `replica`, `None` when it is not running (or exited unreaped).
    pub fn pid(&self, replica: usize) -> Option<u32> {
        self.children[replica].as_ref().map(Child::id)
    }

    /// SIGKILLs `replica`, reaps it and waits (at most [`STOP_TIMEOUT_MS`]) until its ports
    /// no longer accept (nothing if it is not running).
    pub fn kill(&mut self, replica: usize) {
        if let Some(mut child) = self.children[replica].take() {
            let _ = child.kill();
            let _ = child.wait();
            self.wait_ports_released(replica);
        }
    }

    /// Waits (at most [`STOP_TIMEOUT_MS`]) until no port of `replica`'s layout accepts a
    /// connection. A node's listening sockets outlive its reaped process for a few
    /// milliseconds, until the kernel has torn its io_uring instances down: a test that
    /// restarts or probes the replica right after must not meet them.
    fn wait_ports_released(&self, replica: usize) {
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        let timeout = Duration::from_millis(PROBE_INTERVAL_MS);
        let mut addresses = (0..self.shards())
            .flat_map(|shard| {
                [
                    self.client_address(replica, shard),
                    self.peer_address(replica, shard),
                ]
            })
            .chain([self.metrics_address(replica)]);
        let _ = addresses.try_for_each(|address| {
            while TcpStream::connect_timeout(&address, timeout).is_ok() {
                if Instant::now() >= deadline {
                    return Err(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
    }

    fn kill_all(&mut self) {
        for replica in 0..self.children.len() {
            self.kill(replica);
        }
    }

    /// Freezes `replica` with SIGSTOP: its sockets stay open and its peers' connections up,
    /// but it runs nothing (a long GC pause, a stalled VM) until [`LocalCluster::resume`].
    /// A paused replica still dies on [`LocalCluster::kill`] and when the cluster drops.
    pub fn pause(&mut self, replica: usize) -> Result<(), ClusterError> {
        self.signal(replica, "STOP")
    }

    /// Lets a [`LocalCluster::pause`]d `replica` run again (SIGCONT).
    pub fn resume(&mut self, replica: usize) -> Result<(), ClusterError> {
        self.signal(replica, "CONT")
    }

    /// Sends `signal` to `replica`, which must be running.
    fn signal(&mut self, replica: usize, signal: &str) -> Result<(), ClusterError> {
        self.check_alive(replica)?;
        let pid = self.children[replica].as_ref().expect("alive").id();
        send_signal(pid, signal).map_err(|source| ClusterError::Io {
            path: PathBuf::from("kill"),
            source,
        })
    }

    /// Starts `replica` again with the same arguments and data directory, and waits until
    /// its client ports answer.
    pub fn restart(&mut self, replica: usize) -> Result<(), ClusterError> {
        if self.is_running(replica) {
            return Err(ClusterError::State {
                replica,
                running: true,
            });
        }
        self.spawn(replica)?;
        self.wait_ready(&[replica])
    }

    /// Stops `replica` with SIGTERM (it drains), waiting up to [`STOP_TIMEOUT_MS`] before
    /// SIGKILL. Returns its exit status.
    pub fn stop(&mut self, replica: usize) -> Result<ExitStatus, ClusterError> {
        self.stop_many(&[replica]).pop().expect("one replica")
    }

    /// Stops every running replica: SIGTERM to all at once (so leaders drain while their
    /// followers still run), then waits for each. One result per replica that was running.
    pub fn stop_all(&mut self) -> Vec<Result<ExitStatus, ClusterError>> {
        let running: Vec<usize> = (0..self.replicas())
            .filter(|&r| self.is_running(r))
            .collect();
        self.stop_many(&running)
    }

    fn stop_many(&mut self, replicas: &[usize]) -> Vec<Result<ExitStatus, ClusterError>> {
        let mut signalled = Vec::with_capacity(replicas.len());
        for &replica in replicas {
            let outcome = match self.children[replica].as_ref() {
                None => Err(ClusterError::State {
                    replica,
                    running: false,
                }),
                Some(child) => send_sigterm(child.id()).map_err(|source| ClusterError::Io {
                    path: PathBuf::from("kill"),
                    source,
                }),
            };
            signalled.push(outcome);
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_TIMEOUT_MS);
        replicas
            .iter()
            .zip(signalled)
            .map(|(&replica, signalled)| {
                signalled?;
                self.wait_exit(replica, deadline)
            })
            .collect()
    }

    fn wait_exit(&mut self, replica: usize, deadline: Instant) -> Result<ExitStatus, ClusterError> {
        let child = self.children[replica].as_mut().expect("signalled: running");
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.children[replica] = None;
                    self.wait_ports_released(replica);
                    return Ok(status);
                }
                Ok(None) if Instant::now() >= deadline => {
                    self.kill(replica);
                    return Err(ClusterError::StopTimedOut {
                        replica,
                        log_tail: self.log_tail(replica),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(PROBE_INTERVAL_MS)),
                Err(source) => {
                    self.kill(replica);
                    return Err(ClusterError::Io {
                        path: self.config.binary.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// `replica`'s metrics, Prometheus text (one plain HTTP/1.1 GET).
    pub fn scrape(&self, replica: usize) -> Result<String, ClusterError> {
        if !self.config.metrics {
            return Err(ClusterError::NoMetrics);
        }
        let address = self.metrics_address(replica);
        scrape_metrics(address).map_err(|source| ClusterError::Scrape {
            replica,
            address,
            source,
        })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// One ping to `shard` at `address`: whether it answered.
fn ping(shard: usize, address: SocketAddr) -> bool {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    let Ok(mut pipeline) = Pipeline::connect(
        shard,
        address,
        u128::from(u64::MAX),
        frame::FRAME_BYTES_MAX_DEFAULT,
        timeout,
    ) else {
        return false;
    };
    pipeline
        .send::<u8>(frame::OPERATION_PING, 1, &[])
        .and_then(|()| pipeline.receive(0).map(|_| ()))
        .is_ok()
}

/// `GET /metrics` from `address`; the body of a 200 answer.
pub fn scrape_metrics(address: SocketAddr) -> std::io::Result<String> {
    let timeout = Duration::from_millis(PROBE_TIMEOUT_MS);
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(std::io::Error::other("truncated HTTP response"));
    };
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("").to_string();
        return Err(std::io::Error::other(format!("HTTP status {status}")));
    }
    Ok(body.to_string())
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, e.g.
/// `metric(text, "percore_commit_op", "shard=\"0\"")`.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let rest = rest.strip_prefix('{')?.strip_prefix(labels)?;
        rest.strip_prefix("} ")?.trim().parse().ok()
    })
}

/// An unlabelled sample (`name value`), if present.
pub fn plain_metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|value| value as u64)
    })
}

/// A per-shard counter or gauge (`name{shard="k"}`), 0 when absent.
pub fn shard_metric(text: &str, name: &str, shard: usize) -> u64 {
    metric(text, name, &format!("shard=\"{shard}\"")).map_or(0, |value| value as u64)
}

/// A per-shard counter summed over every shard of one exposition.
pub fn metric_sum(text: &str, name: &str, shards: usize) -> u64 {
    (0..shards)
        .map(|shard| shard_metric(text, name, shard))
        .sum()
}

/// The cumulative bucket counts of histogram `name` for `shard`, in bucket order (the
/// last is `+Inf`): [`crate::metrics::LATENCY_BUCKETS_US`]`.len() + 1` values, zeros when
/// absent.
pub fn histogram_buckets(text: &str, name: &str, shard: usize) -> Vec<u64> {
    histogram_buckets_sized(
        text,
        name,
        shard,
        crate::metrics::LATENCY_BUCKETS_US.len() + 1,
    )
}

/// [`histogram_buckets`] of a histogram with `buckets` buckets, `+Inf` included (e.g.
/// `percore_commit_gap_us`: [`crate::metrics::COMMIT_GAP_BUCKETS_US`]`.len() + 1`).
pub fn histogram_buckets_sized(text: &str, name: &str, shard: usize, buckets: usize) -> Vec<u64> {
    let prefix = format!("{name}_bucket{{shard=\"{shard}\",le=\"");
    let mut counts: Vec<u64> = text
        .lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .take(buckets)
        .collect();
    counts.resize(buckets, 0);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_replicas_and_roles_apart() {
        let ports = layout_ports(20_000, 3, 2);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        assert_eq!(ports[..5], [20_000, 20_001, 20_050, 20_051, 20_099]);
        assert_eq!(*ports.last().unwrap(), 20_299);
    }

    #[test]
    fn free_port_base_skips_a_taken_port() {
        let base = free_port_base(3, 2).expect("a free range");
        assert!((PORT_BASE_MIN..PORT_MAX).contains(&base));
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, base + 150));
        let again = free_port_base(3, 2).expect("a free range");
        if taken.is_ok() {
            assert!(
                !layout_ports(again, 3, 2).contains(&(base + 150)),
                "base {again} overlaps the taken port {}",
                base + 150
            );
        }
    }

    #[test]
    fn replicas_sharing_cores_rotate_them_so_a_group_spreads() {
        let mut config = failing_cluster_config(PathBuf::from("false"), PathBuf::from("/none"));
        config.cores = vec![0, 1];
        config.replica_core_stride = 0;
        let cores: Vec<Vec<usize>> = (0..3).map(|r| config.replica_cores(r)).collect();
        assert_eq!(cores, vec![vec![0, 1], vec![1, 0], vec![0, 1]]);
        config.cores = vec![4];
        assert_eq!(config.replica_cores(3), vec![4]);
        config.cores = vec![0, 1];
        config.replica_core_stride = 2;
        assert_eq!(config.replica_cores(2), vec![4, 5]);
    }

    #[test]
    fn replicas_with_cores_of_their_own_share_only_the_spare_cores() {
        let mut config = failing_cluster_config(PathBuf::from("false"), PathBuf::from("/none"));
        config.cores = vec![0, 1];
        config.replica_core_stride = 2;
        let allowed: Vec<usize> = (0..8).collect();
        let (affinities, spare) = replica_affinities(&config, &allowed);
        assert_eq!(spare, vec![6, 7]);
        assert_eq!(
            affinities,
            vec![
                Some(vec![0, 1, 6, 7]),
                Some(vec![2, 3, 6, 7]),
                Some(vec![4, 5, 6, 7])
            ]
        );
        // Every core taken by a shard: each replica keeps to its own.
        let (affinities, spare) = replica_affinities(&config, &allowed[..6]);
        assert!(spare.is_empty());
        assert_eq!(affinities[1], Some(vec![2, 3]));
        // Shared cores: the replicas run as this process does.
        config.replica_core_stride = 0;
        assert_eq!(
            replica_affinities(&config, &allowed),
            (vec![None; 3], Vec::new())
        );
    }

    fn failing_cluster_config(binary: PathBuf, data_root: PathBuf) -> LocalClusterConfig {
        LocalClusterConfig {
            binary,
            replicas: 3,
            cores: vec![0, 0],
            replica_core_stride: 0,
            data_root,
            port_base: free_port_base(3, 2).expect("free ports"),
            fsync: "never",
            extra_args: Vec::new(),
            metrics: false,
        }
    }

    #[test]
    fn a_replica_that_exits_at_start_is_a_typed_error() {
        use std::os::unix::fs::PermissionsExt as _;
        let data_root =
            std::env::temp_dir().join(format!("percore-cluster-unit-{}", std::process::id()));
        std::fs::create_dir_all(&data_root).unwrap();
        // A "binary" whose `format` succeeds and whose `node` fails at once.
        let binary = data_root.join("fails-at-start.sh");
        std::fs::write(&binary, "#!/bin/sh\n[ \"$1\" = format ]\n").unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let outcome = LocalCluster::start(failing_cluster_config(binary, data_root.clone()));
        let _ = std::fs::remove_dir_all(&data_root);
        match outcome {
            Err(ClusterError::Exited {
                replica: 0, status, ..
            }) => assert!(!status.success()),
            other => panic!("expected replica 0 to have exited, got {other:?}"),
        }
    }

    #[test]
    fn a_replica_whose_format_fails_is_a_typed_error() {
        let data_root = std::env::temp_dir().join(format!(
            "percore-cluster-unit-format-{}",
            std::process::id()
        ));
        // A "binary" that fails at once, whatever its arguments.
        let config = failing_cluster_config(PathBuf::from("false"), data_root.clone());
        let outcome = LocalCluster::start(config);
        let _ = std::fs::remove_dir_all(&data_root);
        match outcome {
            Err(ClusterError::Format {
                replica: 0, status, ..
            }) => assert!(!status.success()),
            other => panic!("expected replica 0's format to fail, got {other:?}"),
        }
    }

    #[test]
    fn a_layout_past_the_last_port_is_refused() {
        let config = LocalClusterConfig {
            binary: PathBuf::from("false"),
            replicas: 3,
            cores: vec![0],
            replica_core_stride: 0,
            data_root: std::env::temp_dir(),
            port_base: u16::MAX - 250,
            fsync: "never",
            extra_args: Vec::new(),
            metrics: false,
        };
        assert!(matches!(
            LocalCluster::start(config),
            Err(ClusterError::Layout { replicas: 3, .. })
        ));
    }

    #[test]
    fn metrics_text_is_parsed() {
        let text = "percore_commit_op{shard=\"0\"} 12\n\
                    percore_commit_op{shard=\"1\"} 30\n\
                    percore_peer_lag_ops{shard=\"1\",peer=\"2\"} 4\n\
                    percore_commit_seconds_bucket{shard=\"1\",le=\"0.00001\"} 3\n\
                    percore_commit_seconds_bucket{shard=\"1\",le=\"0.00002\"} 5\n";
        assert_eq!(shard_metric(text, "percore_commit_op", 1), 30);
        assert_eq!(shard_metric(text, "percore_commit_op", 2), 0);
        assert_eq!(metric_sum(text, "percore_commit_op", 2), 42);
        assert_eq!(
            metric(text, "percore_peer_lag_ops", "shard=\"1\",peer=\"2\""),
            Some(4.0)
        );
        let buckets = histogram_buckets(text, "percore_commit_seconds", 1);
        assert_eq!(buckets.len(), crate::metrics::LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(buckets[..3], [3, 5, 0]);
    }

    #[test]
    fn commit_gaps_are_read_back_from_the_exported_text() {
        use crate::metrics::{COMMIT_GAP_BUCKETS_US, ShardMetrics};
        let metrics = ShardMetrics::new(1);
        metrics.commit_gap.record(150);
        metrics.commit_gap.record(2_500_000);
        let mut text = String::new();
        metrics.render(&mut text);
        let len = COMMIT_GAP_BUCKETS_US.len() + 1;
        let buckets = histogram_buckets_sized(&text, "percore_commit_gap_us", 1, len);
        let at_200 = COMMIT_GAP_BUCKETS_US
            .iter()
            .position(|&b| b == 200)
            .unwrap();
        assert_eq!(buckets.len(), len);
        assert_eq!(buckets[at_200 - 1], 0);
        assert_eq!(buckets[at_200], 1);
        assert_eq!(buckets[len - 2], 1);
        assert_eq!(buckets[len - 1], 2);
        assert_eq!(
            shard_metric(&text, "percore_commit_gap_max_us", 1),
            2_500_000
        );
        assert_eq!(shard_metric(&text, "percore_commit_gap_max_us", 0), 0);
    }
}
