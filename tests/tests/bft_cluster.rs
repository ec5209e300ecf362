//! End to end, BFT mode (`--fault-model bft`, docs/bft.md §12): four `percore node`
//! processes on loopback (n = 4, f = 1), one shard each (two in the multi-shard tests, each
//! its own group, transfers between them certified), replica 0 running a test-only
//! Byzantine behaviour (`--bft-test-byzantine`). Replica 0 leads view 0 of the only group,
//! so every test starts with a Byzantine leader.
//!
//! Each test drives transfers through a [`BftClient`] (every request to every replica,
//! accepted on `f + 1` identical replies) and asserts
//! - **liveness**: every request is accepted, so the group moved on from its Byzantine
//!   leader (the correct replicas' view is above 0 where the behaviour stalls view 0);
//! - **safety**: the three correct replicas' journals end on the same op with the same
//!   checksum (hash-chain head) and replay (`percore inspect --replay`) to the same state,
//!   whose balances are exactly the acknowledged transfers', money conserved;
//! - **evidence and certificates**: what each behaviour must leave in the metrics
//!   (equivocations detected, refused messages, the Byzantine replica's made-up client
//!   replies ignored, proposals with forged client requests refused), and a commit
//!   certificate journaled per op.
//!
//! Clients sign every request with the key `percore keygen --clients` wrote for their id.
//!
//! Conditions are waited on with deadlines, never sleeps. One test at a time; every process
//! is killed when its test ends, and a failing test prints the nodes' log tails.

use percore_tests::node::{self, Inspected, SMALL_NODE_ARGS};
use percore_tests::support::{self, Rng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use percore_engine::frame::Operation;
use percore_engine::record::{Account, CreateTransferResult, RecordResult, Transfer, shard_of};
use percore_net::client::{BftClient, ClientConfig, ClientError};
use percore_shards::cluster::{self, LocalCluster, LocalClusterConfig};
use percore_shards::loadgen::{account, transfer};

const PERCORE: &str = env!("CARGO_BIN_EXE_percore-node");
const REPLICAS: usize = 4;
const FAULTS: usize = 1;
/// Client keys written: client ids 1..=CLIENTS may submit.
const CLIENTS: usize = 8;
/// Records of the largest request: one batch (the node's default `--batch-entries-max`).
const FULL_BATCH_TRANSFERS: usize = 1_000;
const BYZANTINE: usize = 0;
const ACCOUNTS: usize = 8;
const FUNDING: u128 = 1 << 40;
const REQUESTS: usize = 30;
const TRANSFERS_PER_REQUEST: usize = 20;
const CONDITION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the correct replicas' commit points must stay equal and unchanged.
const QUIET_FOR: Duration = Duration::from_millis(600);

static SERIAL: Mutex<()> = Mutex::new(());

struct Harness {
    cluster: LocalCluster,
    root: PathBuf,
    /// The replica running a Byzantine behaviour, if any.
    byzantine: Option<usize>,
    _serial: MutexGuard<'static, ()>,
}

impl Harness {
    /// Replica [`BYZANTINE`] runs `behaviour`; `None`: all four are correct. One shard.
    fn start(name: &str, behaviour: Option<&str>) -> Self {
        Self::start_sharded(name, behaviour, 1)
    }

    /// [`Harness::start`] with `shards` shards per node, each its own BFT group.
    fn start_sharded(name: &str, behaviour: Option<&str>, shards: usize) -> Self {
        Self::start_with(name, behaviour, shards, &[])
    }

    /// [`Harness::start_sharded`] with `overrides` (flag, value) replacing or adding to
    /// [`SMALL_NODE_ARGS`].
    fn start_with(
        name: &str,
        behaviour: Option<&str>,
        shards: usize,
        overrides: &[(&str, &str)],
    ) -> Self {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let root = std::env::temp_dir().join(format!("percore-bft-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("test directory");
        let keys = root.join("bft-keys");
        keygen(&keys, REPLICAS);
        let port_base = cluster::free_port_base(REPLICAS, shards).expect("free ports");
        let mut extra: Vec<String> = Vec::new();
        for pair in SMALL_NODE_ARGS.chunks(2) {
            if !overrides.iter().any(|(flag, _)| *flag == pair[0]) {
                extra.extend(pair.iter().map(ToString::to_string));
            }
        }
        for (flag, value) in overrides {
            extra.extend([flag.to_string(), value.to_string()]);
        }
        extra.extend([
            "--fault-model".into(),
            "bft".into(),
            "--bft-keys-dir".into(),
            keys.display().to_string(),
        ]);
        let config = LocalClusterConfig {
            binary: PathBuf::from(PERCORE),
            replicas: REPLICAS,
            cores: vec![0; shards],
            replica_core_stride: 0,
            data_root: root.clone(),
            port_base,
            fsync: "never",
            extra_args: extra,
            metrics: true,
        };
        let mut replica_args = vec![Vec::new(); REPLICAS];
        if let Some(behaviour) = behaviour {
            replica_args[BYZANTINE] = vec!["--bft-test-byzantine".into(), behaviour.into()];
        }
        let cluster =
            LocalCluster::start_with_replica_args(config, replica_args).expect("cluster starts");
        let harness = Self {
            cluster,
            root,
            byzantine: behaviour.map(|_| BYZANTINE),
            _serial: serial,
        };
        harness.wait_mesh_connected(shards);
        harness
    }

    /// Waits until every shard of every replica has its connection to each peer up. A
    /// node serves clients as soon as it is ready, and a leader's messages to a peer it has
    /// not reached yet are dropped: a Byzantine leader's one proposal of a view could then
    /// reach no one, and a test of its refusal would see nothing to refuse.
    fn wait_mesh_connected(&self, shards: usize) {
        wait_until("every replica connected to every peer", || {
            (0..REPLICAS)
                .all(|replica| {
                    let Ok(text) = self.cluster.scrape(replica) else {
                        return false;
                    };
                    (0..shards).all(|shard| {
                        (0..REPLICAS).filter(|peer| *peer != replica).all(|peer| {
                            let labels = format!("shard=\"{shard}\",peer=\"{peer}\"");
                            cluster::metric(&text, "percore_peer_connected", &labels) == Some(1.0)
                        })
                    })
                })
                .then_some(())
        });
    }

    /// Client `client_id`, signing with its own key.
    fn client(&self, client_id: u128) -> BftClient {
        self.client_signing_as(client_id, client_id)
    }

    /// [`Harness::client`] whose requests give up after `timeout`.
    fn client_with_timeout(&self, client_id: u128, timeout: Duration) -> BftClient {
        self.client_built(client_id, client_id, timeout)
    }

    /// Client `client_id` signing with client `key_of`'s key (a different one: an
    /// impersonation, refused).
    fn client_signing_as(&self, client_id: u128, key_of: u128) -> BftClient {
        self.client_built(client_id, key_of, Duration::from_secs(30))
    }

    fn client_built(&self, client_id: u128, key_of: u128, timeout: Duration) -> BftClient {
        let path = self
            .root
            .join("bft-keys")
            .join(format!("client-{key_of}.key"));
        let text = std::fs::read_to_string(&path).expect("client key file");
        let key = percore_engine::bft::keys::parse_client_key(&text)
            .expect("client key")
            .key;
        let replicas = (0..REPLICAS)
            .map(|replica| {
                (0..self.cluster.shards())
                    .map(|shard| self.cluster.client_address(replica, shard))
                    .collect()
            })
            .collect();
        let mut config = ClientConfig::replicated(replicas, client_id);
        config.request_timeout = Some(timeout);
        BftClient::new(config, FAULTS, key)
    }

    fn metric(&self, replica: usize, name: &str) -> u64 {
        self.shard_metric(replica, name, 0)
    }

    fn shard_metric(&self, replica: usize, name: &str, shard: usize) -> u64 {
        let text = self.cluster.scrape(replica).expect("metrics scrape");
        cluster::shard_metric(&text, name, shard)
    }

    fn correct(&self) -> impl Iterator<Item = usize> {
        let byzantine = self.byzantine;
        (0..REPLICAS).filter(move |replica| Some(*replica) != byzantine)
    }

    /// Waits until the correct replicas executed the same BFT ops and applied the same
    /// journal ops, unchanged for [`QUIET_FOR`]; returns `(bft op, journal op)`.
    fn wait_converged(&self) -> (u64, u64) {
        self.wait_shard_converged(0)
    }

    /// [`Harness::wait_converged`] of `shard`'s group.
    fn wait_shard_converged(&self, shard: usize) -> (u64, u64) {
        let mut previous = None;
        let mut since = Instant::now();
        wait_until("the correct replicas agree and are quiet", || {
            let points: Vec<(u64, u64)> = self
                .correct()
                .map(|r| {
                    (
                        self.shard_metric(r, "percore_bft_commit_op", shard),
                        self.shard_metric(r, "percore_commit_op", shard),
                    )
                })
                .collect();
            let equal = points.iter().all(|point| *point == points[0]);
            if !equal || previous != Some(points[0]) {
                previous = equal.then_some(points[0]);
                since = Instant::now();
                return None;
            }
            (since.elapsed() >= QUIET_FOR).then_some(points[0])
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for replica in 0..REPLICAS {
                eprintln!(
                    "--- replica {replica} log tail ---\n{}",
                    self.cluster.log_tail(replica)
                );
            }
            eprintln!("data kept in {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn keygen(out: &Path, replicas: usize) {
    let output = Command::new(PERCORE)
        .args(["keygen", "--replicas", &replicas.to_string()])
        .args(["--clients", &CLIENTS.to_string(), "--out"])
        .arg(out)
        .output()
        .expect("percore keygen runs");
    assert!(
        output.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Polls `probe` until it returns a value, at most [`CONDITION_TIMEOUT`].
fn wait_until<T>(what: &str, probe: impl FnMut() -> Option<T>) -> T {
    support::wait_until(what, CONDITION_TIMEOUT, probe)
}

/// Accounts 1 (the mint, may go negative) and 2..=ACCOUNTS+1, each funded from the mint.
/// Returns the expected balances.
fn create_funded_accounts(client: &mut BftClient) -> HashMap<u128, i128> {
    let ids: Vec<u128> = (1..=ACCOUNTS as u128 + 1).collect();
    let accounts: Vec<Account> = ids
        .iter()
        .map(|id| {
            let flags = if *id == 1 {
                percore_engine::record::account_flags::ALLOW_NEGATIVE
            } else {
                0
            };
            account(*id, flags)
        })
        .collect();
    let results: Vec<RecordResult> = client
        .submit(Operation::CreateAccounts.into(), &accounts, |_| 0)
        .expect("accounts created");
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let funding: Vec<Transfer> = ids[1..]
        .iter()
        .map(|id| transfer(1000 + id, 1, *id, FUNDING))
        .collect();
    let results: Vec<RecordResult> = client
        .submit(Operation::CreateTransfers.into(), &funding, |_| 0)
        .expect("accounts funded");
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let mut expected = HashMap::new();
    expected.insert(1, -((ACCOUNTS as u128 * FUNDING) as i128));
    for id in &ids[1..] {
        expected.insert(*id, FUNDING as i128);
    }
    expected
}

/// `REQUESTS` requests of random transfers; every one must be accepted with `Ok`.
fn transfers_commit(client: &mut BftClient, expected: &mut HashMap<u128, i128>) -> usize {
    Load::new().commit(client, expected, REQUESTS)
}

/// Random transfers between the funded accounts, with fresh ids.
struct Load {
    rng: Rng,
    next_id: u128,
}

impl Load {
    fn new() -> Self {
        Self {
            rng: Rng(0x05EE_DBF7),
            next_id: 1u128 << 100,
        }
    }

    /// `requests` requests; every one must be accepted with `Ok`. Returns the transfers.
    fn commit(
        &mut self,
        client: &mut BftClient,
        expected: &mut HashMap<u128, i128>,
        requests: usize,
    ) -> usize {
        let (rng, next_id) = (&mut self.rng, &mut self.next_id);
        transfers_commit_with(
            client,
            expected,
            (requests, TRANSFERS_PER_REQUEST),
            rng,
            next_id,
        )
    }

    /// [`Load::commit`] with `transfers` transfers per request.
    fn commit_sized(
        &mut self,
        client: &mut BftClient,
        expected: &mut HashMap<u128, i128>,
        requests: usize,
        transfers: usize,
    ) -> usize {
        let (rng, next_id) = (&mut self.rng, &mut self.next_id);
        transfers_commit_with(client, expected, (requests, transfers), rng, next_id)
    }
}

fn transfers_commit_with(
    client: &mut BftClient,
    expected: &mut HashMap<u128, i128>,
    (requests, transfers_per_request): (usize, usize),
    rng: &mut Rng,
    next_id: &mut u128,
) -> usize {
    let mut acknowledged = 0;
    for _ in 0..requests {
        let transfers: Vec<Transfer> = (0..transfers_per_request)
            .map(|_| {
                let r = rng.next();
                let debit = 2 + (r % ACCOUNTS as u64) as u128;
                let credit = 2 + ((r >> 8) % ACCOUNTS as u64) as u128;
                let credit = if credit == debit {
                    2 + (credit - 1) % ACCOUNTS as u128
                } else {
                    credit
                };
                *next_id += 1;
                transfer(*next_id, debit, credit, 1 + u128::from((r >> 32) % 5))
            })
            .collect();
        let results: Vec<RecordResult> = client
            .submit(Operation::CreateTransfers.into(), &transfers, |_| 0)
            .expect("f + 1 replicas answer every request");
        for (t, r) in transfers.iter().zip(&results) {
            assert_eq!(r.code, CreateTransferResult::Ok as u32, "transfer {t:?}");
            *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
            *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
            acknowledged += 1;
        }
    }
    acknowledged
}

/// The whole scenario of one behaviour: accounts, transfers, convergence, `during` (checks
/// on the running cluster), then stop and compare the correct replicas' journals.
fn run(name: &str, behaviour: &str, during: impl FnOnce(&Harness, &BftClient)) {
    let mut harness = Harness::start(name, Some(behaviour));
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let acknowledged = transfers_commit(&mut client, &mut expected);
    assert_eq!(acknowledged, REQUESTS * TRANSFERS_PER_REQUEST);
    let (bft_op, journal_op) = harness.wait_converged();
    // Account creation, funding and the transfer requests, in however many batches.
    assert!(journal_op >= 3, "journal op {journal_op}");
    for replica in harness.correct() {
        assert!(
            harness.metric(replica, "percore_bft_certs_journaled_total") >= bft_op,
            "replica {replica}: a certificate per executed op"
        );
        assert_eq!(
            harness.metric(replica, "percore_bft_state_transfers_total"),
            0
        );
        // The leader is no longer the Byzantine replica 0 (view 0's leader).
        assert!(
            harness.metric(replica, "percore_bft_view") >= 1,
            "replica {replica} left the Byzantine leader's view"
        );
    }
    during(&harness, &client);
    // `during` may commit more (balance-neutral) requests.
    let (_, journal_op) = harness.wait_converged();
    harness.cluster.stop_all();
    let replicas_checked = compare_journals(&harness, journal_op, &expected);
    assert_eq!(replicas_checked, REPLICAS - 1);
    eprintln!(
        "{behaviour}: bft op {bft_op}, journal op {journal_op}, {acknowledged} transfers, \
         {} replies ignored",
        client.mismatched_replies()
    );
}

/// After the nodes stopped: the correct replicas' journals end on `journal_op` with the same
/// head, replay to the same state, whose balances are `expected` (money conserved), and each
/// keeps a certificate journal. Returns how many replicas were compared.
fn compare_journals(harness: &Harness, journal_op: u64, expected: &HashMap<u128, i128>) -> usize {
    compare_journals_with(harness, journal_op, expected, &[])
}

/// [`compare_journals`] of replicas that ran with `overrides` of the ledger's sizes.
fn compare_journals_with(
    harness: &Harness,
    journal_op: u64,
    expected: &HashMap<u128, i128>,
    overrides: &[(&str, &str)],
) -> usize {
    let inspected: Vec<(usize, Inspected)> = harness
        .correct()
        .map(|replica| {
            let data_dir = harness.cluster.data_dir(replica);
            (
                replica,
                node::inspect_replay_with(PERCORE, &data_dir, overrides),
            )
        })
        .collect();
    let (first, reference) = &inspected[0];
    assert_eq!(
        reference.heads[0].0, journal_op,
        "replica {first}: journal head"
    );
    assert_eq!(
        &reference.balances, expected,
        "every acknowledged transfer applied once, nothing else"
    );
    assert_eq!(expected.values().sum::<i128>(), 0, "money is conserved");
    for (replica, found) in &inspected[1..] {
        assert_eq!(
            found, reference,
            "replica {replica} agrees with replica {first}"
        );
    }
    for replica in harness.correct() {
        let certs = harness.cluster.data_dir(replica).join("bft-certs-0");
        assert!(
            std::fs::read_dir(&certs).is_ok_and(|mut entries| entries.next().is_some()),
            "replica {replica} keeps a certificate journal"
        );
    }
    inspected.len()
}

/// Restart (docs/bft.md §12): four correct replicas under client load; a follower is
/// SIGKILLed, the other three keep committing, it restarts from its data directory
/// (journal replayed, certificate journal and vote guard read back), catches up from its
/// peers' CommitProofs and follows again; all four journals and states agree.
/// `percore inspect --replay` of one replica's data directory.
fn inspect(data_dir: &Path) -> Inspected {
    node::inspect_replay(PERCORE, data_dir)
}

#[test]
fn bft_follower_restarts_after_sigkill_and_catches_up() {
    const VICTIM: usize = 2;
    const REQUESTS_WHILE_DOWN: usize = 5;
    let mut harness = Harness::start("restart", None);
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let mut load = Load::new();
    let mut acknowledged = load.commit(&mut client, &mut expected, 3);
    // Votes are guarded on disk before they are sent. A slow victim can execute the first
    // ops from its peers' CommitProofs without voting for them, so keep committing until it
    // has voted (and guarded) once.
    wait_until("the victim guards a vote", || {
        if harness.metric(VICTIM, "percore_bft_guard_writes_total") > 0 {
            return Some(());
        }
        acknowledged += load.commit(&mut client, &mut expected, 1);
        None
    });
    // Stop where the peers' next checkpoint is at least 12 ops away: they must still hold
    // the ops the victim misses in their window (beyond it, state transfer would be needed).
    // The peers commit 2 x REQUESTS_WHILE_DOWN requests (an op or more each) before the
    // victim has surely caught up; with 8 ops of room a slow restart (CI, every test of this
    // file on two cores) let them stabilize the next checkpoint first, once in a run.
    let interval = percore_engine::bft::CHECKPOINT_INTERVAL_OPS_DEFAULT;
    const _: () = assert!(2 * REQUESTS_WHILE_DOWN < 12);
    let (bft_op, _) = wait_until("an op early in a checkpoint interval", || {
        let (bft_op, journal_op) = harness.wait_converged();
        if (1..=4).contains(&(bft_op % interval)) {
            return Some((bft_op, journal_op));
        }
        acknowledged += load.commit(&mut client, &mut expected, 1);
        None
    });
    harness.cluster.kill(VICTIM);
    acknowledged += load.commit(&mut client, &mut expected, REQUESTS_WHILE_DOWN);
    let peers_op = wait_until("the others kept committing", || {
        let op = harness.metric(0, "percore_bft_commit_op");
        (op > bft_op).then_some(op)
    });
    harness
        .cluster
        .restart(VICTIM)
        .expect("the victim restarts");
    acknowledged += load.commit(&mut client, &mut expected, REQUESTS_WHILE_DOWN);
    let (bft_op, journal_op) = harness.wait_converged();
    assert!(bft_op > peers_op);
    assert_eq!(
        harness.metric(VICTIM, "percore_bft_state_transfers_total"),
        0,
        "caught up within the window"
    );
    assert!(
        harness.metric(VICTIM, "percore_bft_commit_proofs_applied_total") > 0,
        "caught up from CommitProofs"
    );
    let log = std::fs::read_to_string(harness.cluster.log_path(VICTIM)).unwrap_or_default();
    assert!(log.contains("BFT replica restarts"), "restored, not fresh");
    harness.cluster.stop_all();
    assert_eq!(compare_journals(&harness, journal_op, &expected), REPLICAS);
    // Every guard file is the two-copy format, written in place, and reads back.
    for replica in 0..REPLICAS {
        let path = harness.cluster.data_dir(replica).join("bft-guard-0");
        let bytes = std::fs::read(&path).expect("guard file");
        assert_eq!(bytes.len(), percore_shards::bft::GUARD_FILE_BYTES);
        let guard = percore_shards::bft::guard_decode(&bytes, 0, replica as u8)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert!(guard.vote_op_max > 0, "replica {replica} voted: {guard:?}");
    }
    eprintln!("restart: bft op {bft_op}, journal op {journal_op}, {acknowledged} transfers");
}

/// State transfer (docs/bft.md §12): a follower is SIGKILLed while the other three commit
/// well past several checkpoints (more than the log window), so its peers no longer hold
/// the ops it misses in their windows. Restarted, it learns their stable checkpoint
/// (CheckpointProof), fetches the missing committed ops with their commit certificates
/// from a peer's journals (`StateRequest` / `StateOps`), verifies every certificate and
/// the checkpoint's chain digest, journals and applies them, then catches up the rest
/// and follows; all four journals and states agree, money conserved.
#[test]
fn bft_follower_behind_several_checkpoints_catches_up_by_state_transfer() {
    const VICTIM: usize = 2;
    let interval = percore_engine::bft::CHECKPOINT_INTERVAL_OPS_DEFAULT;
    let window = percore_engine::bft::LOG_WINDOW_OPS_DEFAULT;
    let mut harness = Harness::start("transfer", None);
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let mut load = Load::new();
    let mut acknowledged = load.commit(&mut client, &mut expected, 3);
    let (killed_at, _) = harness.wait_converged();
    harness.cluster.kill(VICTIM);
    // Past the window and several checkpoints: the peers' stable checkpoint ends far above
    // the victim's last op.
    let target = killed_at + window + 3 * interval;
    while harness.metric(0, "percore_bft_commit_op") < target {
        acknowledged += load.commit(&mut client, &mut expected, 4);
    }
    let peers_low = harness.metric(0, "percore_bft_low_op");
    assert!(
        peers_low > killed_at + window,
        "peers' low {peers_low}, victim stopped at {killed_at}"
    );
    harness
        .cluster
        .restart(VICTIM)
        .expect("the victim restarts");
    acknowledged += load.commit(&mut client, &mut expected, 5);
    let (bft_op, journal_op) = harness.wait_converged();
    assert!(bft_op >= target);
    let metric = |name: &str| harness.metric(VICTIM, name);
    assert!(metric("percore_bft_state_transfers_total") >= 1);
    assert!(
        metric("percore_bft_state_transfers_completed_total") >= 1,
        "the transfer reached the certified checkpoint"
    );
    let applied = metric("percore_bft_state_ops_applied_total");
    assert!(
        applied >= peers_low - killed_at,
        "{applied} ops transferred, {} missing below the peers' checkpoint",
        peers_low - killed_at
    );
    let served: u64 = (0..REPLICAS)
        .filter(|replica| *replica != VICTIM)
        .map(|replica| harness.metric(replica, "percore_bft_state_ops_served_total"))
        .sum();
    assert!(served >= applied, "served {served}, applied {applied}");
    // Normal (1): no state transfer left waiting (3), and no view change started alone
    // (2) by a restarted replica that got client requests before its peers redialled it
    // (it suspects no leader before it has heard from f + 1 peers).
    assert_eq!(metric("percore_bft_status"), 1, "normal");
    assert_eq!(
        metric("percore_bft_low_op"),
        harness.metric(0, "percore_bft_low_op"),
        "same stable checkpoint"
    );
    assert!(
        metric("percore_bft_certs_journaled_total") >= applied,
        "every transferred op's certificate journaled"
    );
    let log = std::fs::read_to_string(harness.cluster.log_path(VICTIM)).unwrap_or_default();
    assert!(log.contains("BFT replica restarts"), "restored, not fresh");
    assert!(log.contains("BFT state transfer"), "{log}");
    harness.cluster.stop_all();
    assert_eq!(compare_journals(&harness, journal_op, &expected), REPLICAS);
    eprintln!(
        "state transfer: victim stopped at bft op {killed_at}, peers' checkpoint {peers_low}, \
         {applied} ops transferred; bft op {bft_op}, journal op {journal_op}, \
         {acknowledged} transfers"
    );
}

/// Whether the journal of `data_dir`'s shard 0 no longer holds segment 0 (its first ops).
fn first_segment_released(data_dir: &Path) -> bool {
    let dir = data_dir.join("shard-0");
    std::fs::read_dir(&dir).is_ok()
        && !dir
            .join(percore_engine::journal::segment_file_name(0))
            .exists()
}

/// State transfer from a certified snapshot (docs/bft.md §5, §12): snapshot checkpoints
/// every 32 BFT ops, peers keeping only 64 journal ops below their stable checkpoint in
/// 1 MiB segments. Follower 2 is SIGKILLed after the first ops; the others commit until
/// every one of them has removed the journal segment holding the ops the victim needs
/// next, so no peer can serve them by log. It restarts: a peer offers its state
/// certificate, the victim fetches the snapshot, checks it restores to the state digest
/// `2f + 1` replicas signed, installs it as its journal's base, then fetches the ops above
/// by log and follows. All four journals (head op and hash-chain checksum) and replayed
/// states agree, money conserved. With `corrupt_peer`, that replica serves every snapshot
/// chunk with a flipped byte, and follower 3 is frozen (SIGSTOP) instead of killed: its
/// connections stay up, and when it runs again (SIGCONT) its transfer asks replica 0 first
/// (the next index); that fetch fails, is counted, and the next peer's snapshot is
/// installed.
fn snapshot_transfer(name: &str, corrupt_peer: Option<usize>) {
    // Replica 3 asks replica 0 first (the next index): the corrupting one, when there is.
    let victim = if corrupt_peer.is_some() { 3 } else { 2 };
    const TRANSFERS: usize = 200;
    let overrides = [
        ("--segment-mib", "1"),
        ("--checkpoint-interval-ops", "32"),
        ("--bft-retain-ops", "64"),
    ];
    let mut harness = if let Some(peer) = corrupt_peer {
        assert_eq!(peer, BYZANTINE);
        let mut harness = Harness::start_with(name, Some("corrupt-snapshot"), 1, &overrides);
        // It is correct but for the snapshots it serves: convergence includes it.
        harness.byzantine = None;
        harness
    } else {
        Harness::start_with(name, None, 1, &overrides)
    };
    // The client reaches every replica, the frozen one included: the requests waiting in
    // its sockets are stale when it runs again, and it must answer them at once (1017)
    // rather than wait for commits no leader will propose and suspect its leader.
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let mut load = Load::new();
    let mut acknowledged = load.commit(&mut client, &mut expected, 3);
    let (killed_at, _) = harness.wait_converged();
    if corrupt_peer.is_some() {
        harness.cluster.pause(victim).expect("SIGSTOP");
    } else {
        harness.cluster.kill(victim);
    }
    let peers: Vec<usize> = (0..REPLICAS).filter(|r| *r != victim).collect();
    let started = Instant::now();
    while !peers
        .iter()
        .all(|peer| first_segment_released(&harness.cluster.data_dir(*peer)))
    {
        assert!(
            started.elapsed() < CONDITION_TIMEOUT,
            "the peers never released their first journal segment"
        );
        acknowledged += load.commit_sized(&mut client, &mut expected, 4, TRANSFERS);
    }
    // Stop half-way between two snapshot ops: the peers' stable checkpoint is then 16 ops
    // above their latest snapshot, and those ops must come by log after the snapshot.
    while harness.metric(0, "percore_bft_low_op") % 32 != 16 {
        assert!(
            started.elapsed() < CONDITION_TIMEOUT,
            "no checkpoint between snapshots"
        );
        acknowledged += load.commit_sized(&mut client, &mut expected, 1, TRANSFERS);
    }
    let certified = harness.metric(0, "percore_bft_state_certs_total");
    assert!(certified >= 1, "state certificates formed at the peers");
    if corrupt_peer.is_some() {
        harness.cluster.resume(victim).expect("SIGCONT");
    } else {
        harness
            .cluster
            .restart(victim)
            .expect("the victim restarts");
    }
    acknowledged += load.commit(&mut client, &mut expected, 5);
    let (bft_op, journal_op) = harness.wait_converged();
    let metric = |name: &str| harness.metric(victim, name);
    assert!(metric("percore_bft_snapshot_fetches_total") >= 1);
    assert!(
        metric("percore_bft_snapshot_installs_total") >= 1,
        "a certified snapshot was installed"
    );
    assert!(metric("percore_bft_state_transfers_completed_total") >= 1);
    // The ops between the snapshot and the peers' checkpoint come by log: as StateOps, or
    // as CommitProofs when the peers' window still holds them once the snapshot is in
    // (which of the two depends on timing).
    let applied = metric("percore_bft_state_ops_applied_total")
        + metric("percore_bft_commit_proofs_applied_total");
    assert!(applied >= 1, "the ops above the snapshot came by log");
    assert!(metric("percore_bft_snapshot_bytes_total") > 0);
    let served: u64 = peers
        .iter()
        .map(|peer| harness.metric(*peer, "percore_bft_snapshot_bytes_served_total"))
        .sum();
    assert!(served > 0, "a peer served the snapshot");
    assert_eq!(metric("percore_bft_status"), 1, "normal");
    assert_eq!(
        metric("percore_bft_low_op"),
        harness.metric(0, "percore_bft_low_op"),
        "same stable checkpoint"
    );
    let failed = metric("percore_bft_snapshot_fetches_failed_total");
    if corrupt_peer.is_some() {
        assert!(failed >= 1, "the corrupted snapshot was refused");
        assert!(
            metric("percore_bft_stale_requests_total") >= 1,
            "the requests queued while it was frozen were answered as stale"
        );
        assert!(
            harness.metric(BYZANTINE, "percore_bft_snapshot_bytes_served_total") > 0,
            "the corrupting replica served chunks"
        );
        assert_eq!(
            metric("percore_bft_snapshot_fetches_total"),
            failed + metric("percore_bft_snapshot_installs_total"),
            "every fetch either failed or was installed"
        );
    } else {
        assert_eq!(failed, 0, "no peer lies");
    }
    let log = std::fs::read_to_string(harness.cluster.log_path(victim)).unwrap_or_default();
    assert_eq!(
        log.contains("BFT replica restarts"),
        corrupt_peer.is_none(),
        "restored, not fresh (killed), or never restarted (frozen)"
    );
    assert!(
        log.contains("certified snapshot verified and installed"),
        "{log}"
    );
    let (bft_op, journal_op) = if corrupt_peer.is_none() {
        // Once more: a restart from the installed snapshot (journal based on it, the state
        // certificate in the certificate journal) restores above it and follows.
        harness.cluster.kill(victim);
        acknowledged += load.commit(&mut client, &mut expected, 3);
        harness
            .cluster
            .restart(victim)
            .expect("the victim restarts again");
        acknowledged += load.commit(&mut client, &mut expected, 3);
        let converged = harness.wait_converged();
        assert!(converged.0 > bft_op);
        assert_eq!(
            harness.metric(victim, "percore_bft_status"),
            1,
            "normal after the second restart"
        );
        converged
    } else {
        (bft_op, journal_op)
    };
    harness.cluster.stop_all();
    assert_eq!(compare_journals(&harness, journal_op, &expected), REPLICAS);
    eprintln!(
        "snapshot transfer: victim stopped at bft op {killed_at}, {certified} state \
         certificates at replica 0, {failed} failed fetches, {} ops by log after the \
         snapshot; bft op {bft_op}, journal op {journal_op}, {acknowledged} transfers, {:?}",
        applied,
        started.elapsed()
    );
}

/// Whether the certificate journal of `data_dir`'s shard 0 no longer holds segment 0.
fn first_cert_segment_released(data_dir: &Path) -> bool {
    let dir = data_dir.join("bft-certs-0");
    std::fs::read_dir(&dir).is_ok()
        && !dir
            .join(percore_engine::journal::segment_file_name(0))
            .exists()
}

/// The certificate journal is bounded (docs/bft.md §12, *Checkpoints*): with 1 MiB
/// segments (256 records of one sector), checkpoints every 32 ops and 64 ops kept for
/// peers, replica 3 is SIGKILLed after the first ops and the others commit until each has
/// released the first segment of its certificate journal. Replica 3 restarts, far behind
/// every peer's logs: it fetches a certified snapshot and the ops above it by log, read
/// from the peers' truncated certificate journals. Then replica 2 is SIGKILLed and
/// restarted: it restores from its certificate journal's base (the records before it are
/// gone) and follows. All four journals and states agree, money conserved.
#[test]
fn bft_certificate_journal_is_released_and_a_replica_restarts_from_its_base() {
    const FAR_BEHIND: usize = 3;
    const VICTIM: usize = 2;
    let overrides = [
        ("--segment-mib", "1"),
        ("--checkpoint-interval-ops", "32"),
        ("--bft-retain-ops", "64"),
    ];
    let mut harness = Harness::start_with("certs", None, 1, &overrides);
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let mut load = Load::new();
    let mut acknowledged = load.commit(&mut client, &mut expected, 3);
    let (killed_at, _) = harness.wait_converged();
    harness.cluster.kill(FAR_BEHIND);
    let peers: Vec<usize> = (0..REPLICAS).filter(|r| *r != FAR_BEHIND).collect();
    let started = Instant::now();
    while !peers
        .iter()
        .all(|peer| first_cert_segment_released(&harness.cluster.data_dir(*peer)))
    {
        assert!(
            started.elapsed() < CONDITION_TIMEOUT,
            "the peers never released their first certificate journal segment"
        );
        acknowledged += load.commit(&mut client, &mut expected, 8);
    }
    let released_at = harness.metric(0, "percore_bft_commit_op");
    for peer in &peers {
        assert!(
            harness.metric(*peer, "percore_bft_cert_segments_released_total") >= 1,
            "replica {peer} counts its released segments"
        );
    }
    harness
        .cluster
        .restart(FAR_BEHIND)
        .expect("the replica far behind restarts");
    acknowledged += load.commit(&mut client, &mut expected, 3);
    harness.wait_converged();
    assert!(
        harness.metric(FAR_BEHIND, "percore_bft_snapshot_installs_total") >= 1,
        "the replica far behind installed a certified snapshot"
    );
    assert_eq!(
        harness.metric(FAR_BEHIND, "percore_bft_status"),
        1,
        "normal"
    );
    harness.cluster.kill(VICTIM);
    acknowledged += load.commit(&mut client, &mut expected, 3);
    harness
        .cluster
        .restart(VICTIM)
        .expect("the victim restarts");
    acknowledged += load.commit(&mut client, &mut expected, 3);
    let (bft_op, journal_op) = harness.wait_converged();
    assert_eq!(harness.metric(VICTIM, "percore_bft_status"), 1, "normal");
    assert_eq!(
        harness.metric(VICTIM, "percore_bft_low_op"),
        harness.metric(0, "percore_bft_low_op"),
        "same stable checkpoint"
    );
    let log = std::fs::read_to_string(harness.cluster.log_path(VICTIM)).unwrap_or_default();
    assert!(log.contains("BFT replica restarts"), "restored, not fresh");
    assert!(
        log.contains("BFT certificate journal restarts from its base"),
        "restored from the truncated certificate journal: {log}"
    );
    for replica in 0..REPLICAS {
        let log = std::fs::read_to_string(harness.cluster.log_path(replica)).unwrap_or_default();
        assert!(
            !log.contains("certificate journal is no longer checkpointed"),
            "replica {replica}: every record continued the ones before it"
        );
    }
    harness.cluster.stop_all();
    assert_eq!(compare_journals(&harness, journal_op, &expected), REPLICAS);
    eprintln!(
        "certificate journal: replica {FAR_BEHIND} stopped at bft op {killed_at}, first \
         segments released by bft op {released_at}; bft op {bft_op}, journal op {journal_op}, \
         {acknowledged} transfers, {:?}",
        started.elapsed()
    );
}

#[test]
fn bft_follower_behind_every_log_catches_up_from_a_certified_snapshot() {
    snapshot_transfer("snapshot", None);
}

#[test]
fn bft_corrupted_snapshot_is_refused_and_fetched_from_another_peer() {
    snapshot_transfer("snapshot-corrupt", Some(BYZANTINE));
}

/// Accounts for a cluster of `shards` shards (each its own group): per shard a mint that may
/// go negative and `per_shard` accounts funded from it with [`FUNDING`], all on that shard.
/// Returns the accounts of each shard (mints left out) and the expected balances.
fn sharded_accounts(
    client: &mut BftClient,
    shards: u32,
    per_shard: usize,
) -> (Vec<Vec<u128>>, HashMap<u128, i128>) {
    let shard_of = |id: u128| shard_of(id, shards) as usize;
    let mut mints = vec![0u128; shards as usize];
    let mut members: Vec<Vec<u128>> = vec![Vec::new(); shards as usize];
    for id in 1u128.. {
        let shard = shard_of(id);
        if mints[shard] == 0 {
            mints[shard] = id;
        } else if members[shard].len() < per_shard {
            members[shard].push(id);
        }
        if members.iter().all(|m| m.len() == per_shard) {
            break;
        }
    }
    let accounts: Vec<Account> = mints
        .iter()
        .map(|id| account(*id, percore_engine::record::account_flags::ALLOW_NEGATIVE))
        .chain(members.iter().flatten().map(|id| account(*id, 0)))
        .collect();
    let results: Vec<RecordResult> = client
        .submit(
            Operation::CreateAccounts.into(),
            &accounts,
            |a: &Account| shard_of(a.id),
        )
        .expect("accounts created on every group");
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let mut expected: HashMap<u128, i128> = accounts.iter().map(|a| (a.id, 0)).collect();
    let funding: Vec<Transfer> = (0..shards as usize)
        .flat_map(|shard| members[shard].iter().map(move |id| (shard, *id)))
        .map(|(shard, id)| transfer(1000 + id, mints[shard], id, FUNDING))
        .collect();
    let results: Vec<RecordResult> = client
        .submit(
            Operation::CreateTransfers.into(),
            &funding,
            |t: &Transfer| shard_of(t.debit_account_id),
        )
        .expect("accounts funded on every group");
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    for t in &funding {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    (members, expected)
}

/// Committed batches that are not batches of the shard are served by state transfer
/// (docs/bft.md §12). Two shards (two groups); replica 0 runs `invalid-batch`: it admits
/// client requests that correct replicas refuse, and leads view 0 of group 0. Each round
/// the client sends group 0 a validly signed transfer between two accounts of shard 1:
/// the correct replicas refuse it (`WrongShard`), but replica 0 proposes it, the backups
/// vote for it (its signature is the client's, for group 0) and group 0 commits it, and
/// every correct replica applies nothing of it (`BatchInvalid::ForeignRecord`). No snapshots (`--checkpoint-interval-ops
/// 0`), so follower 2, killed after the first ops and restarted once its peers' stable
/// checkpoint is far above it, must fetch every op by log, the invalid ones included
/// (their bytes come from the certificate journal): it completes the transfer, skips the
/// same batches, and its journals and state agree with the other correct replicas'.
#[test]
fn bft_state_transfer_serves_committed_batches_that_are_not_this_shards() {
    const VICTIM: usize = 2;
    const SHARDS: u32 = 2;
    const PER_SHARD: usize = 4;
    let interval = percore_engine::bft::CHECKPOINT_INTERVAL_OPS_DEFAULT;
    let window = percore_engine::bft::LOG_WINDOW_OPS_DEFAULT;
    let mut harness = Harness::start_with(
        "invalid-batch",
        Some("invalid-batch"),
        SHARDS as usize,
        &[("--checkpoint-interval-ops", "0")],
    );
    let mut client = harness.client(7);
    let (members, mut expected) = sharded_accounts(&mut client, SHARDS, PER_SHARD);
    let by_debit = |t: &Transfer| shard_of(t.debit_account_id, SHARDS) as usize;
    let mut next_id = 1u128 << 100;
    let mut acknowledged = 0;
    let mut refused = 0;
    // One round: a request of transfers within shard 0 (committed `Ok`), then a transfer
    // of shard 1 sent to group 0 (refused by the correct replicas, proposed by replica 0).
    let mut round = |client: &mut BftClient, expected: &mut HashMap<u128, i128>| {
        let within: Vec<Transfer> = (0..TRANSFERS_PER_REQUEST)
            .map(|k| {
                next_id += 1;
                let debit = members[0][k % PER_SHARD];
                let credit = members[0][(k + 1) % PER_SHARD];
                transfer(next_id, debit, credit, 1 + (k as u128 % 3))
            })
            .collect();
        let results: Vec<RecordResult> = client
            .submit(Operation::CreateTransfers.into(), &within, by_debit)
            .expect("f + 1 replicas answer");
        for (t, r) in within.iter().zip(&results) {
            assert_eq!(r.code, CreateTransferResult::Ok as u32, "transfer {t:?}");
            *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
            *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
        }
        acknowledged += within.len();
        next_id += 1;
        let foreign = [transfer(next_id, members[1][0], members[1][1], 5)];
        let answer = client.submit::<Transfer, RecordResult>(
            Operation::CreateTransfers.into(),
            &foreign,
            |_| 0,
        );
        assert!(
            matches!(answer, Err(ClientError::WrongShard { shard: 0, .. })),
            "{answer:?}"
        );
        refused += 1;
    };
    for _ in 0..3 {
        round(&mut client, &mut expected);
    }
    let (killed_at, _) = harness.wait_converged();
    let invalid_before_kill = harness.metric(1, "percore_bft_batches_invalid_total");
    harness.cluster.kill(VICTIM);
    let target = killed_at + window + 3 * interval;
    while harness.metric(1, "percore_bft_commit_op") < target {
        round(&mut client, &mut expected);
    }
    let invalid_at_peer = harness.metric(1, "percore_bft_batches_invalid_total");
    assert!(
        invalid_at_peer > 0,
        "the leader's batches of another shard were committed"
    );
    // Group 0 commits replica 0's invalid batches while it leads; a view change (its
    // backups' timers under load) can end that before the kill, and then the victim has
    // none to fetch.
    let invalid_while_down = invalid_at_peer - invalid_before_kill;
    harness
        .cluster
        .restart(VICTIM)
        .expect("the victim restarts");
    for _ in 0..5 {
        round(&mut client, &mut expected);
    }
    let (bft_op, journal_op) = harness.wait_converged();
    harness.wait_shard_converged(1);
    let metric = |name: &str| harness.metric(VICTIM, name);
    assert!(metric("percore_bft_state_transfers_completed_total") >= 1);
    assert_eq!(
        metric("percore_bft_snapshot_fetches_total"),
        0,
        "by log only"
    );
    let invalid_at_victim = metric("percore_bft_batches_invalid_total");
    if invalid_while_down > 0 {
        assert!(
            invalid_at_victim > 0,
            "{invalid_while_down} invalid batches committed while the victim was down: \
             transferred and skipped"
        );
    } else {
        eprintln!("no invalid batch was committed while the victim was down (view changed)");
    }
    assert_eq!(metric("percore_bft_status"), 1, "normal");
    assert!(bft_op > journal_op, "some ops applied nothing");
    harness.cluster.stop_all();
    assert_eq!(
        compare_journals(&harness, journal_op, &expected),
        REPLICAS - 1
    );
    eprintln!(
        "invalid batches: victim stopped at bft op {killed_at}, {invalid_at_peer} invalid \
         batches at a peer, {invalid_at_victim} at the victim; bft op {bft_op}, journal op \
         {journal_op}, {acknowledged} transfers, {refused} refused"
    );
}

#[test]
fn bft_equivocating_leader_is_caught_and_replaced() {
    run("equivocate", "equivocate", |harness, client| {
        let detected: u64 = harness
            .correct()
            .map(|r| harness.metric(r, "percore_bft_equivocations_total"))
            .sum();
        assert!(detected > 0, "the equivocating leader is caught");
        let kept: u64 = harness
            .correct()
            .map(|r| harness.metric(r, "percore_bft_evidence_kept"))
            .sum();
        assert!(kept > 0, "evidence is kept");
        let logged = harness.correct().any(|r| {
            std::fs::read_to_string(harness.cluster.log_path(r))
                .is_ok_and(|log| log.contains("BFT equivocation"))
        });
        assert!(logged, "evidence is logged");
        assert!(client.mismatched_replies() > 0, "made-up replies ignored");
    });
}

#[test]
fn bft_silent_leader_is_replaced() {
    run("silent", "silent", |harness, client| {
        let changes: u64 = harness
            .correct()
            .map(|r| harness.metric(r, "percore_bft_view_changes_total"))
            .sum();
        assert!(changes > 0);
        assert_eq!(
            client.mismatched_replies(),
            0,
            "a silent replica says nothing"
        );
    });
}

#[test]
fn bft_wrong_digest_leader_is_refused_and_replaced() {
    run("wrong-digest", "wrong-digest", |harness, client| {
        let refused: u64 = harness
            .correct()
            .map(|r| harness.metric(r, "percore_bft_messages_refused_total"))
            .sum();
        assert!(
            refused > 0,
            "proposals and votes for wrong digests are refused"
        );
        assert!(client.mismatched_replies() > 0, "made-up replies ignored");
    });
}

/// Client authentication (docs/bft.md §2, §12): replica 0 leads view 0 and adds to each of
/// its proposals a transfer no client signed (a client's signed transfer with its id
/// changed, under a new request number). The correct backups refuse to vote for those
/// proposals (counted, logged), the group changes view, every honest request still commits
/// `Ok`, and no correct replica ever applies the forged transfer: the replayed balances
/// are exactly the acknowledged transfers' and no committed batch was skipped. Requests
/// under an unknown client id, or signed with another client's key, are refused with the
/// typed errors.
#[test]
fn bft_forged_client_request_never_commits_and_the_leader_is_replaced() {
    run("forge-request", "forge-request", |harness, client| {
        for replica in harness.correct() {
            assert!(
                harness.metric(replica, "percore_bft_proposals_refused_total") > 0,
                "replica {replica} refused to vote for a forged request"
            );
            assert_eq!(
                harness.metric(replica, "percore_bft_batches_invalid_total"),
                0,
                "replica {replica}: nothing forged was ever committed"
            );
            assert!(harness.metric(replica, "percore_bft_client_signatures_verified_total") > 0);
        }
        let logged = harness.correct().any(|r| {
            std::fs::read_to_string(harness.cluster.log_path(r))
                .is_ok_and(|log| log.contains("BFT leader proposed a request no client signed"))
        });
        assert!(logged, "the refusal is logged");
        assert_eq!(client.mismatched_replies(), 0, "no replica lies to clients");
        let one = [transfer(1 << 90, 2, 3, 1)];
        let unknown = CLIENTS as u128 + 1;
        let outcome = harness
            .client_signing_as(unknown, 1)
            .submit::<_, RecordResult>(Operation::CreateTransfers.into(), &one, |_| 0);
        assert!(
            matches!(outcome, Err(ClientError::UnknownClient { .. })),
            "{outcome:?}"
        );
        let outcome = harness.client_signing_as(2, 3).submit::<_, RecordResult>(
            Operation::CreateTransfers.into(),
            &one,
            |_| 0,
        );
        assert!(
            matches!(outcome, Err(ClientError::SignatureRefused { .. })),
            "{outcome:?}"
        );
        let refused: u64 = harness
            .correct()
            .map(|r| harness.metric(r, "percore_bft_client_requests_refused_total"))
            .sum();
        assert!(refused >= 2, "refusals counted");
        // A signed request as large as a batch (its signature after a full frame of
        // records) commits; it moves money back and forth, so the balances stay.
        let full: Vec<Transfer> = (0..FULL_BATCH_TRANSFERS as u128)
            .map(|i| {
                let (debit, credit) = if i % 2 == 0 { (2, 3) } else { (3, 2) };
                transfer((1 << 91) + i, debit, credit, 1)
            })
            .collect();
        let results: Vec<RecordResult> = harness
            .client(1)
            .submit(Operation::CreateTransfers.into(), &full, |_| 0)
            .expect("a full-batch signed request commits");
        assert!(
            results
                .iter()
                .all(|r| r.code == CreateTransferResult::Ok as u32)
        );
        // One verify per request per replica: at admission; the vote and the execution
        // find it verified. Each refused proposal costs one more (its forged request).
        let requests = (REQUESTS + 6) as u64;
        for replica in harness.correct() {
            let verified = harness.metric(replica, "percore_bft_client_signatures_verified_total");
            let refused = harness.metric(replica, "percore_bft_proposals_refused_total");
            eprintln!(
                "replica {replica}: {verified} signatures verified, {refused} proposals refused"
            );
            assert!(
                verified <= requests + refused,
                "replica {replica}: {verified} verifies for about {requests} requests"
            );
        }
    });
}

/// Replica 0 leads view 0 and adds to each proposal the first request of the proposal it
/// made eight before (`--bft-test-byzantine replay-request`): a genuine signed request,
/// committed long ago, proposed again, which the backups vote for. Its transfers have left
/// the ledger's duplicate window (`--transfers-max 64`, three requests' worth), so only the
/// session table keeps them from applying a second time: in BFT mode it refuses them
/// (`docs/bft.md` §13). Every honest request commits `Ok`, and the correct replicas'
/// replayed balances are exactly the acknowledged transfers'. A session table that applied
/// such a request again (the crash-fault fallback) fails the balances.
#[test]
fn bft_old_request_proposed_again_never_applies_twice() {
    let small_window = [("--transfers-max", "64")];
    let harness = Harness::start_with("replay-request", Some("replay-request"), 1, &small_window);
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let acknowledged = transfers_commit(&mut client, &mut expected);
    assert_eq!(acknowledged, REQUESTS * TRANSFERS_PER_REQUEST);
    let (_, journal_op) = harness.wait_converged();
    let log = std::fs::read_to_string(harness.cluster.log_path(BYZANTINE)).unwrap_or_default();
    let replayed = log
        .matches("TEST ONLY: this leader proposes an old signed request again")
        .count();
    assert!(
        replayed >= REQUESTS / 2,
        "the leader proposed {replayed} old requests again"
    );
    assert_eq!(client.mismatched_replies(), 0, "no replica lies to clients");
    // The correct replicas apply the same dispositions: the refusals are counted alike, and
    // the honest requests (accounts, funding, transfers: one session) were applied.
    let refused: Vec<u64> = harness
        .correct()
        .map(|r| harness.metric(r, "percore_session_requests_refused_total"))
        .collect();
    assert!(refused[0] > 0, "old requests refused: {refused:?}");
    assert!(refused.iter().all(|&n| n == refused[0]), "{refused:?}");
    for replica in harness.correct() {
        assert!(
            harness.metric(replica, "percore_session_requests_applied_total") >= REQUESTS as u64
        );
        assert_eq!(
            harness.metric(replica, "percore_session_fallbacks_total"),
            0
        );
    }
    let mut harness = harness;
    harness.cluster.stop_all();
    let replicas_checked = compare_journals_with(&harness, journal_op, &expected, &small_window);
    assert_eq!(replicas_checked, REPLICAS - 1);
    eprintln!(
        "replay-request: journal op {journal_op}, {replayed} old requests proposed again, \
         {refused:?} refused"
    );
}

/// Random transfers among `members` (accounts of `shards` groups), `transfers` per
/// request, each crossing to another shard with probability one half; `cross` picks the
/// direction of the crossing ones (`None`: any).
fn mixed_transfers(
    rng: &mut Rng,
    members: &[Vec<u128>],
    next_id: &mut u128,
    transfers: usize,
    cross: Option<(usize, usize)>,
) -> Vec<Transfer> {
    let shards = members.len() as u64;
    (0..transfers)
        .map(|_| {
            let r = rng.next();
            let (from, to) = match cross {
                Some(direction) if r.is_multiple_of(2) => direction,
                Some((from, _)) => (from, from),
                None => {
                    let from = (r % shards) as usize;
                    let to = if shards == 1 || (r >> 4).is_multiple_of(2) {
                        from
                    } else {
                        (from + 1 + ((r >> 5) % (shards - 1)) as usize) % shards as usize
                    };
                    (from, to)
                }
            };
            let debit_at = ((r >> 8) % members[from].len() as u64) as usize;
            let mut credit_at = ((r >> 16) % members[to].len() as u64) as usize;
            if from == to && credit_at == debit_at {
                credit_at = (credit_at + 1) % members[to].len();
            }
            *next_id += 1;
            transfer(
                *next_id,
                members[from][debit_at],
                members[to][credit_at],
                1 + u128::from((r >> 32) % 5),
            )
        })
        .collect()
}

/// Submits `requests` requests of [`mixed_transfers`] from `client`; every transfer must be
/// accepted with `Ok`. Returns the transfers.
fn commit_mixed(
    client: &mut BftClient,
    (members, shards): (&[Vec<u128>], u32),
    (seed, mut next_id): (u64, u128),
    requests: usize,
    cross: Option<(usize, usize)>,
) -> Vec<Transfer> {
    let by_debit = |t: &Transfer| shard_of(t.debit_account_id, shards) as usize;
    let mut rng = Rng(seed);
    let mut committed = Vec::new();
    for _ in 0..requests {
        let transfers = mixed_transfers(
            &mut rng,
            members,
            &mut next_id,
            TRANSFERS_PER_REQUEST,
            cross,
        );
        let results: Vec<RecordResult> = client
            .submit(Operation::CreateTransfers.into(), &transfers, by_debit)
            .expect("f + 1 replicas of each group answer");
        for (t, r) in transfers.iter().zip(&results) {
            assert_eq!(r.code, CreateTransferResult::Ok as u32, "transfer {t:?}");
        }
        committed.extend(transfers);
    }
    committed
}

impl Harness {
    /// Waits until every correct replica of every group of `shards` holds no outputs to
    /// other groups (every leg acknowledged, every acknowledgement released), no in-flight
    /// chunk (every leg in flight at a snapshot op acknowledged) and no proof waits to
    /// commit, then until each group converged; returns each group's `(bft op,
    /// journal op)`.
    fn wait_transfers_settled(&self, shards: usize) -> Vec<(u64, u64)> {
        let mut last = String::new();
        // Just before the wait gives up, what each replica's cross-shard side did, to tell
        // a proof nobody forwards from one nobody proposes or one every replica drops.
        let report_at = Instant::now() + CONDITION_TIMEOUT
            - Duration::from_millis(4 * support::POLL_INTERVAL_MS);
        let mut reported = false;
        wait_until("every leg is acknowledged and released", || {
            let mut busy = false;
            let mut seen = String::new();
            for replica in self.correct() {
                for shard in 0..shards {
                    let kept = self.shard_metric(replica, "percore_bft_xshard_outputs_kept", shard);
                    let queued =
                        self.shard_metric(replica, "percore_bft_xshard_inbound_queued", shard);
                    let chunks =
                        self.shard_metric(replica, "percore_bft_xshard_in_flight_kept", shard);
                    busy |= kept > 0 || queued > 0 || chunks > 0;
                    seen += &format!(" r{replica}s{shard}:{kept}/{queued}/{chunks}");
                }
            }
            if seen != last {
                eprintln!(
                    "outputs kept / proofs queued / in-flight chunks kept, per replica and \
                     shard:{seen}"
                );
                last = seen;
            }
            if busy && !reported && Instant::now() >= report_at {
                reported = true;
                eprintln!("{}", self.xshard_report(shards));
            }
            (!busy).then_some(())
        });
        (0..shards)
            .map(|shard| self.wait_shard_converged(shard))
            .collect()
    }

    /// Per correct replica and shard: BFT status (1 normal, 2 view change, 3 state
    /// transfer), view, commit op, leading or not, the cross-shard proof counters, and the
    /// peer messages its outboxes dropped (a forwarded proof among them).
    fn xshard_report(&self, shards: usize) -> String {
        const COLUMNS: [(&str, &str); 12] = [
            ("status", "percore_bft_status"),
            ("view", "percore_bft_view"),
            ("commit", "percore_bft_commit_op"),
            ("leads", "percore_bft_is_leader"),
            ("queued", "percore_bft_xshard_inbound_queued"),
            ("accepted", "percore_bft_xshard_proofs_accepted_total"),
            ("committed", "percore_bft_xshard_proofs_committed_total"),
            ("forwarded", "percore_bft_xshard_proofs_forwarded_total"),
            (
                "forwarded_in",
                "percore_bft_xshard_proofs_forwarded_in_total",
            ),
            (
                "recently_applied",
                "percore_bft_xshard_proofs_recently_applied_total",
            ),
            ("proposed", "percore_bft_xshard_batches_proposed_total"),
            ("peer_drops", "percore_replication_messages_dropped_total"),
        ];
        let mut report = String::from("cross-shard state before the timeout:");
        for replica in self.correct() {
            let Ok(text) = self.cluster.scrape(replica) else {
                report += &format!("\n  r{replica}: no scrape");
                continue;
            };
            for shard in 0..shards {
                report += &format!("\n  r{replica}s{shard}:");
                for (label, name) in COLUMNS {
                    report += &format!(" {label}={}", cluster::shard_metric(&text, name, shard));
                }
            }
        }
        report
    }

    /// Stops every node, then checks the correct replicas: journals end on `groups`' journal
    /// ops with the same heads, replay to the same state, whose balances are `expected`,
    /// with no leg in flight and money conserved.
    fn stop_and_check_settled(&mut self, groups: &[(u64, u64)], expected: &HashMap<u128, i128>) {
        self.cluster.stop_all();
        let inspected: Vec<Inspected> = self
            .correct()
            .map(|replica| inspect(&self.cluster.data_dir(replica)))
            .collect();
        let journal_ops: Vec<u64> = groups.iter().map(|group| group.1).collect();
        let heads: Vec<u64> = inspected[0].heads.iter().map(|head| head.0).collect();
        assert_eq!(heads, journal_ops, "journal heads");
        node::assert_replicas_agree(&inspected, &journal_ops);
        assert_eq!(
            &inspected[0].balances, expected,
            "every acknowledged transfer applied once, both legs, nothing else"
        );
        assert_eq!(expected.values().sum::<i128>(), 0, "money is conserved");
    }
}

/// Transfers between shards (docs/bft.md §12, §14): four nodes, two shards each (two
/// groups), replica 0 equivocating (it leads view 0 of group 0). Three clients at once send
/// requests mixing transfers within each shard and across them, in both directions; every
/// transfer is accepted. The credit legs are signed by every replica of the debit group,
/// certified, handed to the credit group on each node, proposed there as proven batches,
/// applied and acknowledged back the same way. Once settled (no outputs kept, no proof
/// queued anywhere), every correct replica's journals replay to the same state with every
/// transfer's both legs applied once, no leg in flight and money conserved; legs were
/// certified and delivered, and the collectors emptied.
#[test]
fn bft_transfers_between_shards_travel_certified_and_settle() {
    const SHARDS: u32 = 2;
    const PER_SHARD: usize = 4;
    const WRITERS: u64 = 3;
    let mut harness = Harness::start_sharded("xshard", Some("equivocate"), SHARDS as usize);
    let mut client = harness.client(7);
    let (members, mut expected) = sharded_accounts(&mut client, SHARDS, PER_SHARD);
    let transfers: Vec<Transfer> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let mut client = harness.client(1 + u128::from(writer));
                let members = &members;
                scope.spawn(move || {
                    let start = (u128::from(writer) + 1) << 100;
                    let seed = 0x05EE_DBF7 + writer;
                    commit_mixed(
                        &mut client,
                        (members, SHARDS),
                        (seed, start),
                        REQUESTS,
                        None,
                    )
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|writer| writer.join().expect("writer"))
            .collect()
    });
    let crossing = transfers
        .iter()
        .filter(|t| shard_of(t.debit_account_id, SHARDS) != shard_of(t.credit_account_id, SHARDS))
        .count();
    assert!(crossing > 0, "some transfers cross shards");
    for t in &transfers {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let groups = harness.wait_transfers_settled(SHARDS as usize);
    for replica in harness.correct() {
        for shard in 0..SHARDS as usize {
            let metric = |name: &str| harness.shard_metric(replica, name, shard);
            assert!(
                metric("percore_bft_xshard_certified_total") > 0,
                "replica {replica} shard {shard}: outputs certified"
            );
            assert!(
                metric("percore_bft_xshard_proofs_committed_total") > 0,
                "replica {replica} shard {shard}: proofs committed"
            );
            assert!(
                metric("percore_bft_xshard_outputs_released_total") > 0,
                "replica {replica} shard {shard}: outputs released"
            );
            assert_eq!(
                metric("percore_bft_xshard_proofs_refused_total"),
                0,
                "replica {replica} shard {shard}"
            );
            assert_eq!(
                metric("percore_bft_xshard_collector_full_total"),
                0,
                "replica {replica} shard {shard}"
            );
        }
        // Group 0 left the equivocating leader of its view 0.
        assert!(harness.shard_metric(replica, "percore_bft_view", 0) >= 1);
    }
    harness.stop_and_check_settled(&groups, &expected);
    eprintln!(
        "transfers between shards: groups (bft op, journal op) {groups:?}, {} transfers, \
         {crossing} across shards, {} replies ignored",
        transfers.len(),
        client.mismatched_replies()
    );
}

/// Legs in flight survive a restart (docs/bft.md §12, step 9): four correct nodes × 2
/// shards, no snapshots (`--checkpoint-interval-ops 0`: a replica restored from a snapshot
/// cannot sign the outputs of ops below it, §13 (a)). Three clients send requests with
/// transfers crossing shards; the moment the last is accepted, all four nodes are
/// SIGKILLed, so legs whose acknowledgement had not committed yet are in flight in their
/// journals (`percore inspect --replay` of node 1 shows `in_flight` above 0, or the check
/// below is vacuous and says so). No replica keeps its outputs in memory; a certificate
/// needs three signatures, so those legs can only be certified again if the restarted
/// replicas sign the unsettled legs of their replayed ops again. They do, the legs are
/// certified, delivered, applied and acknowledged; 30 more requests follow. Once settled,
/// all four replicas replay to the same state with every transfer applied once, no leg in
/// flight and money conserved.
#[test]
fn bft_legs_in_flight_are_certified_again_after_a_restart() {
    const SHARDS: u32 = 2;
    const PER_SHARD: usize = 4;
    const WRITERS: u64 = 3;
    let mut harness = Harness::start_with(
        "xshard-restart",
        None,
        SHARDS as usize,
        &[("--checkpoint-interval-ops", "0")],
    );
    let mut client = harness.client(7);
    let (members, mut expected) = sharded_accounts(&mut client, SHARDS, PER_SHARD);
    let transfers: Vec<Transfer> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let mut client = harness.client(1 + u128::from(writer));
                let members = &members;
                scope.spawn(move || {
                    let start = (u128::from(writer) + 1) << 100;
                    let seed = 0x0BAD_CAFE + writer;
                    commit_mixed(&mut client, (members, SHARDS), (seed, start), 10, None)
                })
            })
            .collect();
        writers
            .into_iter()
            .flat_map(|writer| writer.join().expect("writer"))
            .collect()
    });
    const RESTARTED: [usize; 4] = [0, 1, 2, 3];
    for replica in RESTARTED {
        harness.cluster.kill(replica);
    }
    for t in &transfers {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let before = inspect(&harness.cluster.data_dir(1));
    let in_flight_before = before
        .state
        .iter()
        .find_map(|line| line.strip_prefix("in_flight "))
        .map(|value| value.parse::<u128>().expect("in_flight"))
        .expect("an in_flight line");
    for replica in RESTARTED {
        harness
            .cluster
            .restart(replica)
            .expect("the replica restarts");
    }
    // More load after the restart (a replica behind catches up as the groups move on).
    let after = commit_mixed(
        &mut client,
        (&members, SHARDS),
        (0x0AF7_E125, 7 << 100),
        REQUESTS,
        None,
    );
    for t in &after {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let groups = harness.wait_transfers_settled(SHARDS as usize);
    let resigned: u64 = RESTARTED
        .into_iter()
        .flat_map(|replica| {
            let harness = &harness;
            (0..SHARDS as usize).map(move |shard| {
                harness.shard_metric(replica, "percore_bft_xshard_outputs_resigned_total", shard)
            })
        })
        .sum();
    if in_flight_before > 0 {
        assert!(resigned > 0, "legs in flight at the kill were signed again");
    } else {
        eprintln!("no leg was in flight at the kill: the restart path was not exercised");
    }
    for replica in RESTARTED {
        let log = std::fs::read_to_string(harness.cluster.log_path(replica)).unwrap_or_default();
        assert!(
            log.contains("BFT replica restarts"),
            "replica {replica} was restored"
        );
    }
    harness.stop_and_check_settled(&groups, &expected);
    eprintln!(
        "restart with legs in flight: {in_flight_before} in flight at replica 1 before the \
         restart, {resigned} outputs signed again, groups {groups:?}, {} transfers",
        transfers.len() + after.len()
    );
}

/// Legs in flight below a snapshot are certified again from state (docs/bft.md §12, step
/// 10; design point (a) of §13): four correct nodes × 2 shards with snapshots every 4 BFT
/// ops (`--checkpoint-interval-ops 4`, `--bft-retain-ops 8`), so every restart opens from a
/// snapshot and replays only the ops after it. Three clients load the cluster with
/// transfers crossing shards in both directions; mid-load every node is SIGKILLed at once
/// and all four restart. A leg that an op below a replica's snapshot emitted, still
/// unacknowledged at the kill, can no longer be signed as that op's outputs (the op is not
/// replayed); only the in-flight statements over the legs in flight at the snapshot op
/// (signed from the restored state, and at every snapshot op the groups pass after the
/// restart, 10 more requests) certify it again. Once nothing is kept or queued, every
/// replica replays to the same state with no leg in flight and money conserved. (Requests
/// cut by the kill may or may not have committed, so balances are checked by agreement and
/// conservation, not against a list.)
#[test]
fn bft_legs_in_flight_below_a_snapshot_are_certified_again_from_state() {
    const SHARDS: u32 = 2;
    const PER_SHARD: usize = 4;
    const WRITERS: u64 = 3;
    const KILL_AFTER_REQUESTS: usize = 24;
    const KILLED: [usize; REPLICAS] = [0, 1, 2, 3];
    let mut harness = Harness::start_with(
        "xshard-snapshot",
        None,
        SHARDS as usize,
        &[
            ("--checkpoint-interval-ops", "4"),
            ("--bft-retain-ops", "8"),
        ],
    );
    let mut client = harness.client(7);
    let (members, _) = sharded_accounts(&mut client, SHARDS, PER_SHARD);
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let killed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let mut client =
                harness.client_with_timeout(1 + u128::from(writer), Duration::from_secs(3));
            let (members, accepted, killed) = (&members, &accepted, &killed);
            scope.spawn(move || {
                let mut rng = Rng(0x5A_F00D + writer);
                let mut next_id = (u128::from(writer) + 1) << 100;
                let by_debit = |t: &Transfer| shard_of(t.debit_account_id, SHARDS) as usize;
                while !killed.load(std::sync::atomic::Ordering::Relaxed) {
                    let transfers = mixed_transfers(
                        &mut rng,
                        members,
                        &mut next_id,
                        TRANSFERS_PER_REQUEST,
                        None,
                    );
                    // A request that times out (under load, or cut by the kill) may or may
                    // not have committed; the writer goes on until the kill.
                    let submitted: Result<Vec<RecordResult>, _> =
                        client.submit(Operation::CreateTransfers.into(), &transfers, by_debit);
                    if submitted.is_ok() {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
        wait_until("the load runs", || {
            (accepted.load(std::sync::atomic::Ordering::Relaxed) >= KILL_AFTER_REQUESTS)
                .then_some(())
        });
        for replica in KILLED {
            harness.cluster.kill(replica);
        }
        killed.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let at_kill: Vec<u128> = KILLED
        .into_iter()
        .map(|replica| in_flight(&inspect(&harness.cluster.data_dir(replica))))
        .collect();
    for replica in KILLED {
        harness
            .cluster
            .restart(replica)
            .expect("the replica restarts");
    }
    // More load after the restart: the groups pass snapshot ops again, where every replica
    // signs what is in flight from its state, whichever snapshot it restored.
    let mut after_client = harness.client(8);
    commit_mixed(
        &mut after_client,
        (&members, SHARDS),
        (0x0AF7_E125, 9 << 100),
        10,
        None,
    );
    let groups = harness.wait_transfers_settled(SHARDS as usize);
    let metric_sum = |name: &str| -> u64 {
        (0..REPLICAS)
            .flat_map(|replica| {
                let harness = &harness;
                (0..SHARDS as usize).map(move |shard| harness.shard_metric(replica, name, shard))
            })
            .sum()
    };
    let signed = metric_sum("percore_bft_xshard_in_flight_signed_total");
    let certified = metric_sum("percore_bft_xshard_in_flight_certified_total");
    let delivered = metric_sum("percore_bft_xshard_in_flight_deliveries_total");
    let restored = KILLED
        .into_iter()
        .filter(|replica| {
            std::fs::read_to_string(harness.cluster.log_path(*replica))
                .unwrap_or_default()
                .contains("BFT restart: signing the legs in flight at the restored snapshot")
        })
        .count();
    assert!(
        signed > 0 && certified > 0,
        "in-flight statements signed and certified"
    );
    harness.cluster.stop_all();
    let inspected: Vec<Inspected> = (0..REPLICAS)
        .map(|replica| inspect(&harness.cluster.data_dir(replica)))
        .collect();
    let journal_ops: Vec<u64> = groups.iter().map(|group| group.1).collect();
    node::assert_replicas_agree(&inspected, &journal_ops);
    eprintln!(
        "legs below a snapshot: in flight at the kill per killed replica {at_kill:?}; after \
         the restart {restored} replicas signed the legs in flight at their restored snapshot; \
         in-flight statements signed {signed}, certified {certified}, delivered {delivered}; \
         groups {groups:?}"
    );
}

/// The `in_flight` sum `percore inspect --replay` printed.
fn in_flight(inspected: &Inspected) -> u128 {
    inspected
        .state
        .iter()
        .find_map(|line| line.strip_prefix("in_flight "))
        .map(|value| value.parse::<u128>().expect("in_flight"))
        .expect("an in_flight line")
}

/// A Byzantine credit-group leader cannot mint money with a made-up leg (docs/bft.md §14):
/// replica 0 leads view 0 of group 0 and runs `forge-leg`: each proven batch it proposes
/// carries a leg whose records were altered after certification, or (holding no proof,
/// as at start) a leg made up from nothing, re-certified with its own key alone. Every
/// transfer here is debited on shard 1 and credited on shard 0, so every leg must pass
/// group 0. The backups refuse every such proposal before voting (counted), the group
/// replaces its leader, the next leader proposes the genuine proofs, and once settled the
/// balances are exactly the transfers': no made-up leg committed.
#[test]
fn bft_made_up_leg_never_commits_and_the_credit_group_replaces_its_leader() {
    const SHARDS: u32 = 2;
    const PER_SHARD: usize = 4;
    let mut harness = Harness::start_sharded("forge-leg", Some("forge-leg"), SHARDS as usize);
    let mut client = harness.client(7);
    let (members, mut expected) = sharded_accounts(&mut client, SHARDS, PER_SHARD);
    let transfers = commit_mixed(
        &mut client,
        (&members, SHARDS),
        (0x0F09_E1E6, 1 << 100),
        REQUESTS / 3,
        Some((1, 0)),
    );
    for t in &transfers {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let groups = harness.wait_transfers_settled(SHARDS as usize);
    // A forged proposal is refused by every correct replica it reaches; one may miss it (a
    // proposal made once per view, before every connection is up, or after that replica
    // changed views), so the count is over the group.
    let refused: u64 = harness
        .correct()
        .map(|replica| harness.shard_metric(replica, "percore_bft_proposals_refused_total", 0))
        .sum();
    assert!(refused > 0, "the made-up leg got no vote");
    for replica in harness.correct() {
        let metric = |name: &str| harness.shard_metric(replica, name, 0);
        assert!(
            metric("percore_bft_view") >= 1,
            "replica {replica}: group 0 replaced its leader"
        );
        assert!(metric("percore_bft_xshard_proofs_committed_total") > 0);
    }
    let logged = harness.correct().any(|replica| {
        std::fs::read_to_string(harness.cluster.log_path(replica))
            .is_ok_and(|log| log.contains("proven batch refused: bad outputs signature"))
    });
    assert!(logged, "the refusal names the broken rule");
    harness.stop_and_check_settled(&groups, &expected);
    let crossing = transfers
        .iter()
        .filter(|t| shard_of(t.credit_account_id, SHARDS) == 0)
        .count();
    eprintln!(
        "made-up leg: groups (bft op, journal op) {groups:?}, {} transfers, {crossing} credited \
         on shard 0",
        transfers.len()
    );
}

#[test]
fn bft_node_refuses_configurations_that_cannot_tolerate_f() {
    let root = std::env::temp_dir().join(format!("percore-bft-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let keys = root.join("keys");
    keygen(&keys, REPLICAS);
    let cluster_key = root.join("cluster.key");
    percore_shards::replication::cluster_key_write(&cluster_key).unwrap();
    let node = |peers: &str, extra: &[&str]| {
        let output = Command::new(PERCORE)
            .args(["node", "--replica", "0", "--peers", peers])
            .args(["--fault-model", "bft", "--bft-keys-dir"])
            .arg(&keys)
            .arg("--cluster-key-file")
            .arg(&cluster_key)
            .arg("--data-dir")
            .arg(root.join("data"))
            .args(extra)
            .output()
            .expect("percore node runs");
        assert!(!output.status.success(), "refused");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let base = cluster::free_port_base(REPLICAS, 1).expect("free ports") + 50;
    let peers = |count: u16| {
        (0..count)
            .map(|r| format!("127.0.0.1:{}", base + 100 * r))
            .collect::<Vec<_>>()
            .join(",")
    };
    // Three replicas listed with keys for f = 1: the cluster file itself is refused.
    let text = std::fs::read_to_string(keys.join("cluster.keys")).unwrap();
    let three: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("replica 3"))
        .collect();
    std::fs::write(keys.join("cluster.keys"), three.join("\n") + "\n").unwrap();
    let error = node(&peers(3), &["--cores", "0"]);
    assert!(error.contains("3f + 1"), "{error}");
    // Four keys, three peers.
    std::fs::write(keys.join("cluster.keys"), &text).unwrap();
    let error = node(&peers(3), &["--cores", "0"]);
    assert!(error.contains("lists 4 replicas"), "{error}");
    // No client keys (a file written before client authentication): nothing could submit.
    let no_clients: Vec<&str> = text.lines().filter(|l| !l.starts_with("client ")).collect();
    std::fs::write(keys.join("cluster.keys"), no_clients.join("\n") + "\n").unwrap();
    let error = node(&peers(4), &["--cores", "0"]);
    assert!(error.contains("lists no clients"), "{error}");
    // Fewer sessions than clients: one would be evicted, and its old requests could apply
    // again (docs/bft.md §13).
    std::fs::write(keys.join("cluster.keys"), &text).unwrap();
    let sessions = (CLIENTS - 1).to_string();
    let error = node(
        &peers(4),
        &["--cores", "0", "--session-clients-max", &sessions],
    );
    assert!(
        error.contains(&format!("is below the {CLIENTS} clients")),
        "{error}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// The load of `percore bench --fault-model bft` with several shards (`bft_bench`): two
/// client threads per shard, half of the transfers credited on the other shard, against a
/// correct 4-node × 2-shard cluster for a short window. Every request is acknowledged
/// (none failed), and once the legs settle every replica's journals replay to the same
/// state with no leg in flight and money conserved: the benchmark measures a load that
/// really commits, across shards.
#[test]
fn bft_bench_load_across_shards_commits_and_settles() {
    use percore_shards::bft_bench::{self, LoadShape, Mode};
    const SHARDS: usize = 2;
    let mut harness = Harness::start_sharded("bench", None, SHARDS);
    let keys: Vec<_> = (1..=CLIENTS)
        .map(|client| {
            let path = harness
                .root
                .join("bft-keys")
                .join(format!("client-{client}.key"));
            let text = std::fs::read_to_string(&path).expect("client key file");
            percore_engine::bft::keys::parse_client_key(&text)
                .expect("client key")
                .key
        })
        .collect();
    let addresses: Vec<Vec<_>> = (0..REPLICAS)
        .map(|replica| {
            (0..SHARDS)
                .map(|shard| harness.cluster.client_address(replica, shard))
                .collect()
        })
        .collect();
    let shape = LoadShape {
        shards: SHARDS,
        threads_per_shard: 2,
        records_per_request: 20,
        cross_shard_percent: 50,
    };
    let report = bft_bench::closed_loop(
        Mode::Bft { faults_max: FAULTS },
        (&addresses, &keys),
        shape,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
    .expect("the load runs");
    assert!(report.transfers > 0, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!((report.shards, report.cross_shard_percent), (2, 50));
    let groups = harness.wait_transfers_settled(SHARDS);
    harness.cluster.stop_all();
    let inspected: Vec<Inspected> = harness
        .correct()
        .map(|replica| inspect(&harness.cluster.data_dir(replica)))
        .collect();
    let journal_ops: Vec<u64> = groups.iter().map(|group| group.1).collect();
    node::assert_replicas_agree(&inspected, &journal_ops);
    eprintln!(
        "bench load: {} transfers in {} requests, p50 {} us, groups {groups:?}",
        report.transfers, report.requests, report.latency_p50_us
    );
}

/// Every replica of every group SIGKILLed under load and restarted (docs/bft.md §12,
/// **Restart**, *a whole group restarted*): three writers keep sending mixed transfers
/// (within and, with two shards, across shards); once some have committed, all four nodes
/// are killed at once and restarted, each from its own disk at its own commit point. Every
/// request, the ones in flight across the kill included, must then be accepted within the
/// client's bound (`Ok`, or `Exists` for a retry of one that committed before the kill),
/// and so must a batch of requests sent after the restart; once settled, every replica's
/// journals replay to the same state, balances exactly the transfers', no leg in flight,
/// money conserved. Before the fix, a group restarted between views waited for a NewView
/// none held, and replicas behind waited for proofs of ops their peers had restored and
/// held no certificate for.
fn every_replica_restarts_under_load(name: &str, shards: u32, behaviour: Option<&str>) {
    const PER_SHARD: usize = 4;
    const WRITERS: u64 = 3;
    const REQUESTS_PER_WRITER: usize = 12;
    const REQUESTS_AFTER: usize = 10;
    /// Requests accepted before the kill (so the group is under load when it comes).
    const ACCEPTED_BEFORE_KILL: usize = 6;
    // Without snapshots for two shards: a replica restored from a snapshot cannot sign its
    // legs in flight again (docs/bft.md §13, design point (a)).
    let overrides: &[(&str, &str)] = if shards > 1 {
        &[("--checkpoint-interval-ops", "0")]
    } else {
        &[]
    };
    let mut harness = Harness::start_with(name, behaviour, shards as usize, overrides);
    let mut client = harness.client(7);
    let (members, mut expected) = sharded_accounts(&mut client, shards, PER_SHARD);
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    let restarted_at: Mutex<Option<Instant>> = Mutex::new(None);
    let by_debit = |t: &Transfer| shard_of(t.debit_account_id, shards) as usize;
    let (transfers, first_after_restart) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let mut client = harness.client(1 + u128::from(writer));
                let (members, accepted, restarted_at) = (&members, &accepted, &restarted_at);
                scope.spawn(move || {
                    let mut rng = Rng(0x5EED_0A11 + writer);
                    let mut next_id = (u128::from(writer) + 1) << 100;
                    let mut committed = Vec::new();
                    let mut first_after_restart: Option<Duration> = None;
                    for _ in 0..REQUESTS_PER_WRITER {
                        let batch = mixed_transfers(
                            &mut rng,
                            members,
                            &mut next_id,
                            TRANSFERS_PER_REQUEST,
                            None,
                        );
                        let results: Vec<RecordResult> = client
                            .submit(Operation::CreateTransfers.into(), &batch, by_debit)
                            .expect("the restarted group accepts every request in time");
                        for (t, r) in batch.iter().zip(&results) {
                            let ok = r.code == CreateTransferResult::Ok as u32
                                || r.code == CreateTransferResult::Exists as u32;
                            assert!(ok, "transfer {t:?}: {r:?}");
                        }
                        committed.extend(batch);
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(at) = *restarted_at.lock().unwrap() {
                            first_after_restart.get_or_insert(at.elapsed());
                        }
                    }
                    (committed, first_after_restart)
                })
            })
            .collect();
        wait_until("requests commit before the kill", || {
            (accepted.load(std::sync::atomic::Ordering::Relaxed) >= ACCEPTED_BEFORE_KILL)
                .then_some(())
        });
        for replica in 0..REPLICAS {
            harness.cluster.kill(replica);
        }
        for replica in 0..REPLICAS {
            harness
                .cluster
                .restart(replica)
                .expect("the replica restarts");
        }
        *restarted_at.lock().unwrap() = Some(Instant::now());
        let mut transfers = Vec::new();
        let mut first = None;
        for writer in writers {
            let (committed, first_after) = writer.join().expect("writer");
            transfers.extend(committed);
            first = match (first, first_after) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
        }
        (transfers, first)
    });
    let after_started = Instant::now();
    let after = commit_mixed(
        &mut client,
        (&members, shards),
        (0x0AF7_E125, 7 << 100),
        REQUESTS_AFTER,
        None,
    );
    let after_took = after_started.elapsed();
    for t in transfers.iter().chain(&after) {
        *expected.get_mut(&t.debit_account_id).unwrap() -= t.amount as i128;
        *expected.get_mut(&t.credit_account_id).unwrap() += t.amount as i128;
    }
    let groups = harness.wait_transfers_settled(shards as usize);
    for replica in 0..REPLICAS {
        let log = std::fs::read_to_string(harness.cluster.log_path(replica)).unwrap_or_default();
        assert!(
            log.contains("BFT replica restarts"),
            "replica {replica} was restored"
        );
    }
    let metric_sum = |name: &str| -> u64 {
        harness
            .correct()
            .flat_map(|replica| {
                let harness = &harness;
                (0..shards as usize).map(move |shard| harness.shard_metric(replica, name, shard))
            })
            .sum()
    };
    let catchup_applied = metric_sum("percore_bft_catchup_ops_applied_total");
    let view_changes = metric_sum("percore_bft_view_changes_total");
    harness.stop_and_check_settled(&groups, &expected);
    eprintln!(
        "whole group restarted under load ({shards} shard(s)): first request accepted \
         {first_after_restart:?} after the restarts, {REQUESTS_AFTER} more took {after_took:?}; \
         {} transfers; groups {groups:?}; catch-up ops applied {catchup_applied}, view \
         changes {view_changes}",
        transfers.len() + after.len()
    );
}

#[test]
fn bft_every_replica_killed_under_load_restarts_and_commits() {
    every_replica_restarts_under_load("restart-all", 1, None);
}

/// Replica 0, the leader of view 0, is silent: the group is in a later view when every
/// node is killed, so the three correct replicas restart between views (each awaiting a
/// NewView none holds) with no fourth replica to help. Every correct replica is needed.
#[test]
fn bft_every_replica_killed_between_views_restarts_and_commits() {
    every_replica_restarts_under_load("restart-all-silent", 1, Some("silent"));
}

/// Two groups, transfers between them in flight across the kill. A new leader proposes
/// only once it applied its NewView's plan (before, 1 of 6 runs ended in every replica's
/// ledger refusing a batch stamped below the plan's ops). On a loaded host (debug build,
/// every shard on one core, journal writes of 100 to 350 ms) commits come further apart
/// than the first progress timeout: before the timeouts stayed doubled across NewViews
/// (docs/bft.md §7), the groups could change views without end (up to 442 view changes
/// over both; 1 of 36 runs never settled its legs).
#[test]
fn bft_every_replica_of_two_groups_killed_under_load_restarts_and_settles() {
    every_replica_restarts_under_load("restart-all-xshard", 2, None);
}

/// A cluster key rotation (`docs/operations.md` section 7) on a BFT group: every replica is
/// restarted in turn, three rounds (the old key with the new one accepted, the new key with
/// the old one accepted, the new key alone). After each restart every replica's connection
/// to every peer must come up again (each pair holds each other's key at every step) and
/// the group commits; at the end the journals agree and money is conserved.
#[test]
fn bft_cluster_key_rotates_by_rolling_restarts() {
    let mut harness = Harness::start("key-rotation", None);
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    let mut load = Load::new();
    let mut acknowledged = load.commit(&mut client, &mut expected, 2);
    let old = harness.cluster.key_file().to_path_buf();
    let new = harness.root.join("cluster-next.key");
    percore_shards::replication::cluster_key_write(&new).expect("new key written");
    let rounds = [(&old, Some(&new)), (&new, Some(&old)), (&new, None)];
    for (round, (key, accept)) in rounds.into_iter().enumerate() {
        for replica in 0..REPLICAS {
            harness.cluster.kill(replica);
            harness
                .cluster
                .set_key_files(replica, key.clone(), accept.cloned());
            harness
                .cluster
                .restart(replica)
                .unwrap_or_else(|error| panic!("round {round}: replica {replica}: {error}"));
            harness.wait_mesh_connected(1);
            acknowledged += load.commit(&mut client, &mut expected, 1);
        }
    }
    let (bft_op, journal_op) = harness.wait_converged();
    harness.cluster.stop_all();
    assert_eq!(compare_journals(&harness, journal_op, &expected), REPLICAS);
    eprintln!(
        "key rotated through {} restarts: bft op {bft_op}, journal op {journal_op}, \
         {acknowledged} transfers",
        3 * REPLICAS
    );
}

/// Every replica holds the cluster key, so the handshake's MACs prove membership, not
/// which replica dials: a Byzantine replica (here: the test, holding replica 3's signing
/// key) connecting to replica 0 in replica 1's name is refused, as its signature of the
/// handshake is not replica 1's (`docs/bft.md` 1, `protocol.md` 3); connecting in its own
/// name it is accepted (and replaces replica 3's own connection, which redials).
#[test]
fn bft_a_replica_cannot_connect_in_anothers_name() {
    let mut harness = Harness::start("impersonation", None);
    let keys_dir = harness.root.join("bft-keys");
    let read = |name: &str| std::fs::read_to_string(keys_dir.join(name)).expect(name);
    let own = percore_engine::bft::keys::parse_secret_key(&read("replica-3.key"))
        .expect("replica 3's key");
    let public = percore_engine::bft::keys::parse_cluster(&read("cluster.keys"))
        .expect("cluster file")
        .keys;
    let cluster_key =
        percore_shards::replication::cluster_key_from_file(harness.cluster.key_file())
            .expect("the cluster key");
    let peers: Vec<std::net::SocketAddr> = (0..REPLICAS)
        .map(|replica| harness.cluster.peer_address(replica, 0))
        .collect();
    let digest = percore_shards::config::PeersDigest::of(&peers).0
        ^ percore_shards::bft::BFT_PEERS_DIGEST_SALT;
    let settings_digest = cluster::plain_metric(
        &harness.cluster.scrape(0).expect("metrics scrape"),
        "percore_config_settings_digest",
    )
    .expect("a settings digest");
    let refused = |harness: &Harness| harness.metric(0, "percore_peer_auth_failures_total");
    let replaced = |harness: &Harness| harness.metric(0, "percore_peer_connections_replaced_total");
    let dial_as = |claimed: u8| {
        let (key, public) = (own.key.clone(), public.clone());
        let log_0 = harness.cluster.log_path(0);
        let keys = percore_engine::message::PeerKeys::new(cluster_key.clone());
        let address = peers[0];
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 * 1024)
            .spawn(move || async move {
                let identity = percore_net::peer::PeerIdentity {
                    cluster_id: 1,
                    group: 0,
                    replica: claimed,
                    replica_count: REPLICAS as u8,
                    peers_digest: digest,
                    settings_digest,
                };
                let signing = percore_net::peer::ReplicaSigning {
                    key: &key,
                    replicas: &public,
                };
                let sender = percore_net::peer::dial(
                    address,
                    &identity,
                    0,
                    &keys,
                    percore_net::peer::os_nonce().expect("a nonce"),
                    Duration::from_secs(5),
                    64 * 1024,
                    Some(signing),
                )
                .await
                .unwrap_or_else(|error| {
                    let log = std::fs::read_to_string(log_0).unwrap_or_default();
                    let refusals: Vec<&str> = log
                        .lines()
                        .filter(|line| line.contains("refused"))
                        .collect();
                    panic!("the MAC handshake did not complete: {error}: {refusals:#?}")
                });
                // Held open a moment: the listener checks the signature after the MACs.
                glommio::timer::sleep(Duration::from_millis(300)).await;
                drop(sender);
            })
            .expect("executor starts")
            .join()
            .expect("test dialer");
    };
    let (before, replaced_first) = (refused(&harness), replaced(&harness));
    dial_as(1);
    wait_until(
        "replica 0 refuses a dialer signing in another's name",
        || (refused(&harness) > before).then_some(()),
    );
    assert_eq!(
        replaced(&harness),
        replaced_first,
        "replica 1's own connection was not displaced"
    );
    let replaced_before = replaced(&harness);
    let refused_before = refused(&harness);
    dial_as(3);
    wait_until("replica 0 accepts replica 3's key as replica 3", || {
        (replaced(&harness) > replaced_before).then_some(())
    });
    assert_eq!(
        refused(&harness),
        refused_before,
        "the truthful dialer is accepted"
    );
    // The group goes on: replica 3 redials, requests commit.
    let mut client = harness.client(7);
    let mut expected = create_funded_accounts(&mut client);
    transfers_commit(&mut client, &mut expected);
    harness.cluster.stop_all();
}
