//! `percore status`: what every node of a deployed cluster says about itself.
//!
//! It scrapes each node's Prometheus endpoint twice, an interval apart (plain HTTP GET,
//! [`crate::cluster::scrape_metrics`]), and reports per node and shard: role, view, commit
//! op, durable op, each peer's lag and connection, the TPS applied over the interval, and the
//! node's peers digest (equal on every node of one cluster). It only reads metrics: it never
//! connects to client or peer ports, so it cannot disturb a running cluster.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::{metric, scrape_metrics, shard_metric};
use crate::config::{PeersDigest, SettingsDigest};

#[cfg(test)]
#[path = "../../tests/support/refusing_port.rs"]
mod refusing_port;

/// What to ask.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// Metrics address (`host:port`) of every node.
    pub addresses: Vec<String>,
    /// Time between the two scrapes.
    pub interval: Duration,
}

/// Every node's answer.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Seconds between the two scrapes asked for.
    pub interval_s: f64,
    /// One entry per address, in the order given.
    pub nodes: Vec<NodeStatus>,
    /// Whether every replicated node that answered reports the same peers digest.
    pub peers_digests_agree: bool,
    /// Whether every replicated node that answered reports the same settings digest
    /// (replicas that differ refuse each other's connections).
    pub settings_digests_agree: bool,
    /// Every node up and the digests agree (the exit status is 0 only then).
    pub healthy: bool,
}

/// One node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The address given.
    pub address: String,
    /// Whether both scrapes answered.
    pub up: bool,
    /// Why not, when down.
    pub error: Option<String>,
    /// `percore_config_replica_index` (absent on nodes that predate it).
    pub replica: Option<u64>,
    /// `percore_config_replica_count`.
    pub replicas: Option<u64>,
    /// `percore_config_peers_digest`, 13 hex digits.
    pub peers_digest: Option<String>,
    /// `percore_config_settings_digest`, 13 hex digits (absent on nodes that predate it).
    pub settings_digest: Option<String>,
    /// One entry per shard.
    pub shards: Vec<ShardStatus>,
}

/// One shard of one node.
#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    /// Shard index (= replication group).
    pub shard: usize,
    /// Core it is pinned to (`percore_config_shard_core`).
    pub core: Option<u64>,
    /// NUMA node of that core.
    pub numa_node: Option<u64>,
    /// "single" (an unreplicated node), "leader", "follower", or, for a replica that
    /// cannot lead or acknowledge yet: "view-change", "recovering" (lost journal entries),
    /// "rebuilding" (formatted with `--replace`), "state-transfer" (BFT mode).
    pub role: &'static str,
    /// The group's view as this replica sees it (`percore_replication_view`, BFT mode
    /// `percore_bft_view`; 0 for an unreplicated node).
    pub view: u64,
    /// Highest op known committed (`percore_replication_commit_max`; a single node's
    /// `percore_commit_op`).
    pub commit_op: u64,
    /// Highest op durable in this replica's journal (`percore_replication_op_durable`).
    pub op_durable: u64,
    /// Client transfers applied per second over the interval (`percore_tx_applied_total`).
    pub tx_per_s: f64,
    /// What this replica knows of each other replica of the group.
    pub peers: Vec<PeerStatus>,
}

/// One peer of one shard.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// The peer's replica index.
    pub replica: usize,
    /// An authenticated connection is up (`percore_peer_connected`).
    pub connected: bool,
    /// It runs under the key accepted during a cluster key rotation, not this node's
    /// cluster key (`percore_peer_accepted_key`): the peer still, or already, uses that key.
    pub accepted_key: bool,
    /// Ops behind this replica's durable head (`percore_peer_lag_ops`); `None` when the
    /// peer was never connected.
    pub lag_ops: Option<u64>,
}

/// One scrape of one node: its text and when it came back.
type Scrape = Result<(String, Instant), String>;

fn scrape(address: &str) -> Scrape {
    let resolved: Option<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|err| format!("cannot resolve: {err}"))?
        .next();
    let resolved = resolved.ok_or_else(|| "resolves to no address".to_string())?;
    let text = scrape_metrics(resolved).map_err(|err| err.to_string())?;
    Ok((text, Instant::now()))
}

/// Scrapes every address at once.
fn scrape_all(addresses: &[String]) -> Vec<Scrape> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = addresses
            .iter()
            .map(|address| scope.spawn(move || scrape(address)))
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("scrape panicked".into()))
            })
            .collect()
    })
}

/// Scrapes every node twice, `interval` apart, and reads their state.
pub fn run(config: &StatusConfig) -> ClusterStatus {
    let first = scrape_all(&config.addresses);
    std::thread::sleep(config.interval);
    let second = scrape_all(&config.addresses);
    let nodes: Vec<NodeStatus> = config
        .addresses
        .iter()
        .zip(first.into_iter().zip(second))
        .map(|(address, scrapes)| match scrapes {
            (Ok(before), Ok(after)) => node_status(address, &before, &after),
            (Err(error), _) | (_, Err(error)) => NodeStatus {
                address: address.clone(),
                up: false,
                error: Some(error),
                replica: None,
                replicas: None,
                peers_digest: None,
                settings_digest: None,
                shards: Vec::new(),
            },
        })
        .collect();
    summarize(nodes, config.interval)
}

/// The cluster's status from its nodes': whether their digests agree, and whether it is
/// healthy.
fn summarize(nodes: Vec<NodeStatus>, interval: Duration) -> ClusterStatus {
    let agree = |digest: fn(&NodeStatus) -> Option<&str>| {
        let mut digests: Vec<&str> = nodes
            .iter()
            .filter(|node| node.replicas.is_some_and(|count| count > 1))
            .filter_map(digest)
            .collect();
        digests.sort_unstable();
        digests.dedup();
        digests.len() <= 1
    };
    let peers_digests_agree = agree(|node| node.peers_digest.as_deref());
    let settings_digests_agree = agree(|node| node.settings_digest.as_deref());
    let healthy = peers_digests_agree && settings_digests_agree && nodes.iter().all(|node| node.up);
    ClusterStatus {
        interval_s: interval.as_secs_f64(),
        nodes,
        peers_digests_agree,
        settings_digests_agree,
        healthy,
    }
}

use crate::cluster::plain_metric;

/// The distinct values of label `label` over the samples of `prefix` (`name{...`).
fn label_values(text: &str, prefix: &str, label: &str) -> Vec<usize> {
    let needle = format!("{label}=\"");
    let mut values: Vec<usize> = text
        .lines()
        .filter_map(|line| line.strip_prefix(prefix))
        .filter_map(|rest| {
            let start = rest.find(&needle)? + needle.len();
            let end = start + rest[start..].find('"')?;
            rest[start..end].parse().ok()
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    values
}

fn node_status(address: &str, before: &(String, Instant), after: &(String, Instant)) -> NodeStatus {
    let (text, seconds) = (&after.0, after.1.duration_since(before.1).as_secs_f64());
    let replicas = plain_metric(text, "percore_config_replica_count");
    let replica = plain_metric(text, "percore_config_replica_index");
    let shards = label_values(text, "percore_commit_op{", "shard")
        .into_iter()
        .map(|shard| shard_status(text, &before.0, shard, seconds, replica, replicas))
        .collect();
    NodeStatus {
        address: address.to_string(),
        up: true,
        error: None,
        replica,
        replicas,
        peers_digest: plain_metric(text, "percore_config_peers_digest")
            .map(|digest| PeersDigest(digest).to_string()),
        settings_digest: plain_metric(text, "percore_config_settings_digest")
            .map(|digest| SettingsDigest(digest).to_string()),
        shards,
    }
}

fn shard_status(
    text: &str,
    before: &str,
    shard: usize,
    seconds: f64,
    replica: Option<u64>,
    replicas: Option<u64>,
) -> ShardStatus {
    let labels = format!("shard=\"{shard}\"");
    let value = |name: &str| metric(text, name, &labels).map(|value| value as u64);
    let peer_prefix = format!("percore_peer_connected{{{labels},");
    let mut peer_indices = label_values(text, &peer_prefix, "peer");
    if let (Some(replica), Some(replicas)) = (replica, replicas) {
        // A peer never connected has no samples: list every other replica anyway.
        peer_indices.extend((0..replicas as usize).filter(|&peer| peer as u64 != replica));
        peer_indices.sort_unstable();
        peer_indices.dedup();
    }
    let peers = peer_indices
        .into_iter()
        .map(|peer| {
            let peer_labels = format!("{labels},peer=\"{peer}\"");
            let lag = metric(text, "percore_peer_lag_ops", &peer_labels);
            PeerStatus {
                replica: peer,
                connected: metric(text, "percore_peer_connected", &peer_labels) == Some(1.0),
                accepted_key: metric(text, "percore_peer_accepted_key", &peer_labels) == Some(1.0),
                lag_ops: lag.map(|lag| lag as u64),
            }
        })
        .collect::<Vec<_>>();
    let replicated = replicas.map_or(!peers.is_empty(), |count| count > 1);
    // Every shard exports both families (the other mode's at 0): a BFT replica is one whose
    // BFT status is set (1 or more from its start).
    let bft = value("percore_bft_status").is_some_and(|status| status > 0);
    let (status, view) = if bft {
        (value("percore_bft_status"), value("percore_bft_view"))
    } else {
        (
            value("percore_replication_status"),
            value("percore_replication_view"),
        )
    };
    let role = match (replicated, value("percore_replica_is_leader"), status) {
        (false, _, _) => "single",
        (true, Some(1), _) => "leader",
        (true, _, Some(2)) => "view-change",
        (true, _, Some(3)) if bft => "state-transfer",
        (true, _, Some(3)) => "recovering",
        (true, _, Some(4)) => "rebuilding",
        (true, _, _) => "follower",
    };
    let commit_op = if replicated {
        value("percore_replication_commit_max")
    } else {
        value("percore_commit_op")
    };
    let applied = shard_metric(text, "percore_tx_applied_total", shard)
        .saturating_sub(shard_metric(before, "percore_tx_applied_total", shard));
    ShardStatus {
        shard,
        core: value("percore_config_shard_core"),
        numa_node: value("percore_config_shard_numa_node"),
        role,
        view: view.unwrap_or(0),
        commit_op: commit_op.unwrap_or(0),
        op_durable: value("percore_replication_op_durable").unwrap_or(0),
        tx_per_s: if seconds > 0.0 {
            applied as f64 / seconds
        } else {
            0.0
        },
        peers,
    }
}

fn or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

/// The status as a human-readable report.
pub fn render_text(status: &ClusterStatus) -> String {
    let mut out = String::new();
    for node in &status.nodes {
        if !node.up {
            let error = node.error.as_deref().unwrap_or("no answer");
            let _ = writeln!(out, "node {}: DOWN ({error})", node.address);
            continue;
        }
        let who = match (node.replica, node.replicas) {
            (_, Some(1)) => "single node".to_string(),
            (Some(replica), Some(replicas)) => format!("replica {replica} of {replicas}"),
            _ => "replica unknown".to_string(),
        };
        let digest = node.peers_digest.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "node {}: up, {who}, {} shard(s), peers digest {digest}",
            node.address,
            node.shards.len()
        );
        let _ = writeln!(
            out,
            "  {:>5} {:>4} {:>4} {:<14} {:<9} {:>10} {:>10} {:>10}  peers",
            "shard", "core", "numa", "role", "view", "commit_op", "op_durable", "tx/s"
        );
        for shard in &node.shards {
            let peers: Vec<String> = shard
                .peers
                .iter()
                .map(|peer| {
                    let state = match (peer.connected, peer.accepted_key) {
                        (false, _) => "DOWN",
                        (true, false) => "up",
                        (true, true) => "up (accepted key)",
                    };
                    format!("r{} {state} lag {}", peer.replica, or_dash(peer.lag_ops))
                })
                .collect();
            let _ = writeln!(
                out,
                "  {:>5} {:>4} {:>4} {:<14} {:<9} {:>10} {:>10} {:>10.0}  {}",
                shard.shard,
                or_dash(shard.core),
                or_dash(shard.numa_node),
                shard.role,
                shard.view,
                shard.commit_op,
                shard.op_durable,
                shard.tx_per_s,
                if peers.is_empty() {
                    "-".to_string()
                } else {
                    peers.join(", ")
                }
            );
        }
    }
    let by_accepted_key = status
        .nodes
        .iter()
        .flat_map(|node| &node.shards)
        .flat_map(|shard| &shard.peers)
        .filter(|peer| peer.connected && peer.accepted_key)
        .count();
    if by_accepted_key > 0 {
        let _ = writeln!(
            out,
            "key rotation: {by_accepted_key} connection(s) run under an accepted key, not the \
             cluster key (docs/operations.md section 7: wait for 0 before the last round)"
        );
    }
    if status.peers_digests_agree {
        let _ = writeln!(out, "peers digests: agree");
    } else {
        let _ = writeln!(
            out,
            "peers digests: DIFFER: the nodes were started with different peers lists"
        );
    }
    if !status.settings_digests_agree {
        let _ = writeln!(
            out,
            "settings digests: DIFFER: the nodes were started with different shard counts or \
             accounts_max, transfers_max, credit_legs_max, session_clients_max; replicas that \
             differ refuse each other"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::refusing_port::RefusingPort;
    use super::*;

    const LEADER: &str = "percore_commit_op{shard=\"0\"} 9\n\
        percore_tx_applied_total{shard=\"0\"} 3000\n\
        percore_replica_is_leader{shard=\"0\"} 1\n\
        percore_replication_commit_max{shard=\"0\"} 8\n\
        percore_replication_op_durable{shard=\"0\"} 9\n\
        percore_peer_connected{shard=\"0\",peer=\"1\"} 1\n\
        percore_peer_accepted_key{shard=\"0\",peer=\"1\"} 0\n\
        percore_peer_lag_ops{shard=\"0\",peer=\"1\"} 2\n\
        percore_config_peers_digest 4096\n\
        percore_config_replica_count 3\n\
        percore_config_replica_index 0\n\
        percore_config_shard_core{shard=\"0\"} 4\n";

    /// The report of a healthy cluster of this one node.
    fn render_one(node: NodeStatus) -> String {
        render_text(&ClusterStatus {
            interval_s: 2.0,
            nodes: vec![node],
            peers_digests_agree: true,
            settings_digests_agree: true,
            healthy: true,
        })
    }

    #[test]
    fn a_leader_shard_is_read_from_its_metrics() {
        let before = "percore_tx_applied_total{shard=\"0\"} 1000\n".to_string();
        let now = Instant::now();
        let node = node_status(
            "n0",
            &(before, now),
            &(LEADER.to_string(), now + Duration::from_secs(2)),
        );
        assert_eq!(node.replicas, Some(3));
        assert_eq!(node.peers_digest.as_deref(), Some("0000000001000"));
        let shard = &node.shards[0];
        assert_eq!(
            (shard.role, shard.commit_op, shard.op_durable),
            ("leader", 8, 9)
        );
        assert_eq!(shard.core, Some(4));
        assert!((shard.tx_per_s - 1000.0).abs() < 1e-9);
        assert_eq!(shard.peers.len(), 2, "{:?}", shard.peers);
        assert!(shard.peers[0].connected && shard.peers[0].lag_ops == Some(2));
        assert!(!shard.peers[1].connected && shard.peers[1].lag_ops.is_none());
        let text = render_one(node);
        assert!(text.contains("r2 DOWN lag -"), "{text}");
        assert!(!text.contains("key rotation"), "{text}");
        // During a key rotation the peer answered with the accepted key.
        let rotating = LEADER.replace(
            "percore_peer_accepted_key{shard=\"0\",peer=\"1\"} 0",
            "percore_peer_accepted_key{shard=\"0\",peer=\"1\"} 1",
        );
        let node = node_status("n0", &(String::new(), now), &(rotating, now));
        assert!(node.shards[0].peers[0].accepted_key);
        let text = render_one(node);
        assert!(text.contains("r1 up (accepted key) lag 2"), "{text}");
        assert!(text.contains("key rotation: 1 connection(s)"), "{text}");
    }

    #[test]
    fn a_replica_that_cannot_lead_or_acknowledge_says_why() {
        let now = Instant::now();
        let before = (String::new(), now);
        let follower = LEADER.replace(
            "percore_replica_is_leader{shard=\"0\"} 1",
            "percore_replica_is_leader{shard=\"0\"} 0",
        );
        for (status, role) in [
            ("1", "follower"),
            ("2", "view-change"),
            ("3", "recovering"),
            ("4", "rebuilding"),
        ] {
            let text = format!(
                "{follower}percore_replication_status{{shard=\"0\"}} {status}\n\
                 percore_replication_view{{shard=\"0\"}} 7\n"
            );
            let node = node_status("n0", &before, &(text, now));
            assert_eq!((node.shards[0].role, node.shards[0].view), (role, 7));
        }
        let bft = format!(
            "{follower}percore_bft_status{{shard=\"0\"}} 3\npercore_bft_view{{shard=\"0\"}} 4\n"
        );
        let node = node_status("n0", &before, &(bft, now));
        assert_eq!(
            (node.shards[0].role, node.shards[0].view),
            ("state-transfer", 4)
        );
    }

    /// Two replicas started with different settings that decide results refuse each other;
    /// the report says so and the cluster is not healthy.
    #[test]
    fn differing_settings_digests_are_reported() {
        let now = Instant::now();
        let before = (String::new(), now);
        let text = format!("{LEADER}percore_config_settings_digest 7\n");
        let other = format!("{LEADER}percore_config_settings_digest 8\n");
        let a = node_status("n0", &before, &(text.clone(), now));
        assert_eq!(a.settings_digest.as_deref(), Some("0000000000007"));
        let same = summarize(
            vec![a.clone(), node_status("n1", &before, &(text, now))],
            Duration::from_secs(1),
        );
        assert!(same.settings_digests_agree && same.healthy);
        assert!(!render_text(&same).contains("settings digests"));
        let differ = summarize(
            vec![a, node_status("n1", &before, &(other, now))],
            Duration::from_secs(1),
        );
        assert!(differ.peers_digests_agree);
        assert!(!differ.settings_digests_agree && !differ.healthy);
        assert!(
            render_text(&differ).contains("settings digests: DIFFER"),
            "{}",
            render_text(&differ)
        );
    }

    /// From what a node really exports: every shard renders both modes' families, the other
    /// mode's at 0.
    #[test]
    fn roles_and_views_are_read_from_real_metrics_of_either_mode() {
        use crate::metrics::ShardMetrics;
        let now = Instant::now();
        let before = (String::new(), now);
        let scrape = |set: &dyn Fn(&ShardMetrics)| {
            let metrics = ShardMetrics::default();
            set(&metrics);
            let mut text = crate::metrics::render_all(&[std::sync::Arc::new(metrics)]);
            text.push_str("percore_config_replica_count 3\npercore_config_replica_index 1\n");
            let node = node_status("n0", &before, &(text, now));
            (node.shards[0].role, node.shards[0].view)
        };
        // Crash-fault mode: a replica recovering entries it lost, in view 7.
        let recovering = scrape(&|m| {
            ShardMetrics::set(&m.replication_status, 3);
            ShardMetrics::set(&m.replication_view, 7);
        });
        assert_eq!(recovering, ("recovering", 7));
        // BFT mode: a replica changing views, to view 5.
        let changing = scrape(&|m| {
            ShardMetrics::set(&m.bft_status, 2);
            ShardMetrics::set(&m.bft_view, 5);
        });
        assert_eq!(changing, ("view-change", 5));
        let transferring = scrape(&|m| {
            ShardMetrics::set(&m.bft_status, 3);
            ShardMetrics::set(&m.bft_view, 4);
        });
        assert_eq!(transferring, ("state-transfer", 4));
    }

    #[test]
    fn a_dead_address_is_down() {
        // Held and refusing, so a listener of a test beside this one cannot take it.
        let dead = RefusingPort::bind().unwrap();
        let address = dead.address().to_string();
        let status = run(&StatusConfig {
            addresses: vec![address],
            interval: Duration::from_millis(1),
        });
        assert!(!status.healthy);
        assert!(!status.nodes[0].up);
        assert!(render_text(&status).contains("DOWN"));
    }
}
