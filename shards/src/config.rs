//! `percore node --config FILE`: the node file, and the checks every node start runs.
//!
//! Owns the file format ([`NodeFile`]: one flat TOML table whose keys are the `node` flags
//! with underscores, `--client-port-base` → `client_port_base`), the start-up checks that
//! name the bad key and value ([`StartCheck`], [`ConfigError`]), the peers digest operators
//! compare across nodes ([`PeersDigest`]) and the core/NUMA placement report. It must never
//! start anything: the ports it binds to test them are released before [`StartCheck::run`]
//! returns, and it only reads the data directory.

use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use percore_engine::journal::SUPERBLOCK_BYTES;
use serde::Deserialize;

use crate::journal::FsyncPolicy;

/// Every key a node file may hold, in the order `percore node --help` lists the flags.
/// A test checks that it matches [`NodeFile`] and that every `node` flag has a key.
pub const NODE_FILE_KEYS: &[&str] = &[
    "cores",
    "batch_entries_max",
    "batch_bytes_max",
    "linger_us",
    "transactions",
    "batches",
    "connections_max",
    "io_memory_kib",
    "allow_shared_cores",
    "executor_probe_us",
    "accounts_max",
    "transfers_max",
    "credit_legs_max",
    "session_clients_max",
    "listen",
    "client_port_base",
    "metrics",
    "data_dir",
    "fsync",
    "segment_mib",
    "checkpoint_interval_ops",
    "snapshot_write_mib_per_s",
    "segment_spare",
    "cluster_id",
    "replica",
    "peers",
    "cluster_key_file",
    "cluster_key_accept_file",
    "view_change",
    "retain_ops",
    "leader_rebalance_ms",
    "fault_model",
    "bft_keys_dir",
    "bft_test_byzantine",
    "bft_retain_ops",
];

/// Bits of the peers digest exported as a gauge: an f64 holds integers up to 2^53 exactly,
/// so 52 bits survive Prometheus' float samples unchanged.
pub const PEERS_DIGEST_BITS: u32 = 52;
const _: () = assert!(PEERS_DIGEST_BITS < f64::MANTISSA_DIGITS);

/// Largest node file read (bytes); a node file is a few hundred bytes.
pub const NODE_FILE_BYTES_MAX: u64 = 1 << 20;

/// A node file: every field is optional; a flag given on the command line wins over it.
/// Unknown keys are refused, so a misspelt key is an error rather than a silent default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// `--cores`: one shard per core, in shard order.
    pub cores: Option<Vec<usize>>,
    /// `--batch-entries-max`.
    pub batch_entries_max: Option<usize>,
    /// `--batch-bytes-max`.
    pub batch_bytes_max: Option<usize>,
    /// `--linger-us`.
    pub linger_us: Option<u64>,
    /// `--transactions`.
    pub transactions: Option<usize>,
    /// `--batches`.
    pub batches: Option<usize>,
    /// `--connections-max`.
    pub connections_max: Option<usize>,
    /// `--io-memory-kib`.
    pub io_memory_kib: Option<usize>,
    /// `--allow-shared-cores`.
    pub allow_shared_cores: Option<bool>,
    /// `--executor-probe-us`.
    pub executor_probe_us: Option<u64>,
    /// `--accounts-max`.
    pub accounts_max: Option<usize>,
    /// `--transfers-max`.
    pub transfers_max: Option<usize>,
    /// `--credit-legs-max`.
    pub credit_legs_max: Option<usize>,
    /// `--session-clients-max`.
    pub session_clients_max: Option<usize>,
    /// `--listen`.
    pub listen: Option<IpAddr>,
    /// `--client-port-base`.
    pub client_port_base: Option<u16>,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--fsync`: "always", "dsync" or "never".
    #[serde(default, deserialize_with = "fsync_from_text")]
    pub fsync: Option<FsyncPolicy>,
    /// `--segment-mib`.
    pub segment_mib: Option<u64>,
    /// `--checkpoint-interval-ops`.
    pub checkpoint_interval_ops: Option<u64>,
    /// `--snapshot-write-mib-per-s`.
    pub snapshot_write_mib_per_s: Option<u64>,
    /// `--segment-spare`.
    pub segment_spare: Option<bool>,
    /// `--cluster-id`: hex digits in a string, as on the command line ("1", "0x2a").
    #[serde(default, deserialize_with = "cluster_id_from_text")]
    pub cluster_id: Option<u128>,
    /// `--replica`.
    pub replica: Option<u8>,
    /// `--peers`: a list of "host:port" strings in replica order.
    pub peers: Option<Vec<SocketAddr>>,
    /// `--cluster-key-file`.
    pub cluster_key_file: Option<PathBuf>,
    /// `--cluster-key-accept-file` (during a key rotation).
    pub cluster_key_accept_file: Option<PathBuf>,
    /// Leader failover (default true); `false` is `--fixed-view`.
    pub view_change: Option<bool>,
    /// `--retain-ops`.
    pub retain_ops: Option<u64>,
    /// `--leader-rebalance-ms`.
    pub leader_rebalance_ms: Option<u64>,
    /// `--fault-model`: "crash" or "bft".
    pub fault_model: Option<crate::bft::FaultModel>,
    /// `--bft-keys-dir`.
    pub bft_keys_dir: Option<PathBuf>,
    /// `--bft-test-byzantine` (tests only): "equivocate", "silent", "wrong-digest",
    /// "corrupt-snapshot", "invalid-batch", "forge-request", "forge-leg" or
    /// "replay-request".
    pub bft_test_byzantine: Option<crate::bft::Byzantine>,
    /// `--bft-retain-ops`.
    pub bft_retain_ops: Option<u64>,
}

fn fsync_from_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<FsyncPolicy>, D::Error> {
    let text = String::deserialize(deserializer)?;
    <FsyncPolicy as clap::ValueEnum>::from_str(&text, false)
        .map(Some)
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "fsync = \"{text}\": expected \"always\", \"dsync\" or \"never\""
            ))
        })
}

/// Parses a cluster id as `--cluster-id` does: hex digits, an optional `0x`.
pub fn parse_cluster_id(text: &str) -> Result<u128, String> {
    u128::from_str_radix(text.trim_start_matches("0x"), 16)
        .map_err(|err| format!("not a hex cluster id: {err}"))
}

fn cluster_id_from_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u128>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_cluster_id(&text).map(Some).map_err(|err| {
        serde::de::Error::custom(format!(
            "cluster_id = \"{text}\": {err} (a string of hex digits)"
        ))
    })
}

impl NodeFile {
    /// Reads and parses the node file at `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let io = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::metadata(path).map_err(io)?.len();
        if bytes > NODE_FILE_BYTES_MAX {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses node file text; the error names the key and shows the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|err| err.to_string().trim_end().to_string())
    }
}

/// A key, printed with the flag that sets the same value: `` `cluster_id` (--cluster-id) ``.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(pub &'static str);

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (--{})", self.0, self.0.replace('_', "-"))
    }
}

/// What a port is for, as an error states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// Shard `k`'s client listener.
    Client {
        /// Shard index.
        shard: usize,
    },
    /// Shard `k`'s peer listener.
    Peer {
        /// Shard index.
        shard: usize,
    },
    /// The metrics endpoint.
    Metrics,
}

impl PortRole {
    fn key(self) -> Key {
        match self {
            Self::Client { .. } => Key("client_port_base"),
            Self::Peer { .. } => Key("peers"),
            Self::Metrics => Key("metrics"),
        }
    }
}

impl fmt::Display for PortRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client { shard } => write!(f, "client port of shard {shard}"),
            Self::Peer { shard } => write!(f, "peer port of shard {shard}"),
            Self::Metrics => write!(f, "metrics port"),
        }
    }
}

/// Why a node refuses to start: each names the key (and flag) and the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The node file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The node file is larger than [`NODE_FILE_BYTES_MAX`].
    #[error(
        "config file {path}: {bytes} bytes, more than the {NODE_FILE_BYTES_MAX} a node file may have"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// The node file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the key and quotes the line).
        message: String,
    },
    /// No cores.
    #[error("{}: empty: give at least one core", Key("cores"))]
    NoCores,
    /// A core that is not online on this machine.
    #[error(
        "{}: core {core} does not exist on this machine (online CPUs: {online})",
        Key("cores")
    )]
    NoSuchCore {
        /// The core asked for.
        core: usize,
        /// The online CPU list, as /sys/devices/system/cpu/online gives it.
        online: String,
    },
    /// A core outside this process's CPU affinity (taskset, systemd `CPUAffinity=`, cpusets).
    #[error(
        "{}: core {core} is outside this process's CPU affinity (Cpus_allowed_list {allowed}): \
         check taskset, systemd CPUAffinity= or the cgroup cpuset",
        Key("cores")
    )]
    CoreNotAllowed {
        /// The core asked for.
        core: usize,
        /// The allowed list from /proc/self/status.
        allowed: String,
    },
    /// A core listed twice without `allow_shared_cores`.
    #[error(
        "{}: core {core} is listed twice: one shard per core (set {} to share)",
        Key("cores"),
        Key("allow_shared_cores")
    )]
    SharedCore {
        /// The repeated core.
        core: usize,
    },
    /// `replica` without `peers`.
    #[error(
        "{} = {replica} needs {}: the peer address of every replica",
        Key("replica"),
        Key("peers")
    )]
    ReplicaWithoutPeers {
        /// The replica index.
        replica: u8,
    },
    /// `peers` without `replica`.
    #[error(
        "{} is set but {} is not: give this node's index in the peers list",
        Key("peers"),
        Key("replica")
    )]
    PeersWithoutReplica,
    /// More peers than the protocol supports.
    #[error(
        "{}: {count} replicas listed, at most {max} are supported",
        Key("peers")
    )]
    TooManyReplicas {
        /// Peers listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// `replica` is not an index into `peers`.
    #[error(
        "{} = {replica} is outside {}: {count} peer(s) listed, so the index must be below {count}",
        Key("replica"),
        Key("peers")
    )]
    ReplicaOutsidePeers {
        /// The replica index.
        replica: u8,
        /// Peers listed.
        count: usize,
    },
    /// One address listed for two replicas.
    #[error(
        "{}: {address} is listed twice (replicas {first} and {second})",
        Key("peers")
    )]
    DuplicatePeer {
        /// The repeated address.
        address: SocketAddr,
        /// First replica with it.
        first: usize,
        /// Second replica with it.
        second: usize,
    },
    /// Two replicas on one host whose per-shard peer port ranges overlap.
    #[error(
        "{}: replicas {first} ({first_address}) and {second} ({second_address}) overlap: each \
         replica uses {shards} consecutive peer port(s), one per shard",
        Key("peers")
    )]
    PeerPortsOverlap {
        /// One replica.
        first: usize,
        /// Its address.
        first_address: SocketAddr,
        /// The other.
        second: usize,
        /// Its address.
        second_address: SocketAddr,
        /// Shards per node.
        shards: usize,
    },
    /// A port range that runs past 65535.
    #[error("{key} = {port}: {shards} shard(s) need ports up to {port} + {shards} - 1, past 65535")]
    PortRange {
        /// The key.
        key: Key,
        /// The first port.
        port: u16,
        /// Shards per node.
        shards: usize,
    },
    /// Two of this node's own listeners would use one port.
    #[error("{first_key} and {second_key} both use {address}: the {first} and the {second}")]
    PortsOverlap {
        /// The port.
        address: SocketAddr,
        /// One use.
        first: PortRole,
        /// Its key.
        first_key: Key,
        /// The other use.
        second: PortRole,
        /// Its key.
        second_key: Key,
    },
    /// A port already in use, or an address not on this host.
    #[error("{role} {address} ({key}) is not available: {source}{hint}", key = role.key())]
    PortUnavailable {
        /// What the port is for.
        role: PortRole,
        /// The address tried.
        address: SocketAddr,
        /// What the probe found.
        source: std::io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// The data directory holds another cluster's journal.
    #[error(
        "{} = {expected:x}: data_dir {} belongs to cluster {found:x} (superblock {}); a node \
         never takes over another cluster's journal: use this cluster's data directory or an \
         empty one",
        Key("cluster_id"),
        data_dir.display(),
        superblock.display()
    )]
    ForeignCluster {
        /// The configured data directory.
        data_dir: PathBuf,
        /// The superblock that says so.
        superblock: PathBuf,
        /// The configured cluster id.
        expected: u128,
        /// The cluster id on disk.
        found: u128,
    },
}

/// What a node is about to start with, as far as the start-up checks need it.
#[derive(Debug, Clone)]
pub struct StartCheck {
    /// One shard per core.
    pub cores: Vec<usize>,
    /// Whether a core may run two shards.
    pub allow_shared_cores: bool,
    /// Client listener address.
    pub listen: IpAddr,
    /// Shard `k` serves clients on this + `k` (0: any free port, not checked).
    pub client_port_base: u16,
    /// Metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// The journal's data directory.
    pub data_dir: Option<PathBuf>,
    /// The configured cluster id.
    pub cluster_id: u128,
    /// This node's replica index.
    pub replica: Option<u8>,
    /// Every replica's peer address, in replica order.
    pub peers: Vec<SocketAddr>,
}

impl StartCheck {
    /// Runs every check; the first failure names its key and value.
    pub fn run(&self) -> Result<(), ConfigError> {
        self.check_layout()?;
        let listeners = self.listeners()?;
        check_overlaps(&listeners)?;
        check_bindable(
            &listeners,
            std::time::Duration::from_millis(PORT_RELEASE_WAIT_MS),
        )?;
        if let Some(data_dir) = &self.data_dir {
            check_data_dir(data_dir, self.cores.len(), self.cluster_id)?;
        }
        Ok(())
    }

    /// The checks that need no socket or directory: cores, replica index, peers (what
    /// `percore format` checks before it writes the replica's identity).
    pub fn check_layout(&self) -> Result<(), ConfigError> {
        check_cores(&self.cores, self.allow_shared_cores)?;
        self.check_replication()
    }

    fn check_replication(&self) -> Result<(), ConfigError> {
        let count = self.peers.len();
        match (self.replica, count) {
            (None, 0) => return Ok(()),
            (Some(replica), 0) => return Err(ConfigError::ReplicaWithoutPeers { replica }),
            (None, _) => return Err(ConfigError::PeersWithoutReplica),
            (Some(replica), count) if usize::from(replica) >= count => {
                return Err(ConfigError::ReplicaOutsidePeers { replica, count });
            }
            _ => {}
        }
        let max = percore_engine::replica::REPLICA_COUNT_MAX;
        if count > max {
            return Err(ConfigError::TooManyReplicas { count, max });
        }
        let shards = self.cores.len();
        // Every replica's shards listen on its port plus the shard index: one whose range
        // ran past 65535 was dialed at a wrapped port for ever.
        for peer in &self.peers {
            if usize::from(peer.port()) + shards - 1 > usize::from(u16::MAX) {
                return Err(ConfigError::PortRange {
                    key: Key("peers"),
                    port: peer.port(),
                    shards,
                });
            }
        }
        for (second, b) in self.peers.iter().enumerate() {
            for (first, a) in self.peers[..second].iter().enumerate() {
                if a == b {
                    return Err(ConfigError::DuplicatePeer {
                        address: *a,
                        first,
                        second,
                    });
                }
                let distance = a.port().abs_diff(b.port()) as usize;
                if a.ip() == b.ip() && distance < shards {
                    return Err(ConfigError::PeerPortsOverlap {
                        first,
                        first_address: *a,
                        second,
                        second_address: *b,
                        shards,
                    });
                }
            }
        }
        Ok(())
    }

    /// Every listener this node will open whose port is fixed by the configuration.
    fn listeners(&self) -> Result<Vec<(PortRole, SocketAddr)>, ConfigError> {
        let shards = self.cores.len();
        let range = |key: &'static str, port: u16| {
            let last = usize::from(port) + shards - 1;
            if last > usize::from(u16::MAX) {
                return Err(ConfigError::PortRange {
                    key: Key(key),
                    port,
                    shards,
                });
            }
            Ok((0..shards).map(move |k| port + k as u16))
        };
        let mut listeners = Vec::with_capacity(2 * shards + 1);
        if self.client_port_base != 0 {
            for (shard, port) in range("client_port_base", self.client_port_base)?.enumerate() {
                let address = SocketAddr::new(self.listen, port);
                listeners.push((PortRole::Client { shard }, address));
            }
        }
        if let Some(replica) = self.replica {
            let own = self.peers[usize::from(replica)];
            for (shard, port) in range("peers", own.port())?.enumerate() {
                let address = SocketAddr::new(own.ip(), port);
                listeners.push((PortRole::Peer { shard }, address));
            }
        }
        if let Some(metrics) = self.metrics.filter(|address| address.port() != 0) {
            listeners.push((PortRole::Metrics, metrics));
        }
        Ok(listeners)
    }
}

/// Two listeners of this node on one port (same address, or either a wildcard).
fn check_overlaps(listeners: &[(PortRole, SocketAddr)]) -> Result<(), ConfigError> {
    for (index, (second, b)) in listeners.iter().enumerate() {
        for (first, a) in &listeners[..index] {
            let same_host = a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
            if a.port() == b.port() && same_host {
                return Err(ConfigError::PortsOverlap {
                    address: *b,
                    first: *first,
                    first_key: first.key(),
                    second: *second,
                    second_key: second.key(),
                });
            }
        }
    }
    Ok(())
}

/// How long a probe connection to one of this host's own ports may take (ms).
pub const PORT_PROBE_TIMEOUT_MS: u64 = 200;

/// How long a port that accepts connections is watched before the start is refused (ms).
/// A node killed a moment ago still accepts for a while after its process was reaped: its
/// io_uring instances are torn down by the kernel in the background, and a listening socket
/// with an accept in flight lives until then (5-18 ms after `SIGKILL` and `wait` on the
/// idle 2-vCPU VM, longer under load). A restart in that window would share the port with
/// the dying socket (`SO_REUSEPORT`) and lose the connections queued on it.
pub const PORT_RELEASE_WAIT_MS: u64 = 2_000;

/// How often a port that accepted the probe is probed again while it may be released (ms).
const PORT_RELEASE_POLL_MS: u64 = 20;

/// Checks each listener before the shards bind it: its address must belong to this host, and
/// no process may already accept connections on it (the test is a connection, not a bind:
/// glommio binds with `SO_REUSEPORT`, so a plain bind would refuse a port that only has
/// connections in TIME_WAIT, which the node itself binds fine, and would not notice a second
/// node started by the same user, which the kernel would let share the port). A port that
/// accepts is probed again for up to `release_wait`: a process that is exiting releases it.
fn check_bindable(
    listeners: &[(PortRole, SocketAddr)],
    release_wait: std::time::Duration,
) -> Result<(), ConfigError> {
    let timeout = std::time::Duration::from_millis(PORT_PROBE_TIMEOUT_MS);
    for &(role, address) in listeners {
        if !address.ip().is_unspecified()
            && let Err(source) = TcpListener::bind(SocketAddr::new(address.ip(), 0))
        {
            let hint = match (role, source.kind()) {
                (PortRole::Peer { .. }, std::io::ErrorKind::AddrNotAvailable) => {
                    " (not an address of this host: is `replica` this host's index in `peers`?)"
                }
                (PortRole::Client { .. }, std::io::ErrorKind::AddrNotAvailable) => {
                    " (not an address of this host: check `listen`)"
                }
                (_, std::io::ErrorKind::AddrNotAvailable) => " (not an address of this host)",
                _ => "",
            };
            return Err(ConfigError::PortUnavailable {
                role,
                address,
                source,
                hint,
            });
        }
        let mut probe = address;
        if probe.ip().is_unspecified() {
            probe.set_ip(match probe {
                SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let accepts = || std::net::TcpStream::connect_timeout(&probe, timeout).is_ok();
        let watched = std::time::Instant::now();
        let mut accepting = accepts();
        while accepting && watched.elapsed() < release_wait {
            std::thread::sleep(std::time::Duration::from_millis(PORT_RELEASE_POLL_MS));
            accepting = accepts();
        }
        if accepting {
            return Err(ConfigError::PortUnavailable {
                role,
                address,
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
                hint: " (a process kept accepting connections there: another percore node, or a leftover one)",
            });
        }
    }
    Ok(())
}

/// Each existing `shard-<k>/superblock` under `data_dir` must carry `cluster_id`. Superblocks
/// that cannot be read or decoded are left to the journal, which reports them in detail.
fn check_data_dir(data_dir: &Path, shards: usize, cluster_id: u128) -> Result<(), ConfigError> {
    for shard in 0..shards {
        let path = data_dir
            .join(format!("shard-{shard}"))
            .join(crate::journal::SUPERBLOCK_FILE_NAME);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let (copy0, copy1) = bytes.split_at(SUPERBLOCK_BYTES.min(bytes.len()));
        let Ok(superblock) = percore_engine::journal::superblock_latest(copy0, copy1) else {
            continue;
        };
        if superblock.cluster_id != cluster_id {
            return Err(ConfigError::ForeignCluster {
                data_dir: data_dir.to_path_buf(),
                superblock: path,
                expected: cluster_id,
                found: superblock.cluster_id,
            });
        }
    }
    Ok(())
}

/// CPUs in a Linux CPU list ("0-3,8,10-11"); `None` if it does not parse.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|part| !part.is_empty()) {
        let (first, last): (usize, usize) = match part.split_once('-') {
            Some((first, last)) => (first.parse().ok()?, last.parse().ok()?),
            None => {
                let cpu = part.parse().ok()?;
                (cpu, cpu)
            }
        };
        if last < first || last - first > 1 << 16 {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

/// The CPUs this process may run on, from /proc/self/status (`None` if unknown).
pub fn cpus_allowed() -> Option<(String, Vec<usize>)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?
        .trim()
        .to_string();
    let cpus = parse_cpu_list(&list)?;
    Some((list, cpus))
}

/// Validates `cores` against this machine: online, inside this process's affinity, and not
/// repeated unless `allow_shared_cores`. The runtime checks the first and last again at
/// start; this version names the key and the CPU lists.
pub fn check_cores(cores: &[usize], allow_shared_cores: bool) -> Result<(), ConfigError> {
    if cores.is_empty() {
        return Err(ConfigError::NoCores);
    }
    if !allow_shared_cores {
        for (index, core) in cores.iter().enumerate() {
            if cores[..index].contains(core) {
                return Err(ConfigError::SharedCore { core: *core });
            }
        }
    }
    let online_text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok();
    let online = online_text.as_deref().and_then(parse_cpu_list);
    let (online_list, online) = match (online_text, online) {
        (Some(text), Some(cpus)) => (text.trim().to_string(), cpus),
        _ => {
            let count = std::thread::available_parallelism().map_or(1, |n| n.get());
            (format!("0-{}", count - 1), (0..count).collect())
        }
    };
    for &core in cores {
        if !online.contains(&core) {
            return Err(ConfigError::NoSuchCore {
                core,
                online: online_list,
            });
        }
    }
    if let Some((allowed_list, allowed)) = cpus_allowed()
        && let Some(&core) = cores.iter().find(|core| !allowed.contains(core))
    {
        return Err(ConfigError::CoreNotAllowed {
            core,
            allowed: allowed_list,
        });
    }
    Ok(())
}

/// The low [`PEERS_DIGEST_BITS`] bits of BLAKE3 over the replica count and the peers list in
/// replica order. Every node of a correctly configured cluster has the same one.
///
/// Order counts: the position in the list is the replica index, so two nodes that list the
/// same addresses in different orders disagree about who is who, and must not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PeersDigest(pub u64);

impl PeersDigest {
    /// The digest of `peers` (empty for a single node: one replica, no peers).
    pub fn of(peers: &[SocketAddr]) -> Self {
        let replicas = peers.len().max(1) as u64;
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"percore peers digest v1\0");
        hasher.update(&replicas.to_le_bytes());
        for peer in peers {
            hasher.update(peer.to_string().as_bytes());
            hasher.update(b"\n");
        }
        Self(low_bits(&hasher))
    }
}

/// Digest of the settings that decide results, which every replica of a group must share:
/// the shard count and the state machine's own ([`StateMachine::settings_digest`]; for the
/// ledger `accounts_max`, `transfers_max`, `credit_legs_max` and `session_clients_max`).
/// Replicas whose digests differ refuse each other at the peer handshake. 52 bits, like
/// [`PeersDigest`], so that a metric sample holds it exactly.
///
/// [`StateMachine::settings_digest`]: percore_engine::state_machine::StateMachine::settings_digest
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsDigest(pub u64);

impl SettingsDigest {
    /// The digest of a node of `shard_count` shards whose state machine reports
    /// `machine_digest`.
    pub fn of(shard_count: usize, machine_digest: u64) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"percore settings digest v1\0");
        hasher.update(&(shard_count as u64).to_le_bytes());
        hasher.update(&machine_digest.to_le_bytes());
        Self(low_bits(&hasher))
    }

    /// The digest of shard `machine`'s node of `shard_count` shards (what the runtime puts
    /// in its handshakes).
    pub fn of_machine<S: percore_engine::state_machine::StateMachine>(
        shard_count: usize,
        machine: &S,
    ) -> Self {
        Self::of(shard_count, machine.settings_digest())
    }

    /// BFT mode: the batch cap decides results too (replicas cut the certified chunks of
    /// legs in flight at the cap, and size the view-change messages from it), so the
    /// digest covers it. Crash-fault replicas may run different batch limits for a while
    /// (a rolling raise).
    pub fn with_bft_batch(self, records_max: usize) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"percore settings digest bft v1\0");
        hasher.update(&self.0.to_le_bytes());
        hasher.update(&(records_max as u64).to_le_bytes());
        Self(low_bits(&hasher))
    }

    /// The digest of a `percore node` (the ledger in a session table of
    /// `session_clients_max`), without building the ledger: what its metrics report and
    /// its start prints.
    pub fn of_ledger(
        shard_count: usize,
        ledger: &percore_engine::ledger::LedgerConfig,
        session_clients_max: usize,
    ) -> Self {
        let machine =
            percore_engine::session::settings_digest(session_clients_max, ledger.settings_digest());
        Self::of(shard_count, machine)
    }
}

/// The low [`PEERS_DIGEST_BITS`] bits of `hasher`'s digest (what a metric sample holds
/// exactly).
fn low_bits(hasher: &blake3::Hasher) -> u64 {
    let hash = hasher.finalize();
    let low = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    low & ((1 << PEERS_DIGEST_BITS) - 1)
}

impl fmt::Display for SettingsDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:013x}", self.0)
    }
}

impl fmt::Display for PeersDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 52 bits are 13 hex digits.
        write!(f, "{:013x}", self.0)
    }
}

/// Where one shard runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CorePlacement {
    /// Shard index.
    pub shard: usize,
    /// Its core.
    pub core: usize,
    /// The NUMA node of the core (`nodeK` under /sys/devices/system/cpu/cpuN/), if known.
    pub numa_node: Option<u32>,
    /// The core's SMT siblings (`topology/thread_siblings_list`), if known.
    pub smt_siblings: Option<String>,
}

/// The NUMA node of `core`, from the `nodeK` link sysfs puts under the CPU's directory.
pub fn numa_node_of(core: usize) -> Option<u32> {
    let dir = format!("/sys/devices/system/cpu/cpu{core}");
    std::fs::read_dir(dir).ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        name.strip_prefix("node")?.parse().ok()
    })
}

/// Each shard's core, NUMA node and SMT siblings.
pub fn placement(cores: &[usize]) -> Vec<CorePlacement> {
    cores
        .iter()
        .enumerate()
        .map(|(shard, &core)| CorePlacement {
            shard,
            core,
            numa_node: numa_node_of(core),
            smt_siblings: std::fs::read_to_string(format!(
                "/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list"
            ))
            .ok()
            .map(|text| text.trim().to_string()),
        })
        .collect()
}

/// The placement report printed at start: one line per shard, then what an operator
/// should know (shards spread over NUMA nodes, shards on SMT siblings of one core).
pub fn placement_report(placements: &[CorePlacement]) -> Vec<String> {
    let mut lines: Vec<String> = placements
        .iter()
        .map(|p| {
            let numa = p.numa_node.map_or_else(
                || "numa unknown".to_string(),
                |node| format!("NUMA node {node}"),
            );
            format!("shard {} pinned to core {}, {numa}", p.shard, p.core)
        })
        .collect();
    let mut nodes: Vec<u32> = placements.iter().filter_map(|p| p.numa_node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    if nodes.len() > 1 {
        lines.push(format!(
            "note: shards span NUMA nodes {nodes:?}; cross-shard messages cross the interconnect"
        ));
    }
    for (index, p) in placements.iter().enumerate() {
        let Some(siblings) = p.smt_siblings.as_deref().and_then(parse_cpu_list) else {
            continue;
        };
        for q in &placements[..index] {
            if q.core != p.core && siblings.contains(&q.core) {
                lines.push(format!(
                    "note: shards {} and {} run on SMT siblings of one physical core ({} and {})",
                    q.shard, p.shard, q.core, p.core
                ));
            }
        }
    }
    lines
}

/// Node-level gauges appended to every metrics scrape: the peers and settings digests, the
/// replica count and index, and each shard's core and NUMA node. Rendered once at start.
pub fn render_node_gauges(
    (digest, settings): (PeersDigest, SettingsDigest),
    replica: Option<u8>,
    replicas: usize,
    placements: &[CorePlacement],
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    gauge(
        "percore_config_peers_digest",
        "Low 52 bits of BLAKE3 over the replica count and the peers list in replica order; equal on every node of one cluster.",
        &[(String::new(), digest.0)],
    );
    gauge(
        "percore_config_settings_digest",
        "Low 52 bits of BLAKE3 over the settings that decide results (shard count, accounts_max, transfers_max, credit_legs_max, session_clients_max); equal on every node of one cluster, or replicas refuse each other.",
        &[(String::new(), settings.0)],
    );
    gauge(
        "percore_config_replica_count",
        "Replicas per replication group (1: a single node).",
        &[(String::new(), replicas as u64)],
    );
    gauge(
        "percore_config_replica_index",
        "This node's replica index (0 on a single node).",
        &[(String::new(), u64::from(replica.unwrap_or(0)))],
    );
    let cores: Vec<(String, u64)> = placements
        .iter()
        .map(|p| (format!("{{shard=\"{}\"}}", p.shard), p.core as u64))
        .collect();
    gauge(
        "percore_config_shard_core",
        "CPU core the shard's executor is pinned to.",
        &cores,
    );
    let numa: Vec<(String, u64)> = placements
        .iter()
        .filter_map(|p| {
            Some((
                format!("{{shard=\"{}\"}}", p.shard),
                u64::from(p.numa_node?),
            ))
        })
        .collect();
    gauge(
        "percore_config_shard_numa_node",
        "NUMA node of the shard's core (absent when unknown).",
        &numa,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_file_keys_match_the_struct() {
        // serde lists every field it expects when it meets an unknown one.
        let message = NodeFile::parse("not_a_key = 1").unwrap_err();
        assert!(message.contains("not_a_key"), "{message}");
        for key in NODE_FILE_KEYS {
            assert!(message.contains(&format!("`{key}`")), "{key}: {message}");
        }
        assert_eq!(
            message.matches('`').count(),
            2 * (NODE_FILE_KEYS.len() + 1),
            "{message}"
        );
    }

    #[test]
    fn the_example_file_parses_and_sets_every_key() {
        let text = include_str!("../../deploy/node.example.toml");
        let file = NodeFile::parse(text).expect("deploy/node.example.toml parses");
        assert_eq!(file.cluster_id, Some(1));
        assert_eq!(file.fsync, Some(FsyncPolicy::Always));
        for key in NODE_FILE_KEYS {
            assert!(
                text.lines().any(|line| line
                    .trim_start()
                    .trim_start_matches("# ")
                    .starts_with(&format!("{key} ="))),
                "deploy/node.example.toml does not show `{key}`"
            );
        }
    }

    #[test]
    fn values_of_the_wrong_kind_name_the_key() {
        let message = NodeFile::parse("fsync = \"sometimes\"").unwrap_err();
        assert!(message.contains("fsync = \"sometimes\""), "{message}");
        assert!(message.contains("\"dsync\""), "{message}");
        let file = NodeFile::parse("fsync = \"dsync\"").unwrap();
        assert_eq!(file.fsync, Some(FsyncPolicy::Dsync));
        let message = NodeFile::parse("cluster_id = \"xyz\"").unwrap_err();
        assert!(message.contains("cluster_id"), "{message}");
        let message = NodeFile::parse("client_port_base = 70000").unwrap_err();
        assert!(message.contains("client_port_base"), "{message}");
        let file = NodeFile::parse("cluster_id = \"0x2a\"\npeers = [\"127.0.0.1:7100\"]").unwrap();
        assert_eq!(file.cluster_id, Some(0x2a));
        assert_eq!(file.peers.unwrap().len(), 1);
    }

    #[test]
    fn fsync_policies_are_named_as_the_flag_spells_them() {
        for policy in [FsyncPolicy::Always, FsyncPolicy::Dsync, FsyncPolicy::Never] {
            let parsed = <FsyncPolicy as clap::ValueEnum>::from_str(policy.arg_name(), false);
            assert_eq!(parsed, Ok(policy));
        }
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    fn check(peers: &[&str], replica: Option<u8>) -> StartCheck {
        StartCheck {
            cores: vec![0, 0],
            allow_shared_cores: true,
            listen: IpAddr::from([127, 0, 0, 1]),
            client_port_base: 0,
            metrics: None,
            data_dir: None,
            cluster_id: 1,
            replica,
            peers: peers.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn peer_lists_are_checked() {
        let outcome = check(&["127.0.0.1:7100", "127.0.0.1:7100"], Some(0)).check_replication();
        assert!(matches!(
            outcome,
            Err(ConfigError::DuplicatePeer {
                first: 0,
                second: 1,
                ..
            })
        ));
        let outcome = check(&["127.0.0.1:7100", "127.0.0.1:7101"], Some(0)).check_replication();
        assert!(matches!(outcome, Err(ConfigError::PeerPortsOverlap { .. })));
        let outcome = check(&["127.0.0.1:7100"], Some(1)).check_replication();
        assert!(matches!(
            outcome,
            Err(ConfigError::ReplicaOutsidePeers {
                replica: 1,
                count: 1
            })
        ));
        let outcome = check(&["127.0.0.1:7100"], None).check_replication();
        assert!(matches!(outcome, Err(ConfigError::PeersWithoutReplica)));
        let ok = check(
            &["127.0.0.1:7100", "127.0.0.1:7102", "10.0.0.1:7100"],
            Some(2),
        );
        assert!(ok.check_replication().is_ok());
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut start = check(&[], None);
        start.cores = vec![0];
        start.client_port_base = port;
        let error = start.run().unwrap_err();
        let message = error.to_string();
        assert!(matches!(
            error,
            ConfigError::PortUnavailable {
                role: PortRole::Client { shard: 0 },
                ..
            }
        ));
        assert!(message.contains("client_port_base"), "{message}");
        assert!(message.contains(&port.to_string()), "{message}");
    }

    #[test]
    fn a_port_released_while_watched_is_taken() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let role = PortRole::Client { shard: 0 };
        let wait = std::time::Duration::from_millis(100);
        let held = check_bindable(&[(role, address)], wait).unwrap_err();
        assert!(held.to_string().contains("kept accepting"), "{held}");
        // As a node's dying listener: it accepts for a while, then goes.
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            drop(listener);
        });
        let released = check_bindable(&[(role, address)], std::time::Duration::from_secs(10));
        closer.join().unwrap();
        assert!(released.is_ok(), "{released:?}");
    }

    #[test]
    fn own_listeners_on_one_port_are_named() {
        let mut start = check(&["127.0.0.1:7100"], Some(0));
        start.cores = vec![0];
        start.client_port_base = 7100;
        start.listen = IpAddr::from([0, 0, 0, 0]);
        let message = start.run().unwrap_err().to_string();
        assert!(
            message.contains("client_port_base") && message.contains("peers"),
            "{message}"
        );
    }

    #[test]
    fn the_digest_depends_on_order_and_count() {
        let a: SocketAddr = "10.0.0.1:7100".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7100".parse().unwrap();
        let digest = PeersDigest::of(&[a, b]);
        assert_eq!(digest, PeersDigest::of(&[a, b]));
        assert_ne!(digest, PeersDigest::of(&[b, a]));
        assert_ne!(digest, PeersDigest::of(&[a]));
        assert!(digest.0 < 1 << PEERS_DIGEST_BITS);
        assert_eq!(digest.to_string().len(), 13);
    }

    /// What a node prints and exports is what its shards put in their handshakes, and
    /// every setting that decides results changes it.
    #[test]
    fn the_settings_digest_covers_what_decides_results() {
        use percore_engine::ledger::{Ledger, LedgerConfig};
        use percore_engine::session::Sessioned;
        let config = LedgerConfig {
            accounts_max: 64,
            transfers_max: 128,
            credit_legs_in_flight_max: 32,
            batch_entries_max: 16,
            ..LedgerConfig::new(1, 2)
        };
        let digest = SettingsDigest::of_ledger(2, &config, 8);
        let machine = Sessioned::new(Ledger::new(config), 8, 16);
        assert_eq!(digest, SettingsDigest::of_machine(2, &machine));
        assert!(digest.0 < 1 << PEERS_DIGEST_BITS);
        // The shard index and batch cap do not decide results; each of the others does.
        let same = LedgerConfig {
            shard_index: 0,
            batch_entries_max: 1000,
            ..config
        };
        assert_eq!(digest, SettingsDigest::of_ledger(2, &same, 8));
        let differing = [
            SettingsDigest::of_ledger(3, &config, 8),
            SettingsDigest::of_ledger(2, &config, 9),
            SettingsDigest::of_ledger(
                2,
                &LedgerConfig {
                    accounts_max: 65,
                    ..config
                },
                8,
            ),
            SettingsDigest::of_ledger(
                2,
                &LedgerConfig {
                    transfers_max: 129,
                    ..config
                },
                8,
            ),
            SettingsDigest::of_ledger(
                2,
                &LedgerConfig {
                    credit_legs_in_flight_max: 33,
                    ..config
                },
                8,
            ),
        ];
        for other in differing {
            assert_ne!(digest, other);
        }
        // BFT mode covers the batch cap as well.
        assert_ne!(digest.with_bft_batch(1000), digest);
        assert_ne!(digest.with_bft_batch(1000), digest.with_bft_batch(999));
        assert!(digest.with_bft_batch(1000).0 < 1 << PEERS_DIGEST_BITS);
    }

    #[test]
    fn node_gauges_render() {
        let placements = [CorePlacement {
            shard: 0,
            core: 3,
            numa_node: Some(1),
            smt_siblings: None,
        }];
        let text = render_node_gauges(
            (PeersDigest(42), SettingsDigest(7)),
            Some(2),
            3,
            &placements,
        );
        assert!(text.contains("percore_config_peers_digest 42\n"), "{text}");
        assert!(
            text.contains("percore_config_settings_digest 7\n"),
            "{text}"
        );
        assert!(text.contains("percore_config_replica_index 2\n"), "{text}");
        assert!(
            text.contains("percore_config_shard_core{shard=\"0\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("percore_config_shard_numa_node{shard=\"0\"} 1\n"),
            "{text}"
        );
    }
}
