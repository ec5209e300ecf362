//! Crash recovery with real processes: a node under load is killed with SIGKILL at seeded
//! random moments and restarted on the same data directory. A quarter of the transfers
//! cross shards (credit legs between shards, resent after each restart). Afterwards every
//! transfer a client saw acknowledged is present, nothing is applied twice, balances are
//! exactly what the transfers imply, and no credit leg is left in flight.
//!
//! A second mode checkpoints every 8 ops with 1 MiB segments, so snapshots are written,
//! superblocks rewritten and old segments and snapshots removed while the kills land.
//!
//! Short by default (CI); `PERCORE_CRASH_KILLS=50 PERCORE_CRASH_SEED=7 cargo test -p
//! percore-shards --test crash -- --nocapture` runs a long one. Every run prints its seed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use percore_engine::frame::Operation;
use percore_engine::record::{CreateTransferResult, RecordResult, Transfer};
use percore_net::client::{Client, ClientConfig, Pipeline};
use percore_shards::checkpoint::checkpoint_due;
use percore_shards::loadgen::{create_funded_accounts, route_transfer, transfer};

const PERCORE: &str = env!("CARGO_BIN_EXE_percore");
const SHARDS: usize = 2;
const ACCOUNTS_PER_SHARD: usize = 8;
const FUNDING: u128 = 1 << 40;

struct NodeProcess {
    child: Child,
    addresses: Vec<SocketAddr>,
}

/// Node arguments of the checkpoint mode: a checkpoint every 8 ops, 1 MiB segments (about
/// 80 batches of 50 transfers each).
const CHECKPOINT_ARGS: &[&str] = &["--checkpoint-interval-ops", "8", "--segment-mib", "1"];
/// The interval `CHECKPOINT_ARGS` sets.
const CHECKPOINT_INTERVAL_OPS: u64 = 8;
/// Node arguments of the default mode: default checkpoint interval (rarely reached here).
const DEFAULT_ARGS: &[&str] = &["--segment-mib", "4"];

fn start_node(data_dir: &Path, extra: &[&str]) -> NodeProcess {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if online >= 2 { "0,1" } else { "0,0" };
    let mut child = Command::new(PERCORE)
        .args([
            "node",
            "--cores",
            cores,
            "--client-port-base",
            "0",
            "--allow-shared-cores",
        ])
        .args([
            "--accounts-max",
            "1024",
            "--transfers-max",
            "1000000",
            "--credit-legs-max",
            "65536",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("percore starts");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        // Keep draining after start-up so the node never writes into a closed pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut addresses = vec![None; SHARDS];
    let mut seen = Vec::new();
    while addresses.iter().any(Option::is_none) {
        let line = match lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(_) => panic!("node did not come up: {seen:#?}"),
        };
        // "shard 0 on core 0 serving clients at 127.0.0.1:40123"
        if let Some(rest) = line.strip_prefix("shard ") {
            let shard: usize = rest.split(' ').next().unwrap().parse().unwrap();
            if let Some(address) = line.rsplit(' ').next().and_then(|a| a.parse().ok()) {
                addresses[shard] = Some(address);
            }
        }
        seen.push(line);
    }
    NodeProcess {
        child,
        addresses: addresses.into_iter().map(Option::unwrap).collect(),
    }
}

fn kill_hard(mut node: NodeProcess) {
    let _ = node.child.kill(); // SIGKILL
    let _ = node.child.wait();
}

fn stop_gracefully(mut node: NodeProcess) {
    let status = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exit) = node.child.try_wait().unwrap() {
            assert!(exit.success(), "graceful stop failed: {exit:?}");
            return;
        }
        assert!(Instant::now() < deadline, "node did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn setup(addresses: &[SocketAddr]) -> Vec<Vec<u128>> {
    let mut client = Client::new(ClientConfig::new(addresses.to_vec(), 1));
    client
        .ping_all(Instant::now() + Duration::from_secs(30))
        .unwrap();
    create_funded_accounts(&mut client, ACCOUNTS_PER_SHARD, FUNDING)
        .expect("accounts created and funded")
}

/// Every transfer sent, and whether its request was acknowledged.
#[derive(Default)]
struct History {
    sent: Vec<Transfer>,
    acknowledged: Vec<bool>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Sends transfers between accounts of one shard until the connection dies.
fn load(
    address: SocketAddr,
    shard: usize,
    accounts: Arc<Vec<Vec<u128>>>,
    history: Arc<Mutex<History>>,
    round: u64,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut pipeline) = Pipeline::connect(
        shard,
        address,
        100 + round as u128,
        1 << 20,
        Duration::from_secs(5),
    ) else {
        return;
    };
    let mut rng = Rng(round * 7919 + shard as u64 + 1);
    let mut in_flight: std::collections::VecDeque<(u64, Vec<usize>)> = Default::default();
    let mut request = 0u64;
    let local = &accounts[shard][1..];
    let remote = &accounts[(shard + 1) % SHARDS][1..];
    while !stop.load(Ordering::Relaxed) {
        while in_flight.len() < 4 {
            let mut batch = Vec::with_capacity(50);
            let mut indexes = Vec::with_capacity(50);
            {
                let mut history = history.lock().unwrap();
                for _ in 0..50 {
                    let r = rng.next() as usize;
                    let debit = local[r % local.len()];
                    // One in four credits an account on the other shard: a credit leg.
                    let credit = if r.is_multiple_of(4) {
                        remote[(r / 4) % remote.len()]
                    } else {
                        let credit = local[(r / 7 + 1 + r % (local.len() - 1)) % local.len()];
                        if credit == debit {
                            local[(r + 1) % local.len()]
                        } else {
                            credit
                        }
                    };
                    let id = (1 << 126)
                        | ((round as u128) << 80)
                        | ((shard as u128) << 64)
                        | history.sent.len() as u128;
                    let t = transfer(id, debit, credit, 1 + (r as u128 % 3));
                    indexes.push(history.sent.len());
                    history.sent.push(t);
                    history.acknowledged.push(false);
                    batch.push(t);
                }
            }
            request += 1;
            if pipeline
                .send(Operation::CreateTransfers.into(), request, &batch)
                .is_err()
            {
                return;
            }
            in_flight.push_back((request, indexes));
        }
        let Ok(reply) = pipeline.receive(size_of::<RecordResult>()) else {
            return;
        };
        let (request, indexes) = in_flight.pop_front().unwrap();
        assert_eq!(
            reply.header.envelope.request_number, request,
            "a reply answers the oldest request in flight"
        );
        let codes: Vec<u32> = reply
            .body
            .chunks_exact(8)
            .map(|chunk| bytemuck::pod_read_unaligned::<RecordResult>(chunk).code)
            .collect();
        // Each transfer is marked acknowledged by its own result: a short reply would
        // leave some unchecked by the resubmission below.
        assert_eq!(codes.len(), indexes.len(), "one result per transfer");
        let mut history = history.lock().unwrap();
        for (index, code) in indexes.iter().zip(codes) {
            assert_eq!(
                code,
                CreateTransferResult::Ok as u32,
                "fresh transfer refused"
            );
            history.acknowledged[*index] = true;
        }
    }
}

fn replayed_balances(data_dir: &Path) -> (HashMap<u128, i128>, i128) {
    let output = Command::new(PERCORE)
        .args([
            "inspect",
            "--replay",
            "--accounts-max",
            "1024",
            "--transfers-max",
            "1000000",
            "--credit-legs-max",
            "65536",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "inspect failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut balances = HashMap::new();
    let mut conservation = None;
    for line in stdout.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["balance", id, value] => {
                balances.insert(
                    u128::from_str_radix(id.trim_start_matches("0x"), 16).unwrap(),
                    value.parse().unwrap(),
                );
            }
            ["conservation", value] => conservation = Some(value.parse().unwrap()),
            ["in_flight", value] => {
                assert_eq!(
                    *value, "0",
                    "every credit leg was delivered and acknowledged, restarts included"
                )
            }
            _ => {}
        }
    }
    (
        balances,
        conservation.expect("inspect prints the conservation sum"),
    )
}

#[test]
fn acknowledged_transfers_survive_sigkill() {
    let data_dir = crash_run("default", DEFAULT_ARGS);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn acknowledged_transfers_survive_sigkill_during_checkpoints() {
    let data_dir = crash_run("checkpoints", CHECKPOINT_ARGS);
    // Checkpoints happened and removed what they cover: after the follower caught up (the
    // run waited for it), each shard keeps at most two snapshots and segment 0 is gone.
    // Every snapshot is at one of its shard's staggered checkpoint ops (shard 1 of 2: 4
    // ops before the multiples of 8).
    for shard in 0..SHARDS {
        let (segments, snapshots) = journal_files(&data_dir, shard);
        eprintln!("crash test: shard {shard} segments {segments:?} snapshots {snapshots:?}");
        assert!(
            (1..=2).contains(&snapshots.len()),
            "shard {shard}: {snapshots:?}"
        );
        assert!(
            snapshots
                .iter()
                .all(|&op| checkpoint_due(op, shard, SHARDS, CHECKPOINT_INTERVAL_OPS)),
            "shard {shard}: {snapshots:?}"
        );
        assert!(segments[0] > 0, "shard {shard}: {segments:?}");
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Node arguments of the spare mode: 1 MiB segments, each zero-filled ahead as a spare
/// and renamed into place at its roll-over (`--segment-spare`), so that kills land while a
/// spare is written or renamed.
const SPARE_ARGS: &[&str] = &["--segment-mib", "1", "--segment-spare"];

#[test]
fn acknowledged_transfers_survive_sigkill_with_spare_segments() {
    // A spare is never a segment: whatever a kill left was removed at the next open, and
    // the last run's spare (if any) is the only one.
    crash_run_rolling_over("spare", SPARE_ARGS);
}

/// Node arguments of the `O_DSYNC` mode (no `fdatasync` after a group commit: the segments
/// are opened `O_DSYNC`), with 1 MiB spare-prepared segments so that kills also land on
/// roll-overs and on spares written through `O_DSYNC` descriptors.
const DSYNC_ARGS: &[&str] = &["--fsync", "dsync", "--segment-mib", "1", "--segment-spare"];

#[test]
fn acknowledged_transfers_survive_sigkill_with_dsync_segments() {
    crash_run_rolling_over("dsync", DSYNC_ARGS);
}

/// [`crash_run`] with small segments: every shard must have rolled over.
fn crash_run_rolling_over(mode: &str, extra: &[&str]) {
    let data_dir = crash_run(mode, extra);
    for shard in 0..SHARDS {
        let (segments, _) = journal_files(&data_dir, shard);
        assert!(segments.len() > 1, "{mode}: shard {shard}: {segments:?}");
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Segment and snapshot files of shard `shard`, each sorted.
fn journal_files(data_dir: &Path, shard: usize) -> (Vec<u64>, Vec<u64>) {
    let dir = data_dir.join(format!("shard-{shard}"));
    let mut segments = Vec::new();
    let mut snapshots = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        segments.extend(percore_engine::journal::parse_segment_name(&name));
        snapshots.extend(percore_engine::journal::parse_snapshot_name(&name));
    }
    segments.sort_unstable();
    snapshots.sort_unstable();
    (segments, snapshots)
}

/// Waits (up to a minute, while load keeps the node checkpointing) until every shard's
/// checkpoint follower has caught up after the last restart: a checkpoint installed, at
/// most two snapshots kept, and segment 0 removed.
fn wait_checkpointed(data_dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let files: Vec<_> = (0..SHARDS).map(|s| journal_files(data_dir, s)).collect();
        if files.iter().all(|(segments, snapshots)| {
            (1..=2).contains(&snapshots.len()) && segments.first().is_some_and(|&s| s > 0)
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "checkpoints did not catch up: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The highest snapshot op in any shard directory of `data_dir`, once it is above `seen`
/// (waits up to a minute: the load keeps the node checkpointing).
fn wait_for_snapshot_after(data_dir: &Path, seen: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let newest = (0..SHARDS)
            .filter_map(|shard| std::fs::read_dir(data_dir.join(format!("shard-{shard}"))).ok())
            .flatten()
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                percore_engine::journal::parse_snapshot_name(&name)
            })
            .max()
            .unwrap_or(0);
        if newest > seen {
            return newest;
        }
        assert!(Instant::now() < deadline, "no checkpoint after op {seen}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One load thread per shard against a running node (see [`load`]).
struct Loaders {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loaders {
    fn start(
        node: &NodeProcess,
        accounts: &[Vec<u128>],
        history: &Arc<Mutex<History>>,
        round: u64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accounts = Arc::new(accounts.to_vec());
        let threads = (0..SHARDS)
            .map(|shard| {
                let (address, accounts, history, stop) = (
                    node.addresses[shard],
                    accounts.clone(),
                    history.clone(),
                    stop.clone(),
                );
                std::thread::spawn(move || load(address, shard, accounts, history, round, stop))
            })
            .collect();
        Self { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
    }
}

/// Submits every transfer of `history` again: an acknowledged one must answer `Exists`
/// (it was not lost), any other `Ok` or `Exists`, so afterwards each was applied once.
fn resubmit(client: &mut Client, history: &History) {
    for (chunk_index, chunk) in history.sent.chunks(500).enumerate() {
        let results: Vec<RecordResult> = client
            .submit(Operation::CreateTransfers.into(), chunk, |t: &Transfer| {
                route_transfer(t, SHARDS)
            })
            .unwrap();
        for (k, result) in results.iter().enumerate() {
            let index = chunk_index * 500 + k;
            if history.acknowledged[index] {
                assert_eq!(
                    result.code,
                    CreateTransferResult::Exists as u32,
                    "acknowledged transfer {index} lost"
                );
            } else {
                assert!(
                    result.code == CreateTransferResult::Exists as u32
                        || result.code == CreateTransferResult::Ok as u32,
                    "transfer {index}: {result:?}"
                );
            }
        }
    }
}

/// Runs the kill-and-restart load against a node started with `extra` arguments, checks
/// every acknowledged transfer and the balances, and returns the data directory (removed
/// by the caller).
fn crash_run(mode: &str, extra: &[&str]) -> PathBuf {
    let seed: u64 = std::env::var("PERCORE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let kills: u64 = std::env::var("PERCORE_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!("crash test ({mode}): seed {seed}, {kills} kills");
    let data_dir: PathBuf = std::env::temp_dir().join(format!(
        "percore-crash-{mode}-{}-{seed}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut rng = Rng(seed | 1);

    let checkpointing = extra.contains(&"--checkpoint-interval-ops");
    let mut snapshot_seen = 0;
    let node = start_node(&data_dir, extra);
    let accounts = setup(&node.addresses);
    let mut node = Some(node);
    let history = Arc::new(Mutex::new(History::default()));
    for round in 0..kills {
        let running = node.take().unwrap_or_else(|| start_node(&data_dir, extra));
        let loaders = Loaders::start(&running, &accounts, &history, round);
        std::thread::sleep(Duration::from_millis(100 + rng.next() % 400));
        if checkpointing {
            // Checkpoints are taken by a follower thread that needs a moment after each
            // start: wait for a new one, then kill while the next may be in progress.
            snapshot_seen = wait_for_snapshot_after(&data_dir, snapshot_seen);
            std::thread::sleep(Duration::from_millis(rng.next() % 50));
        }
        kill_hard(running);
        loaders.stop();
    }

    // Restart: every acknowledged transfer must be present; resubmitting everything ever sent
    // applies each missing one now, so afterwards each was applied exactly once.
    let node = node.take().unwrap_or_else(|| start_node(&data_dir, extra));
    let mut client = Client::new(ClientConfig::new(node.addresses.clone(), 9));
    client
        .ping_all(Instant::now() + Duration::from_secs(30))
        .unwrap();
    let history = Arc::try_unwrap(history).ok().unwrap().into_inner().unwrap();
    let acknowledged = history.acknowledged.iter().filter(|a| **a).count();
    assert!(acknowledged > 0, "the load made progress before the kills");
    resubmit(&mut client, &history);
    let mut sent = history.sent;
    if checkpointing {
        // Whether the kills left the node two checkpoints past segment 0 depends on when
        // they landed, so keep loading the restarted node until its checkpoints have
        // removed what they cover; then settle that load like the rest.
        let settle = Arc::new(Mutex::new(History::default()));
        let loaders = Loaders::start(&node, &accounts, &settle, kills);
        wait_checkpointed(&data_dir);
        loaders.stop();
        let settle = Arc::try_unwrap(settle).ok().unwrap().into_inner().unwrap();
        resubmit(&mut client, &settle);
        sent.extend(settle.sent);
    }
    stop_gracefully(node);

    let mut expected: HashMap<u128, i128> = HashMap::new();
    for ids in &accounts {
        expected.insert(ids[0], -((ids.len() as i128 - 1) * FUNDING as i128));
        for id in &ids[1..] {
            expected.insert(*id, FUNDING as i128);
        }
    }
    for t in &sent {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let (balances, conservation) = replayed_balances(&data_dir);
    assert_eq!(conservation, 0, "money is conserved");
    for (id, want) in &expected {
        assert_eq!(
            balances.get(id),
            Some(want),
            "balance of {id:#x}: each transfer applied exactly once"
        );
    }
    eprintln!(
        "crash test: {} transfers sent, {acknowledged} acknowledged before kills, all accounted for",
        sent.len()
    );
    data_dir
}
