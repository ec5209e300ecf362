//! The BFT simulator's world: replicas, network, clients, Byzantine behaviours, checkers.
//!
//! Events are processed in `(time_us, sequence)` order; handling one takes no simulated
//! time. A correct replica executes committed batches in op order (requests are
//! deduplicated by id) and answers the request's client with the op that executed it; a
//! Byzantine replica runs the same core but its outgoing messages go through
//! `World::byzantine_outgoing`, and it answers clients with made-up results.
//!
//! Clients sign their requests (ed25519 keys derived from the seed, client `c` has id
//! `c + 1`) and batches are the engine's signed batch format (`bft::request`, records of
//! [`RECORD_BYTES`]); every replica checks proposals with a [`RequestVerifier`] before it
//! votes (a restarted replica too), and the `auth` checker fails a run in which a correct
//! replica executes a batch holding a request no client signed.
//!
//! Durability follows the runtime driver (`shards/src/bft.rs`): committed ops and stable
//! checkpoint certificates reach the disk in group commits that take simulated time (and
//! are reported to the core with `on_durable`), a vote guard asked for by
//! `Action::PersistGuard` is written asynchronously while every later send waits for it,
//! and the prepared certificates of `Action::PersistPrepared` are appended by writes of
//! their own, which only the later sends that carry the replica's Commit vote wait for (the
//! driver's queues, [`HeldSends`], are the ones used here). A replica that crashes loses
//! everything else (the core, requests, sends held back); a write in flight at the crash
//! either landed or is lost. It restarts with
//! `BftReplica::restore` from what is durable, and gets its proposal check again.

use crate::sched::Scheduled;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use percore_engine::bft::request::{REQUEST_SIGNATURE_BYTES, batch_decode, batch_encode};
use percore_engine::bft::{
    Action, BftConfig, BftError, BftReplica, CheckpointCert, ClientKeys, CommitCert, Committee,
    Digest, Message, PreparedEntry, RequestStatement, RequestVerifier, Restored, Signature,
    SigningKey, Vote, VoteGuard, VoteKind, batch_digest, chain_digest,
};
use percore_engine::session::{REQUEST_DESCRIPTOR_BYTES, RequestDescriptor};
use percore_shards::bft_held::{HeldSends, Offered};

use super::{BEHAVIOURS, Behaviour, Failure, Options, Summary};
use crate::sim::rng::{SimRng, splitmix64};

/// After the network heals, every client request must be accepted and executed by every
/// correct replica within this much simulated time (µs).
pub const LIVENESS_BOUND_US: u64 = 30_000_000;
/// The faulty phase ends after this much simulated time even if steps remain (µs).
pub const FAULTY_PHASE_US_MAX: u64 = 10_000_000;
/// Replica timer period (µs).
const TICK_INTERVAL_US: u64 = 5_000;
/// Clients per run.
const CLIENTS: usize = 2;
/// Requests per client in the faulty phase, and after the heal.
const REQUESTS_FAULTY: u64 = 16;
const REQUESTS_AFTER_HEAL: u64 = 2;
/// A client resends its request to every replica after this long (µs).
const CLIENT_RETRY_US: u64 = 400_000;
/// Requests per proposed batch.
const REQUESTS_PER_BATCH_MAX: usize = 4;
/// Requests a replica keeps waiting to be proposed.
const PENDING_MAX: usize = 64;
/// Trace lines kept (all with `verbose`).
const TRACE_KEPT: usize = 80;
/// Messages a replaying replica remembers.
const REPLAY_KEPT: usize = 64;
/// Bytes of one record of a request (a request holds 1 to 3).
pub const RECORD_BYTES: usize = 16;
/// The operation code of every request.
const OPERATION: u16 = 1;
/// Set in the request number of a request a Byzantine leader made up.
const FORGED_REQUEST_BIT: u64 = 1 << 31;
/// A journal group commit or a vote guard write takes this long (µs).
const DISK_WRITE_US_MIN: u64 = 50;
const DISK_WRITE_US_MAX: u64 = 3_000;
/// With `--slow-links`, every message takes this long (µs): two hops at least the core's
/// default progress timeout.
pub const SLOW_LINK_US_MIN: u64 = 100_000;
pub const SLOW_LINK_US_MAX: u64 = 150_000;
const _: () = assert!(2 * SLOW_LINK_US_MIN >= percore_engine::bft::PROGRESS_TIMEOUT_US_DEFAULT);
/// A `flood-state` replica sends this many `StateRequest`s to each replica it sends a
/// message to, with the message.
pub const FLOOD_STATE_REQUESTS_PER_SEND: usize = 8;
/// A crashed replica stays down this long (µs).
const DOWN_US_MIN: u64 = 1_000;
const DOWN_US_MAX: u64 = 800_000;
/// Between two crashes of the run's crashing replicas (µs).
const CRASH_INTERVAL_US_MIN: u64 = 100_000;
const CRASH_INTERVAL_US_MAX: u64 = 1_500_000;
/// With `--crash-all`, between two crashes of the whole group (µs): long enough for the
/// group to commit again between them.
const CRASH_ALL_INTERVAL_US_MIN: u64 = 1_000_000;
const CRASH_ALL_INTERVAL_US_MAX: u64 = 4_000_000;
/// With `--crash-all`, the other crashing replicas go down this long after the first at
/// most (µs); in half the crashes all at the same instant.
const CRASH_ALL_SPREAD_US: u64 = 20_000;
/// A guard or prepared certificate write of a crashing replica is also hit by a crash with
/// this chance (per million): the crash falls inside the write, which then lands or is lost.
const CRASH_DURING_DISK_WRITE_PER_MILLION: u64 = 200_000;

/// A client request: id `(client + 1) << 32 | request number`.
#[derive(Debug, Clone)]
struct Request {
    id: u64,
    client: usize,
    payload: Vec<u8>,
    /// The client's signature of the request ([`RequestStatement`]).
    signature: [u8; REQUEST_SIGNATURE_BYTES],
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: u8,
        to: u8,
        message: Box<Message>,
    },
    Tick {
        replica: u8,
        incarnation: u64,
    },
    /// The journal group commit in flight at `replica` is durable.
    JournalDurable {
        replica: u8,
        incarnation: u64,
    },
    /// The vote guard write in flight at `replica` is durable.
    GuardDurable {
        replica: u8,
        incarnation: u64,
    },
    /// The prepared certificate write in flight at `replica` is durable.
    PreparedDurable {
        replica: u8,
        incarnation: u64,
    },
    /// `replica` crashes (if up); `next`: schedule the next crash of the run's chain.
    Crash {
        replica: u8,
        next: bool,
    },
    Restart {
        replica: u8,
        incarnation: u64,
    },
    Request {
        to: u8,
        request: Request,
    },
    Reply {
        client: usize,
        replica: u8,
        id: u64,
        result: u64,
    },
    ClientTimer {
        client: usize,
        id: u64,
    },
    NetworkFault,
}

/// What a replica made durable, and its writes in flight: survives a crash (a write in
/// flight then lands or is lost).
#[derive(Debug, Default)]
struct Disk {
    /// Committed ops durable in the journal: a prefix of [`Node::log`].
    log_durable: u64,
    /// The last stable checkpoint certificate journaled (its op is at most `log_durable`).
    low_cert: Option<CheckpointCert>,
    /// A group commit in flight: the ops through this op and the checkpoint certificate
    /// staged with them.
    journal_writing: Option<(u64, Option<CheckpointCert>)>,
    /// The durable vote guard.
    guard: VoteGuard,
    /// The durable prepared certificates above `low_cert`, by op (the highest view's).
    prepared: BTreeMap<u64, PreparedEntry>,
    /// A guard write in flight: the guard and its request number.
    guard_writing: Option<(VoteGuard, u64)>,
    /// A prepared certificate write in flight: the certificates and the number of the last
    /// request it covers.
    prepared_writing: Option<(Vec<PreparedEntry>, u64)>,
}

#[derive(Debug)]
struct Node {
    core: BftReplica,
    /// The core's configuration (a restart rebuilds the core with it).
    config: BftConfig,
    /// May crash and restart (a correct replica, counted in the fault budget).
    crashes: bool,
    /// Down after a crash until its restart.
    up: bool,
    /// Incremented by each crash: events of an earlier life are ignored.
    incarnation: u64,
    disk: Disk,
    /// The latest guard the core asked for.
    guard_requested: VoteGuard,
    /// Prepared certificates the core asked to persist, not yet in a write (lost in a
    /// crash).
    prepared_requested: Vec<PreparedEntry>,
    /// The guard and prepared request numbers and the sends that wait for them (lost in a
    /// crash).
    held: HeldSends,
    /// The highest prepared request of the ops committed so far
    /// (`HeldSends::prepared_for_commit`): the next journal write starts once it is
    /// durable, as the driver's (`commit_journals`).
    commit_prepared: u64,
    /// Op → the highest view of a Commit this replica put on the wire (whatever crashes
    /// since): its ViewChanges must report a prepared certificate at least that high.
    commits_sent: BTreeMap<u64, u64>,
    key: SigningKey,
    behaviour: Option<Behaviour>,
    /// Committed batches, op `i + 1` at index `i`, with their commit certificates (what
    /// this replica serves peers that transfer state).
    log: Vec<(Digest, Vec<u8>, CommitCert)>,
    chain: Digest,
    /// Request id → op that executed it.
    executed: BTreeMap<u64, u64>,
    pending: BTreeMap<u64, Request>,
    /// Request id → view this replica proposed it in (leader).
    proposed: BTreeMap<u64, u64>,
    /// Byzantine replay: messages seen.
    seen: Vec<(u8, Message)>,
    /// Byzantine equivocation: the second digest per (view, op).
    alternates: BTreeMap<(u64, u64), Digest>,
    /// Silent: behaves until this time, then sends nothing (a crash mid-run).
    silent_from_us: u64,
    /// Per peer: ops this core served it (`ServeState`) since it was built, at
    /// `serving_since_us` (the `serve-budget` checker).
    served_ops: Vec<u64>,
    serving_since_us: u64,
}

/// A statement one replica signed, as kept by the vote checker: `(replica, kind, view, op)`
/// (op 0 for view changes: one per view) → `(op, digest)`.
type SignedKey = (u8, u8, u64, u64);

#[derive(Debug)]
struct Client {
    quota: u64,
    issued: u64,
    sequence: u64,
    outstanding: Option<(Request, BTreeMap<u8, u64>)>,
    accepted: Vec<(u64, u64)>,
}

/// One run.
#[derive(Debug)]
pub struct World {
    seed: u64,
    options: Options,
    rng: SimRng,
    time_us: u64,
    step: u64,
    sequence: u64,
    queue: BinaryHeap<Scheduled<Event>>,
    nodes: Vec<Node>,
    committee: Committee,
    faults_max: u8,
    clients: Vec<Client>,
    /// Replicas cut off from the others (none: connected).
    isolated: BTreeSet<u8>,
    drop_per_million: u64,
    duplicate_per_million: u64,
    slow_per_million: u64,
    healed_at_us: Option<u64>,
    /// Equivocating replicas send their second version to these replicas.
    alternate_set: BTreeSet<u8>,
    /// op → (digest, first correct replica that committed it).
    committed: BTreeMap<u64, (Digest, u8)>,
    /// Checkpoint op → chain digest, from the certificates state transfers aimed at: every
    /// correct replica's log must pass through them.
    certified: BTreeMap<u64, Digest>,
    /// (view, op) → digests of proposals correct replicas accepted.
    accepted_proposals: BTreeMap<(u64, u64), BTreeSet<Digest>>,
    /// Every statement a correct replica put on the wire, across its restarts.
    signed: BTreeMap<SignedKey, (u64, Digest)>,
    trace: VecDeque<String>,
    messages_dropped: u64,
    /// Each client's signing key (client `c` has id `c + 1`).
    client_keys: Vec<SigningKey>,
    /// The clients' public keys (a restarted replica's proposal check is built from them).
    client_verifying_keys: ClientKeys,
    /// The `auth` checker's own verifier (a cache hit is a request verified before).
    auth: RequestVerifier,
    restarts: u64,
    guard_writes: u64,
    sends_held: u64,
    sends_past_held_commits: u64,
    prepared_persisted: u64,
    prepared_restored: u64,
    state_serves_refused: u64,
    state_serves_refused_to_correct: u64,
    state_ops_served_to_byzantine: u64,
}

type Outcome<T> = Result<T, Box<Failure>>;

impl World {
    /// A world for `seed`.
    pub fn new(seed: u64, options: Options) -> World {
        let mut rng = SimRng::new(seed);
        let replica_count = options.replicas;
        let faults_max = (replica_count - 1) / 3;
        let mut key_seed = seed ^ 0x6b65_7973;
        let mut derive_key = || {
            let mut bytes = [0u8; 32];
            for chunk in bytes.chunks_exact_mut(8) {
                chunk.copy_from_slice(&splitmix64(&mut key_seed).to_le_bytes());
            }
            SigningKey::from_bytes(&bytes)
        };
        let keys: Vec<SigningKey> = (0..replica_count).map(|_| derive_key()).collect();
        let client_keys: Vec<SigningKey> = (0..CLIENTS).map(|_| derive_key()).collect();
        let clients = ClientKeys::new(client_keys.iter().map(SigningKey::verifying_key).collect());
        let verifier = || RequestVerifier::new(0, clients.clone(), RECORD_BYTES, None);
        let committee = Committee::new(
            0,
            faults_max,
            keys.iter().map(SigningKey::verifying_key).collect(),
        )
        .expect("n = 3f + 1");
        let checkpoint_interval_ops = [4, 8, 16][rng.below(3) as usize];
        // Byzantine replicas: half the runs include the first leader (replica 0).
        let mut byzantine = BTreeSet::new();
        if options.byzantine > 0 && rng.chance(500_000) {
            byzantine.insert(0u8);
        }
        while byzantine.len() < usize::from(options.byzantine) {
            byzantine.insert(rng.below(u64::from(replica_count)) as u8);
        }
        // Correct replicas that crash and restart: with the first leader in half the runs.
        let mut crashing = BTreeSet::new();
        if options.crashes > 0 && !byzantine.contains(&0) && rng.chance(500_000) {
            crashing.insert(0u8);
        }
        while crashing.len() < usize::from(options.crashes) {
            let replica = rng.below(u64::from(replica_count)) as u8;
            if !byzantine.contains(&replica) {
                crashing.insert(replica);
            }
        }
        let nodes = keys
            .into_iter()
            .enumerate()
            .map(|(replica, key)| {
                let replica = replica as u8;
                let mut config = BftConfig::new(0, replica);
                config.checkpoint_interval_ops = checkpoint_interval_ops;
                config.log_window_ops = 2 * checkpoint_interval_ops;
                config.bug = options.bug;
                // As the runtime's driver: checkpoint votes and state served wait for disk.
                config.durability_reported = true;
                if let Some(max) = options.commits_undurable_max {
                    config.commits_undurable_ops_max = max;
                }
                let mut core = BftReplica::new(config, committee.clone(), key.clone(), 0)
                    .expect("valid configuration");
                core.set_proposal_check(Box::new(verifier()));
                let behaviour = byzantine.contains(&replica).then(|| {
                    options
                        .behaviour
                        .unwrap_or(BEHAVIOURS[rng.below(BEHAVIOURS.len() as u64) as usize])
                });
                Node {
                    core,
                    config,
                    crashes: crashing.contains(&replica),
                    up: true,
                    incarnation: 0,
                    disk: Disk::default(),
                    guard_requested: VoteGuard::default(),
                    prepared_requested: Vec::new(),
                    held: HeldSends::new(),
                    commit_prepared: 0,
                    commits_sent: BTreeMap::new(),
                    key,
                    behaviour,
                    log: Vec::new(),
                    chain: [0; 32],
                    executed: BTreeMap::new(),
                    pending: BTreeMap::new(),
                    proposed: BTreeMap::new(),
                    seen: Vec::new(),
                    alternates: BTreeMap::new(),
                    silent_from_us: if rng.chance(300_000) {
                        0
                    } else {
                        rng.range(0, 2_000_000)
                    },
                    served_ops: vec![0; usize::from(replica_count)],
                    serving_since_us: 0,
                }
            })
            .collect();
        let mut alternate_set = BTreeSet::new();
        let alternates = rng.range(1, u64::from(replica_count) / 2);
        while alternate_set.len() < alternates as usize {
            alternate_set.insert(rng.below(u64::from(replica_count)) as u8);
        }
        let (drop_per_million, duplicate_per_million, slow_per_million) = if options.faults {
            (
                rng.range(0, 100_000),
                rng.range(0, 50_000),
                rng.range(0, 100_000),
            )
        } else {
            (0, 0, 0)
        };
        World {
            seed,
            options,
            rng,
            time_us: 0,
            step: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            nodes,
            committee,
            faults_max,
            clients: (0..CLIENTS)
                .map(|_| Client {
                    quota: REQUESTS_FAULTY,
                    issued: 0,
                    sequence: 0,
                    outstanding: None,
                    accepted: Vec::new(),
                })
                .collect(),
            isolated: BTreeSet::new(),
            drop_per_million,
            duplicate_per_million,
            slow_per_million,
            healed_at_us: None,
            alternate_set,
            committed: BTreeMap::new(),
            certified: BTreeMap::new(),
            accepted_proposals: BTreeMap::new(),
            signed: BTreeMap::new(),
            trace: VecDeque::new(),
            messages_dropped: 0,
            auth: verifier(),
            client_keys,
            client_verifying_keys: clients,
            restarts: 0,
            guard_writes: 0,
            sends_held: 0,
            sends_past_held_commits: 0,
            prepared_persisted: 0,
            prepared_restored: 0,
            state_serves_refused: 0,
            state_serves_refused_to_correct: 0,
            state_ops_served_to_byzantine: 0,
        }
    }

    fn schedule(&mut self, delay_us: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Scheduled {
            time_us: self.time_us + delay_us,
            sequence: self.sequence,
            event,
        });
    }

    fn fail(&self, checker: &'static str, message: String) -> Box<Failure> {
        Box::new(Failure {
            seed: self.seed,
            step: self.step,
            time_us: self.time_us,
            checker,
            message,
            trace: self.trace.iter().cloned().collect(),
        })
    }

    fn note(&mut self, line: String) {
        if !self.options.verbose && self.trace.len() >= TRACE_KEPT {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t={} {line}", self.time_us));
    }

    /// Whether `replica`'s log is an honest core's: a correct replica's, or a silent one's
    /// (its core runs unchanged; only what it sends is dropped, as for a crashed replica).
    fn keeps_honest_log(&self, replica: u8) -> bool {
        matches!(
            self.nodes[usize::from(replica)].behaviour,
            None | Some(Behaviour::Silent)
        )
    }

    fn is_correct(&self, replica: u8) -> bool {
        self.nodes[usize::from(replica)].behaviour.is_none()
    }

    /// Runs to the end or to the first failed checker.
    pub fn run(mut self) -> Outcome<Summary> {
        let byzantine: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(replica, node)| {
                node.behaviour
                    .map(|behaviour| format!("{replica}:{}", behaviour.name()))
            })
            .collect();
        let crashing: Vec<String> = (0..self.options.replicas)
            .filter(|replica| self.nodes[usize::from(*replica)].crashes)
            .map(|replica| replica.to_string())
            .collect();
        self.note(format!(
            "start: n = {}, byzantine [{}], crashing [{}], drop {} dup {} slow {} per million, checkpoint every {} ops",
            self.options.replicas,
            byzantine.join(" "),
            crashing.join(" "),
            self.drop_per_million,
            self.duplicate_per_million,
            self.slow_per_million,
            self.nodes[0].core.config().checkpoint_interval_ops,
        ));
        for replica in 0..self.options.replicas {
            let offset = self.rng.range(1, TICK_INTERVAL_US);
            self.schedule(
                offset,
                Event::Tick {
                    replica,
                    incarnation: 0,
                },
            );
        }
        if self.options.crashes > 0 {
            let delay = self.crash_interval_us();
            let replica = self.crash_victim();
            self.schedule(
                delay,
                Event::Crash {
                    replica,
                    next: true,
                },
            );
        }
        for client in 0..CLIENTS {
            self.issue(client);
        }
        if self.options.faults {
            let delay = self.rng.range(50_000, 300_000);
            self.schedule(delay, Event::NetworkFault);
        }
        loop {
            if self.healed_at_us.is_none()
                && (self.step >= self.options.steps || self.time_us >= FAULTY_PHASE_US_MAX)
            {
                self.heal();
            }
            if let Some(healed_at_us) = self.healed_at_us {
                if self.converged() {
                    break;
                }
                if self.time_us > healed_at_us + LIVENESS_BOUND_US {
                    return Err(self.fail("liveness", self.liveness_report()));
                }
            }
            let Some(scheduled) = self.queue.pop() else {
                return Err(self.fail("driver", "no events left".to_string()));
            };
            debug_assert!(scheduled.time_us >= self.time_us);
            self.time_us = scheduled.time_us;
            self.step += 1;
            self.handle(scheduled.event)?;
        }
        self.check_evidence()?;
        self.check_accepted()?;
        Ok(self.summary())
    }

    /// At the end, every result a client accepted is the op at which every correct replica
    /// executed the request. The check at acceptance sees only the replicas that had
    /// executed it by then, which a quick (Byzantine) answer usually precedes.
    fn check_accepted(&self) -> Outcome<()> {
        for (client, state) in self.clients.iter().enumerate() {
            for &(id, result) in &state.accepted {
                for (index, node) in self.nodes.iter().enumerate() {
                    if node.behaviour.is_some() {
                        continue;
                    }
                    match node.executed.get(&id) {
                        Some(&op) if op == result => {}
                        executed => {
                            return Err(self.fail(
                                "client",
                                format!(
                                    "client {client} accepted op {result} for request {id:#x}; \
                                     replica {index} executed it at {executed:?}"
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Outcome<()> {
        match event {
            Event::Deliver { from, to, message } => self.deliver(from, to, *message),
            Event::Tick {
                replica,
                incarnation,
            } => {
                let node = &self.nodes[usize::from(replica)];
                if !node.up || node.incarnation != incarnation {
                    return Ok(());
                }
                let mut actions = Vec::new();
                self.nodes[usize::from(replica)]
                    .core
                    .on_tick(self.time_us, &mut actions);
                self.execute(replica, actions)?;
                self.propose(replica)?;
                self.schedule(
                    TICK_INTERVAL_US,
                    Event::Tick {
                        replica,
                        incarnation,
                    },
                );
                Ok(())
            }
            Event::JournalDurable {
                replica,
                incarnation,
            } => self.journal_durable(replica, incarnation),
            Event::GuardDurable {
                replica,
                incarnation,
            } => self.guard_durable(replica, incarnation),
            Event::PreparedDurable {
                replica,
                incarnation,
            } => self.prepared_durable(replica, incarnation),
            Event::Crash { replica, next } => {
                self.crash(replica, next);
                Ok(())
            }
            Event::Restart {
                replica,
                incarnation,
            } => self.restart(replica, incarnation),
            Event::Request { to, request } => self.on_request(to, request),
            Event::Reply {
                client,
                replica,
                id,
                result,
            } => self.on_reply(client, replica, id, result),
            Event::ClientTimer { client, id } => {
                let resend = match &self.clients[client].outstanding {
                    Some((request, _)) if request.id == id => Some(request.clone()),
                    _ => None,
                };
                if let Some(request) = resend {
                    self.send_request(request);
                }
                Ok(())
            }
            Event::NetworkFault => {
                self.network_fault();
                Ok(())
            }
        }
    }

    fn deliver(&mut self, from: u8, to: u8, message: Message) -> Outcome<()> {
        if !self.nodes[usize::from(to)].up {
            self.messages_dropped += 1;
            return Ok(());
        }
        let node = &mut self.nodes[usize::from(to)];
        if node.behaviour == Some(Behaviour::Replay) {
            if node.seen.len() < REPLAY_KEPT {
                node.seen.push((from, message.clone()));
            } else {
                let index = self.rng.below(REPLAY_KEPT as u64) as usize;
                node.seen[index] = (from, message.clone());
            }
        }
        let name = message.name();
        let mut actions = Vec::new();
        let result = node
            .core
            .on_message(self.time_us, from, message, &mut actions);
        if matches!(result, Err(BftError::ServeBudgetExhausted { .. })) && node.behaviour.is_none()
        {
            self.state_serves_refused += 1;
            if self.is_correct(from) {
                self.state_serves_refused_to_correct += 1;
            }
        }
        if self.options.verbose || result.is_err() {
            let outcome = match result {
                Ok(()) => "ok".to_string(),
                Err(error) => error.to_string(),
            };
            self.note(format!("deliver {from}->{to} {name}: {outcome}"));
        }
        self.execute(to, actions)?;
        self.propose(to)
    }

    /// Carries out a replica's actions.
    fn execute(&mut self, replica: u8, actions: Vec<Action>) -> Outcome<()> {
        for action in actions {
            match action {
                Action::Send { to, message } => self.send(replica, vec![to], message)?,
                Action::Broadcast { message } => {
                    if self.is_correct(replica)
                        && let Message::Prepare { pre_prepare, .. } = &message
                    {
                        self.accepted_proposals
                            .entry((pre_prepare.view, pre_prepare.op))
                            .or_default()
                            .insert(pre_prepare.digest);
                    }
                    let others = (0..self.options.replicas)
                        .filter(|to| *to != replica)
                        .collect();
                    self.send(replica, others, message)?;
                }
                Action::Commit {
                    op,
                    view,
                    digest,
                    batch,
                    cert,
                } => {
                    self.note(format!("replica {replica} commits op {op} (view {view})"));
                    let node = &mut self.nodes[usize::from(replica)];
                    let prepared = node.held.prepared_for_commit(op);
                    node.commit_prepared = node.commit_prepared.max(prepared);
                    self.apply(replica, op, digest, batch, cert)?;
                }
                // The core fetches the ops itself (StateRequest / StateOps). Checker: every
                // correct replica's log through the certified op matches the certificate.
                Action::StateTransfer { cert } => {
                    self.note(format!(
                        "replica {replica} state transfer to op {}",
                        cert.op()
                    ));
                    self.certified.insert(cert.op(), cert.digest());
                    self.check_certified_chain(cert.op(), cert.digest())?;
                }
                Action::ServeState { to, from_op, to_op } => {
                    self.check_serve_budget(replica, to, to_op - from_op + 1)?;
                    let log = &self.nodes[usize::from(replica)].log;
                    let end = usize::try_from(to_op).map_or(log.len(), |end| end.min(log.len()));
                    let start = usize::try_from(from_op - 1).map_or(end, |start| start.min(end));
                    let ops = log[start..end]
                        .iter()
                        .map(|(_, batch, cert)| (cert.clone(), batch.clone()))
                        .collect();
                    self.send(replica, vec![to], Message::StateOps(ops))?;
                }
                Action::PersistGuard { guard } => {
                    let node = &mut self.nodes[usize::from(replica)];
                    node.guard_requested = guard;
                    node.held.request_guard();
                    self.guard_write(replica);
                }
                // Written with the next prepared write (one write covers all those asked for
                // meanwhile); the Commits after it wait for that write.
                Action::PersistPrepared { entry } => {
                    let node = &mut self.nodes[usize::from(replica)];
                    let op = entry.cert.pre_prepare.op;
                    node.prepared_requested.push(entry);
                    node.held.request_prepared(op);
                    self.prepared_write(replica);
                }
                // Only a driver that lost ops from its log offers a snapshot
                // (`Message::StateSnapshot`); the simulator's drivers serve every op (a
                // restarted one keeps its durable log from op 1).
                Action::FetchSnapshot { .. } => {}
            }
        }
        self.journal_write(replica);
        if self.is_correct(replica)
            && self.nodes[usize::from(replica)]
                .core
                .metrics()
                .state_transfers_mismatched
                > 0
        {
            return Err(self.fail(
                "safety",
                format!(
                    "replica {replica}: a state transfer's certified ops do not end on the \
                     certified checkpoint"
                ),
            ));
        }
        let node = &mut self.nodes[usize::from(replica)];
        let pending = !node.pending.is_empty();
        node.core.set_pending(self.time_us, pending);
        Ok(())
    }

    /// Applies committed op `op` at `replica`: the safety checker, then execution.
    fn apply(
        &mut self,
        replica: u8,
        op: u64,
        digest: Digest,
        batch: Vec<u8>,
        cert: CommitCert,
    ) -> Outcome<()> {
        let correct = self.is_correct(replica);
        let node = &mut self.nodes[usize::from(replica)];
        if node.log.len() as u64 + 1 != op || batch_digest(&batch) != digest {
            return Err(self.fail(
                "driver",
                format!("replica {replica}: op {op} out of order or wrong digest"),
            ));
        }
        node.chain = chain_digest(&node.chain, op, &digest);
        node.log.push((digest, batch.clone(), cert));
        // Every request a correct replica executes was signed by its client (a null op
        // holds none).
        if self.keeps_honest_log(replica)
            && !batch.is_empty()
            && let Err(error) = self.auth.check_batch(&batch, &digest)
        {
            return Err(self.fail(
                "auth",
                format!(
                    "replica {replica} executed op {op}, a batch its clients did not sign: {error}"
                ),
            ));
        }
        if self.keeps_honest_log(replica)
            && self
                .certified
                .get(&op)
                .is_some_and(|chain| *chain != self.nodes[usize::from(replica)].chain)
        {
            return Err(self.fail(
                "safety",
                format!("replica {replica}'s log through op {op} is not the certified checkpoint"),
            ));
        }
        // Safety covers silent replicas too: their cores run unchanged (as if the network
        // dropped what they send), so their logs must agree as well.
        if self.keeps_honest_log(replica) {
            match self.committed.get(&op) {
                Some((first, other)) if *first != digest => {
                    return Err(self.fail(
                        "safety",
                        format!("op {op}: replica {other} committed {:02x?}, replica {replica} committed {:02x?}", &first[..4], &digest[..4]),
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(op, (digest, replica));
                }
            }
        }
        for (id, client) in decode_batch(&batch) {
            let node = &mut self.nodes[usize::from(replica)];
            if node.executed.contains_key(&id) {
                continue;
            }
            node.executed.insert(id, op);
            node.pending.remove(&id);
            if correct && client < CLIENTS {
                let delay = self.link_delay();
                self.schedule(
                    delay,
                    Event::Reply {
                        client,
                        replica,
                        id,
                        result: op,
                    },
                );
            }
        }
        Ok(())
    }

    /// Safety: every correct replica that executed `op` has chain digest `chain` there (a
    /// checkpoint certificate's statement).
    fn check_certified_chain(&mut self, op: u64, chain: Digest) -> Outcome<()> {
        for replica in 0..self.options.replicas {
            let log = &self.nodes[usize::from(replica)].log;
            if !self.keeps_honest_log(replica) || (log.len() as u64) < op {
                continue;
            }
            let ours = log[..op as usize].iter().enumerate().fold(
                [0; 32],
                |previous, (index, (digest, _, _))| {
                    chain_digest(&previous, index as u64 + 1, digest)
                },
            );
            if ours != chain {
                return Err(self.fail(
                    "safety",
                    format!(
                        "replica {replica}'s log through op {op} is not the certified checkpoint"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Leader: proposes waiting requests not yet proposed in this view.
    fn propose(&mut self, replica: u8) -> Outcome<()> {
        loop {
            let node = &mut self.nodes[usize::from(replica)];
            if !node.core.is_ready_leader() {
                return Ok(());
            }
            let view = node.core.view();
            let chosen: Vec<Request> = node
                .pending
                .values()
                .filter(|request| node.proposed.get(&request.id) != Some(&view))
                .take(REQUESTS_PER_BATCH_MAX)
                .cloned()
                .collect();
            if chosen.is_empty() {
                return Ok(());
            }
            for request in &chosen {
                node.proposed.insert(request.id, view);
            }
            let mut batch = encode_batch(&chosen);
            if node.behaviour == Some(Behaviour::ForgeRequest) {
                batch = forged_batch(&batch);
            }
            let mut actions = Vec::new();
            let op = node
                .core
                .propose(self.time_us, batch, &mut actions)
                .map_err(|error| self.fail("driver", format!("propose refused: {error}")))?;
            self.note(format!(
                "replica {replica} proposes op {op} in view {view} ({} requests)",
                chosen.len()
            ));
            self.execute(replica, actions)?;
        }
    }

    fn link_delay(&mut self) -> u64 {
        if self.options.slow_links {
            self.rng.range(SLOW_LINK_US_MIN, SLOW_LINK_US_MAX)
        } else if self.rng.chance(self.slow_per_million) {
            self.rng.range(5_000, 50_000)
        } else {
            self.rng.range(100, 2_000)
        }
    }

    /// Sends a core's message, or holds it back as the driver does ([`HeldSends`]): no vote
    /// leaves before the guard covering it is durable, and no Commit vote before its
    /// prepared certificate is.
    fn send(&mut self, from: u8, tos: Vec<u8>, message: Message) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(from)];
        let peers = tos.iter().fold(0, |peers, to| peers | 1 << to);
        let commits_held = node.held.held().1;
        match node.held.offer(peers, &message) {
            Offered::SendNow => {
                if commits_held > 0 {
                    self.sends_past_held_commits += 1;
                }
                self.transmit(from, tos, message)
            }
            Offered::Held => {
                self.sends_held += 1;
                Ok(())
            }
            Offered::Dropped => {
                self.messages_dropped += tos.len() as u64;
                Ok(())
            }
        }
    }

    /// Puts `message` from `from` on the wire to each of `tos`.
    fn transmit(&mut self, from: u8, tos: Vec<u8>, message: Message) -> Outcome<()> {
        let sends = if self.is_correct(from) {
            self.check_signed(from, &message)?;
            self.check_prepared_reported(from, &message)?;
            tos.into_iter().map(|to| (to, message.clone())).collect()
        } else {
            self.byzantine_outgoing(from, tos, message)
        };
        for (to, message) in sends {
            if self.isolated.contains(&from) != self.isolated.contains(&to)
                || self.rng.chance(self.drop_per_million)
            {
                self.messages_dropped += 1;
                continue;
            }
            if self.rng.chance(self.duplicate_per_million) {
                let delay = self.link_delay();
                self.schedule(
                    delay,
                    Event::Deliver {
                        from,
                        to,
                        message: Box::new(message.clone()),
                    },
                );
            }
            let delay = self.link_delay();
            let message = Box::new(message);
            self.schedule(delay, Event::Deliver { from, to, message });
        }
        Ok(())
    }

    /// The `serve-budget` checker: a correct core serves each peer at most its full budget
    /// plus `state_serve_ops_per_s` for the time since it was built, however fast the peer
    /// asks (`flood-state`).
    fn check_serve_budget(&mut self, replica: u8, to: u8, ops: u64) -> Outcome<()> {
        if !self.is_correct(replica) {
            return Ok(());
        }
        let byzantine = !self.is_correct(to);
        let node = &mut self.nodes[usize::from(replica)];
        let served = &mut node.served_ops[usize::from(to)];
        *served += ops;
        let served = *served;
        let elapsed_us = self.time_us - node.serving_since_us;
        let refilled =
            u128::from(elapsed_us) * u128::from(node.config.state_serve_ops_per_s) / 1_000_000;
        let allowed = node
            .config
            .serve_budget_ops()
            .saturating_add(u64::try_from(refilled).unwrap_or(u64::MAX));
        if byzantine {
            self.state_ops_served_to_byzantine += ops;
        }
        if served > allowed {
            return Err(self.fail(
                "serve-budget",
                format!(
                    "replica {replica} served replica {to} {served} ops in {elapsed_us} µs: \
                     its budget allows {allowed}"
                ),
            ));
        }
        Ok(())
    }

    /// What a Byzantine replica sends instead of `message`.
    fn byzantine_outgoing(
        &mut self,
        from: u8,
        tos: Vec<u8>,
        message: Message,
    ) -> Vec<(u8, Message)> {
        let behaviour = self.nodes[usize::from(from)].behaviour.expect("byzantine");
        let key = self.nodes[usize::from(from)].key.clone();
        let same = |tos: &[u8], message: &Message| {
            tos.iter()
                .map(|to| (*to, message.clone()))
                .collect::<Vec<_>>()
        };
        match behaviour {
            Behaviour::Silent if self.time_us >= self.nodes[usize::from(from)].silent_from_us => {
                Vec::new()
            }
            // A forging leader's batches are rewritten where it proposes (`propose`).
            Behaviour::Silent | Behaviour::ForgeRequest => same(&tos, &message),
            Behaviour::FloodState => {
                let flood = Message::StateRequest {
                    from_op: 1,
                    to_op: u64::MAX,
                };
                let mut sends = same(&tos, &message);
                for to in &tos {
                    sends.extend((0..FLOOD_STATE_REQUESTS_PER_SEND).map(|_| (*to, flood.clone())));
                }
                sends
            }
            Behaviour::Withhold => match message {
                Message::Prepare { .. } | Message::Commit(_) | Message::Checkpoint(_) => Vec::new(),
                other => same(&tos, &other),
            },
            Behaviour::WrongDigest => {
                let wrong = self.random_digest();
                let message = match message {
                    Message::PrePrepare { vote, batch } => Message::PrePrepare {
                        vote: resign(&key, vote, wrong),
                        batch,
                    },
                    Message::Prepare { vote, pre_prepare } => Message::Prepare {
                        vote: resign(&key, vote, wrong),
                        pre_prepare,
                    },
                    Message::Commit(vote) => Message::Commit(resign(&key, vote, wrong)),
                    other => other,
                };
                same(&tos, &message)
            }
            Behaviour::Equivocate => self.equivocate(from, &key, tos, message),
            Behaviour::Replay => {
                let mut sends = same(&tos, &message);
                let node = &self.nodes[usize::from(from)];
                if !node.seen.is_empty() && self.rng.chance(300_000) {
                    let (_, old) =
                        node.seen[self.rng.below(node.seen.len() as u64) as usize].clone();
                    let to = self.rng.below(u64::from(self.options.replicas)) as u8;
                    if to != from {
                        sends.push((to, old));
                    }
                }
                sends
            }
            Behaviour::Forge => {
                let mut sends = same(&tos, &message);
                if let Some(forged) = self.forge(&key, &message) {
                    let to = self.rng.below(u64::from(self.options.replicas)) as u8;
                    if to != from {
                        sends.push((to, forged));
                    }
                }
                sends
            }
        }
    }

    /// The equivocating replica's sends: the replicas of the alternate set get a second,
    /// validly signed version (a different batch, and votes for its digest).
    fn equivocate(
        &mut self,
        from: u8,
        key: &SigningKey,
        tos: Vec<u8>,
        message: Message,
    ) -> Vec<(u8, Message)> {
        let alternate = match &message {
            Message::PrePrepare { vote, batch } => {
                let batch = alternate_batch(batch);
                let digest = batch_digest(&batch);
                self.nodes[usize::from(from)]
                    .alternates
                    .insert((vote.view, vote.op), digest);
                Some(Message::PrePrepare {
                    vote: resign(key, *vote, digest),
                    batch,
                })
            }
            Message::Prepare { vote, pre_prepare } => {
                let digest = self.alternate_digest(from, vote);
                Some(Message::Prepare {
                    vote: resign(key, *vote, digest),
                    pre_prepare: *pre_prepare,
                })
            }
            Message::Commit(vote) => Some(Message::Commit(resign(
                key,
                *vote,
                self.alternate_digest(from, vote),
            ))),
            Message::Checkpoint(vote) => Some(Message::Checkpoint(resign(
                key,
                *vote,
                self.alternate_digest(from, vote),
            ))),
            _ => None,
        };
        tos.into_iter()
            .map(|to| match &alternate {
                Some(alternate) if self.alternate_set.contains(&to) => (to, alternate.clone()),
                _ => (to, message.clone()),
            })
            .collect()
    }

    fn alternate_digest(&self, from: u8, vote: &Vote) -> Digest {
        match self.nodes[usize::from(from)]
            .alternates
            .get(&(vote.view, vote.op))
        {
            Some(digest) => *digest,
            None => batch_digest(&vote.digest),
        }
    }

    /// A vote in another replica's name (signed with the forger's key), or with a garbage
    /// signature.
    fn forge(&mut self, key: &SigningKey, message: &Message) -> Option<Message> {
        let vote = match message {
            Message::PrePrepare { vote, .. }
            | Message::Prepare { vote, .. }
            | Message::Commit(vote)
            | Message::Checkpoint(vote) => *vote,
            _ => return None,
        };
        let victim = self.rng.below(u64::from(self.options.replicas)) as u8;
        let digest = self.random_digest();
        let mut forged = Vote::sign(key, 0, vote.kind, victim, vote.view, vote.op, digest);
        if self.rng.chance(500_000) {
            let mut garbage = [0u8; 64];
            for chunk in garbage.chunks_exact_mut(8) {
                chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
            }
            forged.signature = Signature::from_bytes(&garbage);
        }
        Some(match message {
            Message::PrePrepare { batch, .. } => Message::PrePrepare {
                vote: forged,
                batch: batch.clone(),
            },
            Message::Prepare { pre_prepare, .. } => Message::Prepare {
                vote: forged,
                pre_prepare: *pre_prepare,
            },
            Message::Commit(_) => Message::Commit(forged),
            _ => Message::Checkpoint(forged),
        })
    }

    fn random_digest(&mut self) -> Digest {
        let mut digest = [0u8; 32];
        for chunk in digest.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        digest
    }

    fn network_fault(&mut self) {
        if self.healed_at_us.is_some() {
            return;
        }
        if self.isolated.is_empty() && self.rng.chance(600_000) {
            let replica = self.rng.below(u64::from(self.options.replicas)) as u8;
            self.isolated.insert(replica);
            self.note(format!("partition: replica {replica} isolated"));
        } else if !self.isolated.is_empty() {
            self.isolated.clear();
            self.note("partition healed".to_string());
        }
        let delay = self.rng.range(50_000, 500_000);
        self.schedule(delay, Event::NetworkFault);
    }

    /// Starts a journal group commit of what `replica` executed (and the stable checkpoint
    /// certificate) since the last one, unless one is in flight.
    fn journal_write(&mut self, replica: u8) {
        let node = &mut self.nodes[usize::from(replica)];
        let low_durable = node.disk.low_cert.as_ref().map_or(0, CheckpointCert::op);
        if !node.up
            || node.disk.journal_writing.is_some()
            || (node.log.len() as u64 == node.disk.log_durable && node.core.low() <= low_durable)
            || (node.held.prepared().1 < node.commit_prepared
                && !self.options.journal_before_prepared)
        {
            return;
        }
        debug_assert!(node.core.low() <= node.log.len() as u64);
        node.disk.journal_writing = Some((node.log.len() as u64, node.core.low_cert().cloned()));
        let incarnation = node.incarnation;
        let delay = self.rng.range(DISK_WRITE_US_MIN, DISK_WRITE_US_MAX);
        self.schedule(
            delay,
            Event::JournalDurable {
                replica,
                incarnation,
            },
        );
    }

    /// The group commit in flight is durable: tell the core (checkpoint votes, state
    /// transfer), then start the next one.
    fn journal_durable(&mut self, replica: u8, incarnation: u64) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(replica)];
        if node.incarnation != incarnation {
            return Ok(());
        }
        let Some((op, low_cert)) = node.disk.journal_writing.take() else {
            return Ok(());
        };
        Self::land_journal(node, replica, op, low_cert);
        let mut actions = Vec::new();
        node.core.on_durable(self.time_us, op, &mut actions);
        self.execute(replica, actions)?;
        self.propose(replica)
    }

    /// Starts writing the latest guard asked for, unless a write is in flight.
    fn guard_write(&mut self, replica: u8) {
        let node = &mut self.nodes[usize::from(replica)];
        let (requested, durable) = node.held.guard();
        if node.disk.guard_writing.is_some() || requested == durable {
            return;
        }
        node.disk.guard_writing = Some((node.guard_requested, requested));
        self.guard_writes += 1;
        self.disk_write_scheduled(replica, true);
    }

    /// Starts appending the prepared certificates asked for, unless a write is in flight or
    /// the guard covering their votes is not durable yet.
    fn prepared_write(&mut self, replica: u8) {
        let node = &mut self.nodes[usize::from(replica)];
        let (requested, durable) = node.held.prepared();
        if node.disk.prepared_writing.is_some()
            || requested == durable
            || (!node.held.prepared_may_write() && !self.options.prepared_before_guard)
        {
            return;
        }
        let prepared = std::mem::take(&mut node.prepared_requested);
        self.prepared_persisted += prepared.len() as u64;
        node.disk.prepared_writing = Some((prepared, requested));
        self.disk_write_scheduled(replica, false);
    }

    /// Schedules the end of the guard (or prepared) write just started, and perhaps a crash
    /// inside it: the write lands or not, the held sends are lost.
    fn disk_write_scheduled(&mut self, replica: u8, guard: bool) {
        let node = &self.nodes[usize::from(replica)];
        let (incarnation, crashes) = (node.incarnation, node.crashes);
        let delay = self.rng.range(DISK_WRITE_US_MIN, DISK_WRITE_US_MAX);
        let event = if guard {
            Event::GuardDurable {
                replica,
                incarnation,
            }
        } else {
            Event::PreparedDurable {
                replica,
                incarnation,
            }
        };
        self.schedule(delay, event);
        if crashes
            && self.healed_at_us.is_none()
            && self.rng.chance(CRASH_DURING_DISK_WRITE_PER_MILLION)
        {
            let at = self.rng.range(0, delay);
            self.schedule(
                at,
                Event::Crash {
                    replica,
                    next: false,
                },
            );
        }
    }

    /// Checker `prepared-report`: a correct replica's ViewChange for view `v` reports, for
    /// every op in its window where it sent a Commit in a view below `v`, a prepared
    /// certificate of that view or a later one, whatever crashes it went through (section
    /// 7's argument counts on it). Records the Commits it sends, and its Commit votes inside
    /// the commit certificates it relays (`CommitProof`, `StateOps`) or journals
    /// ([`World::land_journal`]).
    fn check_prepared_reported(&mut self, from: u8, message: &Message) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(from)];
        match message {
            Message::Commit(vote) if vote.replica == from => {
                let view = node.commits_sent.entry(vote.op).or_insert(vote.view);
                *view = (*view).max(vote.view);
                Ok(())
            }
            // Its Commit vote inside a commit certificate it relays reveals the vote too.
            Message::CommitProof { cert, .. } => {
                Self::note_commits_sent(node, from, std::slice::from_ref(cert));
                Ok(())
            }
            Message::StateOps(ops) => {
                let certs: Vec<CommitCert> = ops.iter().map(|(cert, _)| cert.clone()).collect();
                Self::note_commits_sent(node, from, &certs);
                Ok(())
            }
            Message::ViewChange(view_change) if view_change.vote.replica == from => {
                let low = view_change.checkpoint_op();
                let high = low + node.config.log_window_ops;
                let missing = node
                    .commits_sent
                    .range(low + 1..=high)
                    .filter(|(_, view)| **view < view_change.vote.view)
                    .find(|(op, view)| {
                        !view_change.prepared.iter().any(|entry| {
                            entry.cert.pre_prepare.op == **op
                                && entry.cert.pre_prepare.view >= **view
                        })
                    })
                    .map(|(op, view)| (*op, *view));
                match missing {
                    None => Ok(()),
                    Some((op, view)) => Err(self.fail(
                        "prepared-report",
                        format!(
                            "replica {from} sent a Commit for op {op} in view {view} and its \
                             ViewChange for view {} (checkpoint {low}) reports no prepared \
                             certificate for it",
                            view_change.vote.view
                        ),
                    )),
                }
            }
            _ => Ok(()),
        }
    }

    /// A group commit lands: committed ops through `op` are durable. Those whose commit
    /// certificate holds `replica`'s own Commit count for `prepared-report` as if the
    /// Commit had been sent: they are executed after a restart, committed here with that
    /// vote, so its ViewChanges must report them.
    fn land_journal(node: &mut Node, replica: u8, op: u64, low_cert: Option<CheckpointCert>) {
        let from = usize::try_from(node.disk.log_durable).unwrap_or(usize::MAX);
        let to = usize::try_from(op)
            .unwrap_or(usize::MAX)
            .min(node.log.len());
        let certs: Vec<CommitCert> = node.log[from.min(to)..to]
            .iter()
            .map(|(_, _, cert)| cert.clone())
            .collect();
        Self::note_commits_sent(node, replica, &certs);
        node.disk.land_journal(op, low_cert);
    }

    /// `from`'s own Commit votes inside `certs`, as if it had sent them.
    fn note_commits_sent(node: &mut Node, from: u8, certs: &[CommitCert]) {
        for vote in certs.iter().flat_map(|cert| &cert.commits) {
            if vote.replica == from && vote.kind == VoteKind::Commit {
                let view = node.commits_sent.entry(vote.op).or_insert(vote.view);
                *view = (*view).max(vote.view);
            }
        }
    }

    /// The guard write in flight is durable: the sends it was the last wait of leave.
    fn guard_durable(&mut self, replica: u8, incarnation: u64) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(replica)];
        if node.incarnation != incarnation {
            return Ok(());
        }
        let Some((guard, sequence)) = node.disk.guard_writing.take() else {
            return Ok(());
        };
        node.disk.guard = guard;
        node.held.guard_landed(sequence);
        self.guard_write(replica);
        // A prepared write may have waited for this guard (it holds votes the guard covers).
        self.prepared_write(replica);
        self.release_held(replica)
    }

    /// The prepared certificate write in flight is durable: the Commits it was the last
    /// wait of leave.
    fn prepared_durable(&mut self, replica: u8, incarnation: u64) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(replica)];
        if node.incarnation != incarnation {
            return Ok(());
        }
        let Some((prepared, sequence)) = node.disk.prepared_writing.take() else {
            return Ok(());
        };
        node.disk.land_prepared(prepared);
        node.held.prepared_landed(sequence);
        self.prepared_write(replica);
        // A journal write may have waited for it.
        self.journal_write(replica);
        self.release_held(replica)
    }

    /// Puts every held send whose writes are durable on the wire, oldest first.
    fn release_held(&mut self, replica: u8) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(replica)];
        let released: Vec<_> = std::iter::from_fn(|| node.held.pop_ready()).collect();
        for send in released {
            let (tos, count) = send.tos();
            self.transmit(replica, tos[..count].to_vec(), send.message)?;
        }
        Ok(())
    }

    /// A crashing replica, often the leader of the latest view.
    fn crash_victim(&mut self) -> u8 {
        let crashing: Vec<u8> = (0..self.options.replicas)
            .filter(|replica| self.nodes[usize::from(*replica)].crashes)
            .collect();
        let view = self
            .nodes
            .iter()
            .filter(|node| node.behaviour.is_none() && node.up)
            .map(|node| node.core.view())
            .max()
            .unwrap_or(0);
        let leader = self.committee.leader_of(view);
        if crashing.contains(&leader) && self.rng.chance(500_000) {
            return leader;
        }
        crashing[self.rng.below(crashing.len() as u64) as usize]
    }

    /// The time to the next crash of the run's chain.
    fn crash_interval_us(&mut self) -> u64 {
        if self.options.crash_all {
            self.rng
                .range(CRASH_ALL_INTERVAL_US_MIN, CRASH_ALL_INTERVAL_US_MAX)
        } else {
            self.rng.range(CRASH_INTERVAL_US_MIN, CRASH_INTERVAL_US_MAX)
        }
    }

    /// `--crash-all`: every other crashing replica crashes too, at once or within
    /// `CRASH_ALL_SPREAD_US`, so that all of them restart from their own disks at
    /// different commit points (a power loss of the whole group).
    fn crash_the_others(&mut self, first: u8) {
        let at_once = self.rng.chance(500_000);
        for replica in 0..self.options.replicas {
            if replica == first || !self.nodes[usize::from(replica)].crashes {
                continue;
            }
            let delay = if at_once {
                0
            } else {
                self.rng.range(0, CRASH_ALL_SPREAD_US)
            };
            self.schedule(
                delay,
                Event::Crash {
                    replica,
                    next: false,
                },
            );
        }
    }

    /// `replica` loses everything not durable; writes in flight land or are lost.
    fn crash(&mut self, replica: u8, next: bool) {
        if self.healed_at_us.is_some() {
            return;
        }
        if next {
            let delay = self.crash_interval_us();
            let victim = self.crash_victim();
            self.schedule(
                delay,
                Event::Crash {
                    replica: victim,
                    next: true,
                },
            );
            if self.options.crash_all {
                self.crash_the_others(replica);
            }
        }
        if !self.nodes[usize::from(replica)].up {
            return;
        }
        let journal_lands = self.rng.chance(500_000);
        let guard_lands = self.rng.chance(500_000);
        let prepared_lands = self.rng.chance(500_000);
        let down_us = self.rng.range(DOWN_US_MIN, DOWN_US_MAX);
        let node = &mut self.nodes[usize::from(replica)];
        node.up = false;
        node.incarnation += 1;
        if let Some((op, low_cert)) = node.disk.journal_writing.take()
            && journal_lands
        {
            Self::land_journal(node, replica, op, low_cert);
        }
        if let Some((guard, _)) = node.disk.guard_writing.take()
            && guard_lands
        {
            node.disk.guard = guard;
        }
        if let Some((prepared, _)) = node.disk.prepared_writing.take()
            && prepared_lands
        {
            node.disk.land_prepared(prepared);
        }
        let (held_guard, held_commit) = node.held.held();
        let held = held_guard + held_commit;
        node.held = HeldSends::new();
        node.commit_prepared = 0;
        node.prepared_requested.clear();
        node.pending.clear();
        node.proposed.clear();
        node.log.truncate(node.disk.log_durable as usize);
        let incarnation = node.incarnation;
        let line = format!(
            "replica {replica} crashes: {held} sends held lost, durable op {}, guard {:?}",
            node.disk.log_durable, node.disk.guard
        );
        self.note(line);
        self.schedule(
            down_us,
            Event::Restart {
                replica,
                incarnation,
            },
        );
    }

    /// `replica` comes back from its disk as the driver does: the journal's committed ops
    /// above its last journaled stable checkpoint and its guard, through
    /// `BftReplica::restore`.
    fn restart(&mut self, replica: u8, incarnation: u64) -> Outcome<()> {
        let committee = self.committee.clone();
        let node = &mut self.nodes[usize::from(replica)];
        if node.up || node.incarnation != incarnation {
            return Ok(());
        }
        let low = node.disk.low_cert.as_ref().map_or(0, CheckpointCert::op);
        let restored = Restored {
            low_cert: node.disk.low_cert.clone(),
            digests: node.log[low as usize..]
                .iter()
                .map(|(digest, _, _)| *digest)
                .collect(),
            guard: node.disk.guard,
            prepared: node.disk.prepared.values().cloned().collect(),
        };
        self.prepared_restored += restored.prepared.len() as u64;
        let core = BftReplica::restore(
            node.config,
            committee,
            node.key.clone(),
            self.time_us,
            restored,
        );
        node.core = match core {
            Ok(core) => core,
            Err(error) => {
                return Err(self.fail("driver", format!("replica {replica}: restore: {error}")));
            }
        };
        // As the runtime: a restarted replica checks client signatures before it votes.
        let check = RequestVerifier::new(0, self.client_verifying_keys.clone(), RECORD_BYTES, None);
        let node = &mut self.nodes[usize::from(replica)];
        node.core.set_proposal_check(Box::new(check));
        node.chain = [0; 32];
        node.executed.clear();
        for (index, (digest, batch, _)) in node.log.iter().enumerate() {
            let op = index as u64 + 1;
            node.chain = chain_digest(&node.chain, op, digest);
            for (id, _) in decode_batch(batch) {
                node.executed.entry(id).or_insert(op);
            }
        }
        node.guard_requested = node.disk.guard;
        node.served_ops.fill(0);
        node.serving_since_us = self.time_us;
        node.up = true;
        self.restarts += 1;
        let line = format!(
            "replica {replica} restarts at op {} (low {low}) in view {}",
            node.core.commit_op(),
            node.core.view()
        );
        self.note(line);
        let offset = self.rng.range(1, TICK_INTERVAL_US);
        self.schedule(
            offset,
            Event::Tick {
                replica,
                incarnation,
            },
        );
        Ok(())
    }

    /// The vote checker, for a correct replica's message going on the wire: each statement
    /// it signed there is covered by its durable guard (Checkpoint and StateCheckpoint votes
    /// need none: their digest is a function of the committed log and state), and it never put on the wire a different
    /// statement for the same `(kind, view, op)` (one ViewChange per view), in this life or
    /// an earlier one.
    fn check_signed(&mut self, from: u8, message: &Message) -> Outcome<()> {
        let mut votes = Vec::new();
        own_votes(from, message, &mut votes);
        let guard = self.nodes[usize::from(from)].disk.guard;
        for vote in votes {
            let op_key = if vote.kind == VoteKind::ViewChange {
                0
            } else {
                vote.op
            };
            let key = (from, vote.kind as u8, vote.view, op_key);
            let statement = (vote.op, vote.digest);
            match self.signed.get(&key) {
                None => {
                    self.signed.insert(key, statement);
                }
                Some(earlier) if *earlier != statement => {
                    return Err(self.fail(
                        "conflicting-votes",
                        format!(
                            "replica {from} signed {:?} view {} op {} digest {:02x?}, and earlier op {} digest {:02x?}",
                            vote.kind,
                            vote.view,
                            vote.op,
                            &vote.digest[..4],
                            earlier.0,
                            &earlier.1[..4]
                        ),
                    ));
                }
                Some(_) => {}
            }
            let covered = match vote.kind {
                VoteKind::Checkpoint | VoteKind::StateCheckpoint => true,
                VoteKind::ViewChange => vote.view <= guard.view_change_view,
                _ => guard.covers_vote(vote.view, vote.op),
            };
            if !covered {
                return Err(self.fail(
                    "guard",
                    format!(
                        "replica {from} sends {:?} view {} op {} not covered by its durable guard {guard:?}",
                        vote.kind, vote.view, vote.op
                    ),
                ));
            }
        }
        Ok(())
    }

    fn heal(&mut self) {
        self.healed_at_us = Some(self.time_us);
        for replica in 0..self.options.replicas {
            let node = &self.nodes[usize::from(replica)];
            if !node.up {
                let incarnation = node.incarnation;
                self.schedule(
                    0,
                    Event::Restart {
                        replica,
                        incarnation,
                    },
                );
            }
        }
        self.isolated.clear();
        self.drop_per_million = 0;
        self.duplicate_per_million = 0;
        self.slow_per_million = 0;
        self.note("heal: network faults stop, clients send their last requests".to_string());
        for client in 0..CLIENTS {
            self.clients[client].quota = self.clients[client].issued + REQUESTS_AFTER_HEAL;
            if self.clients[client].outstanding.is_none() {
                self.issue(client);
            }
        }
    }

    fn issue(&mut self, client: usize) {
        let state = &mut self.clients[client];
        if state.issued >= state.quota || state.outstanding.is_some() {
            return;
        }
        state.issued += 1;
        state.sequence += 1;
        let request_number = state.sequence;
        let id = ((client as u64 + 1) << 32) | request_number;
        let length = self.rng.range(1, 3) as usize * RECORD_BYTES;
        let payload: Vec<u8> = (0..length).map(|_| self.rng.next_u64() as u8).collect();
        let statement =
            RequestStatement::new(0, client as u128 + 1, request_number, OPERATION, &payload);
        let request = Request {
            id,
            client,
            signature: statement.sign(&self.client_keys[client]),
            payload,
        };
        self.clients[client].outstanding = Some((request.clone(), BTreeMap::new()));
        self.send_request(request);
    }

    fn send_request(&mut self, request: Request) {
        for to in 0..self.options.replicas {
            if self.rng.chance(self.drop_per_million) {
                continue;
            }
            let delay = self.link_delay();
            self.schedule(
                delay,
                Event::Request {
                    to,
                    request: request.clone(),
                },
            );
        }
        self.schedule(
            CLIENT_RETRY_US,
            Event::ClientTimer {
                client: request.client,
                id: request.id,
            },
        );
    }

    fn on_request(&mut self, replica: u8, request: Request) -> Outcome<()> {
        let node = &mut self.nodes[usize::from(replica)];
        if !node.up {
            return Ok(());
        }
        if let Some(behaviour) = node.behaviour {
            // A Byzantine replica answers at once with a made-up result.
            if behaviour != Behaviour::Silent || self.time_us < node.silent_from_us {
                let delay = self.link_delay();
                self.schedule(
                    delay,
                    Event::Reply {
                        client: request.client,
                        replica,
                        id: request.id,
                        result: u64::MAX,
                    },
                );
            }
            let node = &mut self.nodes[usize::from(replica)];
            if node.pending.len() < PENDING_MAX {
                node.pending.insert(request.id, request);
            }
            return self.propose(replica);
        }
        if let Some(op) = node.executed.get(&request.id).copied() {
            let delay = self.link_delay();
            self.schedule(
                delay,
                Event::Reply {
                    client: request.client,
                    replica,
                    id: request.id,
                    result: op,
                },
            );
            return Ok(());
        }
        if node.pending.len() < PENDING_MAX {
            node.pending.insert(request.id, request);
        }
        node.core.set_pending(self.time_us, true);
        self.propose(replica)
    }

    fn on_reply(&mut self, client: usize, replica: u8, id: u64, result: u64) -> Outcome<()> {
        let weak_quorum = if self.options.client_weak_quorum {
            usize::from(self.faults_max).max(1)
        } else {
            usize::from(self.faults_max) + 1
        };
        let state = &mut self.clients[client];
        let Some((request, replies)) = &mut state.outstanding else {
            return Ok(());
        };
        if request.id != id {
            return Ok(());
        }
        replies.insert(replica, result);
        let matching = replies.values().filter(|other| **other == result).count();
        if matching < weak_quorum {
            return Ok(());
        }
        // Accepted: the result must be the op at which correct replicas executed it.
        for (index, node) in self.nodes.iter().enumerate() {
            if node.behaviour.is_none()
                && let Some(op) = node.executed.get(&id)
                && *op != result
            {
                return Err(self.fail("client", format!("client {client} accepted op {result} for request {id:#x}; replica {index} executed it at op {op}")));
            }
        }
        let state = &mut self.clients[client];
        state.accepted.push((id, result));
        state.outstanding = None;
        self.note(format!(
            "client {client} accepts request {id:#x} at op {result}"
        ));
        self.issue(client);
        Ok(())
    }

    /// Done: every client used its quota and had every request accepted, and every correct
    /// replica executed every accepted request.
    fn converged(&self) -> bool {
        let clients_done = self
            .clients
            .iter()
            .all(|client| client.outstanding.is_none() && client.issued >= client.quota);
        clients_done
            && self
                .clients
                .iter()
                .flat_map(|client| &client.accepted)
                .all(|(id, _)| {
                    self.nodes
                        .iter()
                        .filter(|node| node.behaviour.is_none())
                        .all(|node| node.executed.contains_key(id))
                })
    }

    fn liveness_report(&self) -> String {
        let replicas: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(replica, node)| {
                format!(
                    "{replica}{}: view {} {:?} commit {} low {} pending {}",
                    node.behaviour.map_or(String::new(), |behaviour| format!(
                        " ({})",
                        behaviour.name()
                    )),
                    node.core.view(),
                    node.core.status(),
                    node.core.commit_op(),
                    node.core.low(),
                    node.pending.len()
                )
            })
            .collect();
        let clients: Vec<String> = self
            .clients
            .iter()
            .map(|client| {
                format!(
                    "issued {} accepted {} outstanding {}",
                    client.issued,
                    client.accepted.len(),
                    client.outstanding.is_some()
                )
            })
            .collect();
        format!(
            "not converged {} us after the heal; replicas [{}]; clients [{}]",
            LIVENESS_BOUND_US,
            replicas.join("; "),
            clients.join("; ")
        )
    }

    /// Evidence must be real and convict only Byzantine replicas; with a fault-free
    /// network, an equivocation that correct replicas accepted must have been detected.
    fn check_evidence(&self) -> Outcome<()> {
        for (replica, node) in self.nodes.iter().enumerate() {
            if node.behaviour.is_some() {
                continue;
            }
            for evidence in node.core.evidence() {
                if evidence.verify(&self.committee).is_err() || self.is_correct(evidence.replica())
                {
                    return Err(self.fail(
                        "evidence",
                        format!(
                            "replica {replica} holds evidence against replica {}: {evidence:?}",
                            evidence.replica()
                        ),
                    ));
                }
            }
        }
        if self.options.faults {
            return Ok(());
        }
        for ((view, op), digests) in &self.accepted_proposals {
            if digests.len() < 2 {
                continue;
            }
            let leader = self.committee.leader_of(*view);
            let detected = self.nodes.iter().any(|node| {
                node.behaviour.is_none()
                    && node
                        .core
                        .evidence()
                        .iter()
                        .any(|evidence| evidence.replica() == leader)
            });
            if !detected {
                return Err(self.fail("evidence", format!("leader {leader} equivocated at view {view} op {op} to correct replicas; no evidence recorded")));
            }
        }
        Ok(())
    }

    fn summary(&self) -> Summary {
        let correct: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|node| node.behaviour.is_none())
            .collect();
        let mut summary = Summary {
            steps: self.step,
            time_us: self.time_us,
            ops_committed: correct
                .iter()
                .map(|node| node.core.commit_op())
                .min()
                .unwrap_or(0),
            requests_accepted: self
                .clients
                .iter()
                .map(|client| client.accepted.len() as u64)
                .sum(),
            equivocations_accepted: self
                .accepted_proposals
                .values()
                .filter(|digests| digests.len() > 1)
                .count() as u64,
            messages_dropped: self.messages_dropped,
            restarts: self.restarts,
            guard_writes: self.guard_writes,
            sends_held: self.sends_held,
            sends_past_held_commits: self.sends_past_held_commits,
            prepared_persisted: self.prepared_persisted,
            prepared_restored: self.prepared_restored,
            state_serves_refused: self.state_serves_refused,
            state_serves_refused_to_correct: self.state_serves_refused_to_correct,
            state_ops_served_to_byzantine: self.state_ops_served_to_byzantine,
            byzantine_first_leader: self.nodes[0].behaviour.is_some(),
            ..Summary::default()
        };
        for node in correct {
            let metrics = node.core.metrics();
            summary.view_changes += metrics.view_changes;
            summary.view_max = summary.view_max.max(node.core.view());
            summary.checkpoints += metrics.checkpoints_stable;
            summary.state_transfers += metrics.state_transfers;
            summary.commits_held_for_durability += metrics.commits_held_for_durability;
            summary.equivocations_detected += metrics.equivocations;
            summary.bad_signatures += metrics.bad_signatures;
            summary.proposals_refused += metrics.proposals_refused;
            if node.incarnation > 0 {
                summary.proposals_refused_restarted += metrics.proposals_refused;
            }
            summary.messages_refused += metrics.bad_signatures
                + metrics.unknown_signers
                + metrics.wrong_view
                + metrics.out_of_window
                + metrics.invalid;
        }
        summary
    }
}

impl Disk {
    /// A group commit through `op` reached the disk (with the checkpoint certificate staged
    /// with it, if any: the low watermark only rises).
    fn land_journal(&mut self, op: u64, low_cert: Option<CheckpointCert>) {
        self.log_durable = op;
        if let Some(cert) = low_cert {
            debug_assert!(cert.op() <= op);
            // Prepared certificates at or below the stable checkpoint are dropped (the
            // disk holds at most one log window of them).
            self.prepared = self.prepared.split_off(&(cert.op() + 1));
            self.low_cert = Some(cert);
        }
    }

    /// A prepared certificate write lands.
    fn land_prepared(&mut self, prepared: Vec<PreparedEntry>) {
        let low = self.low_cert.as_ref().map_or(0, CheckpointCert::op);
        for entry in prepared {
            let (view, op) = (entry.cert.pre_prepare.view, entry.cert.pre_prepare.op);
            let newer = self
                .prepared
                .get(&op)
                .is_none_or(|held| held.cert.pre_prepare.view < view);
            if op > low && newer {
                self.prepared.insert(op, entry);
            }
        }
    }
}

/// The statements `from` signed that `message` carries (its own votes, and its votes inside
/// the certificates and view changes it relays).
fn own_votes(from: u8, message: &Message, votes: &mut Vec<Vote>) {
    let mut keep = |vote: &Vote| {
        if vote.replica == from {
            votes.push(*vote);
        }
    };
    match message {
        Message::PrePrepare { vote, .. } | Message::Commit(vote) | Message::Checkpoint(vote) => {
            keep(vote)
        }
        Message::Prepare { vote, pre_prepare } => {
            keep(vote);
            keep(pre_prepare);
        }
        Message::ViewChange(view_change) => view_change_votes(view_change, &mut keep),
        Message::NewView(new_view) => {
            for view_change in &new_view.view_changes {
                view_change_votes(view_change, &mut keep);
            }
            new_view
                .pre_prepares
                .iter()
                .for_each(|(vote, _)| keep(vote));
        }
        Message::CommitProof {
            pre_prepare, cert, ..
        } => {
            keep(pre_prepare);
            cert.commits.iter().for_each(keep);
        }
        Message::StateCheckpoint { vote, .. } => keep(vote),
        Message::CheckpointProof(cert) => cert.votes.iter().for_each(keep),
        Message::StateSnapshot(cert) => cert.votes.iter().for_each(keep),
        Message::StateOps(ops) => ops
            .iter()
            .for_each(|(cert, _)| cert.commits.iter().for_each(&mut keep)),
        Message::Status { .. }
        | Message::StateRequest { .. }
        | Message::SnapshotRequest { .. }
        | Message::SnapshotChunk { .. } => {}
    }
}

fn view_change_votes(view_change: &percore_engine::bft::ViewChange, keep: &mut impl FnMut(&Vote)) {
    keep(&view_change.vote);
    if let Some(cert) = &view_change.checkpoint {
        cert.votes.iter().for_each(&mut *keep);
    }
    for entry in &view_change.prepared {
        keep(&entry.cert.pre_prepare);
        entry.cert.prepares.iter().for_each(&mut *keep);
    }
}

/// Re-signs `vote` for another digest with `key` (a Byzantine replica's own key: valid).
fn resign(key: &SigningKey, vote: Vote, digest: Digest) -> Vote {
    Vote::sign(key, 0, vote.kind, vote.replica, vote.view, vote.op, digest)
}

/// The engine's signed batch of `requests` (each with its client's signature).
fn encode_batch(requests: &[Request]) -> Vec<u8> {
    let (mut records, mut descriptors, mut signatures) = (Vec::new(), Vec::new(), Vec::new());
    for request in requests {
        let descriptor = RequestDescriptor {
            client_id: request.client as u128 + 1,
            request_number: request.id & 0xffff_ffff,
            record_start: (records.len() / RECORD_BYTES) as u32,
            record_count: (request.payload.len() / RECORD_BYTES) as u32,
        };
        records.extend_from_slice(&request.payload);
        descriptors.extend_from_slice(bytemuck::bytes_of(&descriptor));
        signatures.extend_from_slice(&request.signature);
    }
    let mut batch = Vec::new();
    batch_encode(OPERATION, &records, &descriptors, &signatures, &mut batch);
    batch
}

/// The `(id, client)` pairs of a batch (none if it is not a batch: a Byzantine leader's
/// may be anything; every correct replica decides the same).
fn decode_batch(batch: &[u8]) -> Vec<(u64, usize)> {
    let Some(parts) = batch_decode(batch) else {
        return Vec::new();
    };
    parts
        .requests
        .chunks_exact(REQUEST_DESCRIPTOR_BYTES)
        .map(|bytes| {
            let descriptor: RequestDescriptor = bytemuck::pod_read_unaligned(bytes);
            let client = descriptor.client_id as u64;
            let id = (client << 32) | (descriptor.request_number & 0xffff_ffff);
            (id, (client as usize).wrapping_sub(1))
        })
        .collect()
}

/// `batch` with a copy of its first request appended (its records and signature), which
/// `change` may alter; `batch` itself if it is not a signed batch.
fn append_first(batch: &[u8], change: impl Fn(&mut RequestDescriptor, &mut [u8])) -> Vec<u8> {
    let Some(parts) = batch_decode(batch).filter(|parts| !parts.signatures.is_empty()) else {
        return batch.to_vec();
    };
    let first: RequestDescriptor =
        bytemuck::pod_read_unaligned(&parts.requests[..REQUEST_DESCRIPTOR_BYTES]);
    let start = first.record_start as usize * RECORD_BYTES;
    let end = start + first.record_count as usize * RECORD_BYTES;
    let mut copied = parts.records[start..end].to_vec();
    let mut descriptor = first;
    descriptor.record_start = (parts.records.len() / RECORD_BYTES) as u32;
    change(&mut descriptor, &mut copied);
    let records = [parts.records, &copied].concat();
    let requests = [parts.requests, bytemuck::bytes_of(&descriptor)].concat();
    let signatures = [
        parts.signatures,
        &parts.signatures[..REQUEST_SIGNATURE_BYTES],
    ]
    .concat();
    let mut out = Vec::new();
    batch_encode(parts.operation, &records, &requests, &signatures, &mut out);
    out
}

/// An equivocating leader's second batch: its first request once more at the end (a valid
/// batch, executed as a duplicate), so correct replicas accept either version.
fn alternate_batch(batch: &[u8]) -> Vec<u8> {
    append_first(batch, |_, _| {})
}

/// A forging leader's batch: a request no client signed appended (the first request with
/// a record changed and a new request number, carrying the first request's signature).
fn forged_batch(batch: &[u8]) -> Vec<u8> {
    append_first(batch, |descriptor, records| {
        descriptor.request_number |= FORGED_REQUEST_BIT;
        records[0] ^= 1;
    })
}
