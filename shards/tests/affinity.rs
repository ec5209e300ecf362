//! A node's checkpoint followers and its metrics server run off its shards' cores.
//!
//! A follower is spawned by its shard, whose executor is pinned: left alone it would inherit
//! the shard's core and take its time from the shard. A one-shard node on core 0 of a
//! machine with more cores must put its follower on the others.

mod support;

use std::time::{Duration, Instant};

use percore_engine::ledger::{Ledger, LedgerConfig};
use percore_shards::affinity;
use percore_shards::config::parse_cpu_list;
use percore_shards::journal::FsyncPolicy;
use percore_shards::runtime::{JournalSettings, Node, NodeConfig};

use support::TempDir;

/// The cores each thread of this process whose name starts with `prefix` may run on.
fn threads_cores(prefix: &str) -> Vec<Vec<usize>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
        let path = task.expect("task").path();
        // A thread may end between the listing and the read.
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let cores = status
            .lines()
            .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
            .and_then(parse_cpu_list);
        if let (true, Some(cores)) = (comm.starts_with(prefix), cores) {
            found.push(cores);
        }
    }
    found
}

#[test]
fn helper_threads_run_on_the_cores_the_shards_leave() {
    let temp = TempDir::new("affinity", "follower");
    let config = NodeConfig {
        cores: vec![0],
        client_port_base: 0,
        journal: Some(JournalSettings {
            data_dir: temp.0.clone(),
            fsync: FsyncPolicy::Always,
            segment_bytes: 1 << 20,
            cluster_id: 1,
            checkpoint_interval_ops: 64,
            snapshot_write_bytes_per_s: 64 << 20,
            segment_spare: false,
        }),
        ..NodeConfig::default()
    };
    let node = Node::start(config, |shard, shards| {
        Ledger::new(LedgerConfig {
            shard_index: shard as u32,
            shard_count: shards as u32,
            accounts_max: 64,
            transfers_max: 1_024,
            credit_legs_in_flight_max: 64,
            batch_entries_max: 1_000,
        })
    })
    .expect("node starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let cores = loop {
        if let [cores] = &threads_cores("checkpoint-0")[..] {
            // Set by the thread itself as it starts: wait until it has.
            if !cores.contains(&0) || affinity::allowed() == vec![0] {
                break cores.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "follower thread: {:?}",
            threads_cores("checkpoint-0")
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let allowed = affinity::allowed();
    let expected = affinity::helper_cores_of(&allowed, &[0]);
    assert_eq!(cores, expected, "allowed {allowed:?}");
    if allowed.len() > 1 {
        assert!(!cores.contains(&0), "the shard's core is left to the shard");
    }
    // The shard itself stays on its core.
    // The shard's threads (its executor, glommio's helper for blocking calls) stay on its
    // core.
    let shard_threads = threads_cores("shard-0");
    assert!(!shard_threads.is_empty());
    assert!(
        shard_threads.iter().all(|cores| *cores == [0]),
        "{shard_threads:?}"
    );
    // The metrics server, given the node's helper cores, runs there too.
    assert_eq!(node.helper_cores(), &expected[..]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_, server) = percore_shards::metrics::serve_with_node_text(
        "127.0.0.1:0".parse().unwrap(),
        node.metrics().to_vec(),
        String::new(),
        stop.clone(),
        node.helper_cores().to_vec(),
    )
    .expect("metrics server");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Set by the thread itself as it starts: wait until it has.
        if let [cores] = &threads_cores("percore-metrics")[..]
            && *cores == expected
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics thread: {:?}, expected {expected:?}",
            threads_cores("percore-metrics")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("metrics thread");
    node.shutdown().expect("shutdown");
}
