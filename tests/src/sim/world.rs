//! The simulated cluster: nodes (one per replica × group), connections, the event queue,
//! clients and the fault schedule, and the driver that executes each [`Replica`]'s actions
//! the way `shards/src/replication.rs` does.
//!
//! Everything happens at a simulated time in µs, one event at a time, in `(time, sequence)`
//! order. Doing work takes no simulated time; waiting for the disk and the network does.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::rc::Rc;

use percore_engine::journal::{self, ENTRY_HEADER_BYTES, EntryMeta, JournalChecksum};
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation, LedgerOutbound};
use percore_engine::record::{
    Account, RECORD_BYTES, RecordResult, RecordSlot, Transfer, account_flags, shard_of,
};
use percore_engine::replica::{ACTIONS_MAX, Action, PrepareDisposition, Replica, ReplicaConfig};
use percore_engine::state_machine::StateMachine;

use super::check::CheckState;
use super::disk::{CrashTail, Disk};
use super::rng::{SimRng, splitmix64};
use super::{Bug, Failure, Options, Summary};

/// Records one sealed batch holds at most (the ledger's `batch_entries_max` too).
pub const BATCH_RECORDS_MAX: usize = 16;
/// Batches one group commit holds at most (the runtime's `GROUP_COMMIT_BATCHES_MAX`).
pub const GROUP_COMMIT_BATCHES_MAX: usize = 4;
/// Repair requests queued for the batcher before more are dropped (the runtime's value).
pub const REPAIRS_QUEUED_MAX: usize = 16;
/// Submissions (client requests and internal records) a leader queues before dropping.
pub const SUBMISSIONS_QUEUED_MAX: usize = 256;
/// Leader: unacknowledged credit legs are resent when the oldest did not change for this
/// long (the runtime's `CREDIT_LEG_RESEND_INTERVAL_US`).
pub const CREDIT_LEG_RESEND_INTERVAL_US: u64 = 200_000;
/// Most credit legs resent at once.
pub const CREDIT_LEGS_RESEND_MAX: usize = 1_024;
/// Bounds of the driver's timer sleep (the runtime clamps to 1 ms and `STOP_POLL_MS`).
pub const TIMER_SLEEP_US_MIN: u64 = 1_000;
/// See [`TIMER_SLEEP_US_MIN`].
pub const TIMER_SLEEP_US_MAX: u64 = 50_000;
/// Concurrent clients per group, one request outstanding each.
pub const CLIENTS_PER_GROUP: usize = 2;
/// Transfers per client request, at most.
pub const TRANSFERS_PER_REQUEST_MAX: u64 = 4;
/// Accounts per group.
pub const ACCOUNTS_PER_GROUP: usize = 4;
/// Clients stop sending new requests to a group once it committed this many ops (internal
/// ops go on), so that a run stays below the default pipeline (see `Options`).
pub const CLIENT_OPS_MAX: u64 = 64;
/// A client resends an unanswered request after this long (µs).
pub const CLIENT_RETRY_US: u64 = 300_000;
/// After faults stop, everything must converge within this much simulated time (µs):
/// `docs/protocol.md` section 12, invariant 11.
pub const LIVENESS_BOUND_US: u64 = 10_000_000;
/// Events a trace keeps (without `verbose`).
pub const TRACE_EVENTS_MAX: usize = 48;
/// The table hash seed every replica's ledger uses (replicas must build identical tables).
pub const LEDGER_HASH_SEED: u64 = 0x5EED_1ED6_E400_0001;
/// The ledger's transfer window: larger than any run's transfers, so a retry is always a
/// duplicate (`Exists`) and never applied twice because its id left the window.
pub const LEDGER_TRANSFERS_MAX: usize = 8_192;
/// Accounts a ledger holds at most.
pub const LEDGER_ACCOUNTS_MAX: usize = 64;
/// Credit legs in flight per origin before back-pressure.
pub const LEDGER_CREDIT_LEGS_IN_FLIGHT_MAX: usize = 1_024;

const _: () = assert!(TRANSFERS_PER_REQUEST_MAX as usize <= BATCH_RECORDS_MAX);
const _: () = assert!(ACCOUNTS_PER_GROUP <= BATCH_RECORDS_MAX);
const _: () = assert!(TIMER_SLEEP_US_MIN < TIMER_SLEEP_US_MAX);
const _: () = assert!(CLIENT_RETRY_US * 4 < LIVENESS_BOUND_US);

/// Address of a node: `replica * groups + group`.
pub type NodeIndex = usize;

/// What a message carries: the fields the runtime puts in the header, and the entry bytes.
#[derive(Debug, Clone)]
pub enum Body {
    /// `Prepare` (or `PrepareRepair` when `repair`): one encoded entry.
    Prepare {
        /// The op.
        op: u64,
        /// The sender's `commit_max`.
        commit: u64,
        /// Header and body of the entry, as the journal holds them.
        entry: Rc<[u8]>,
        /// A repair answer rather than a leader's Prepare.
        repair: bool,
    },
    /// `PrepareOk`.
    PrepareOk {
        /// Cumulative durable op.
        op: u64,
        /// Its checksum.
        checksum: JournalChecksum,
        /// Sender's `commit_min`.
        commit_min: u64,
    },
    /// `Commit` heartbeat.
    Commit {
        /// Leader's `commit_max`.
        commit: u64,
        /// Leader's durable head.
        op_head: u64,
    },
    /// `Ping` (or `Pong` when `pong`).
    Ping {
        /// Whether this answers a ping.
        pong: bool,
        /// Sender clock, or the echoed ping time.
        time_us: u64,
        /// Sender's `op_durable`.
        op_durable: u64,
        /// Sender's `commit_min`.
        commit_min: u64,
        /// Sender's `log_view`.
        log_view: u64,
    },
    /// `RequestPrepare`.
    RequestPrepare {
        /// First op.
        op_min: u64,
        /// Last op.
        op_max: u64,
    },
    /// `Forward`: internal records for the group's leader.
    Forward {
        /// Their operation.
        operation: LedgerOperation,
        /// The records.
        records: Vec<RecordSlot>,
    },
}

/// One message on one directed connection of one group.
#[derive(Debug, Clone)]
pub struct Message {
    /// Sending replica.
    pub from: u8,
    /// Receiving replica.
    pub to: u8,
    /// The group (connection).
    pub group: u32,
    /// Sender's view.
    pub view: u64,
    /// What it says.
    pub body: Body,
}

/// Who waits for a record range of a sealed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client request (index into the history).
    Client(usize),
    /// Internal records (credit legs and acknowledgements): nobody waits.
    Internal,
}

/// Records waiting at a leader to be sealed.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Their operation.
    pub operation: LedgerOperation,
    /// The records.
    pub records: Vec<RecordSlot>,
    /// Who waits.
    pub origin: Origin,
}

/// The volatile state of a node that is up: dropped by a crash.
#[derive(Debug)]
pub struct Live {
    /// The sans-IO core.
    pub replica: Replica,
    /// The state machine.
    pub ledger: Ledger,
    actions: Vec<Action>,
    /// Actions that wait for the group commit in flight (the runtime executes the actions
    /// of a follower turn after its commit).
    actions_held: Vec<Action>,
    submissions: VecDeque<Submission>,
    /// Leader: who waits for each op sealed in this incarnation.
    origins: BTreeMap<u64, Vec<(Origin, usize, usize)>>,
    inbound: VecDeque<Message>,
    repairs: VecDeque<(u8, u64, u64)>,
    /// Leader: Prepares staged in the group commit in flight, released once it is durable.
    held: Vec<Message>,
    legs_oldest: Option<JournalChecksum>,
    legs_check_us: u64,
    /// Last values seen by the monotonicity checker.
    pub seen_commit_max: u64,
    /// See `seen_commit_max`.
    pub seen_commit_min: u64,
}

/// One replica of one group.
#[derive(Debug)]
pub struct Node {
    /// Replica index.
    pub replica: u8,
    /// Group.
    pub group: u32,
    /// The journal: survives crashes.
    pub disk: Disk,
    /// `None` while crashed.
    pub live: Option<Live>,
    /// Incarnation: events of an earlier one are ignored.
    pub epoch: u64,
}

/// A directed connection of one group, `from` dials `to`.
#[derive(Debug, Clone, Copy, Default)]
struct Connection {
    up: bool,
    dialing: bool,
    epoch: u64,
}

/// A client request and what became of it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The group it goes to.
    pub group: u32,
    /// Client index within the group (`usize::MAX` for the set-up request).
    pub client: usize,
    /// What it asks.
    pub operation: LedgerOperation,
    /// The records (transfers or accounts).
    pub records: Vec<RecordSlot>,
    /// First send (µs).
    pub invoke_us: u64,
    /// First reply (µs).
    pub ack_us: Option<u64>,
    /// Result codes of the first reply.
    pub results: Vec<u32>,
    /// Sends, retries included.
    pub attempts: u32,
    /// Replies, duplicates included.
    pub replies: u32,
}

#[derive(Debug, Clone)]
enum Event {
    Deliver(Message, u64),
    FsyncDone(NodeIndex, u64),
    Timer(NodeIndex, u64),
    ConnectionUp(u32, u8, u8),
    Mesh(NodeIndex, u64, Submission),
    ClientArrive(usize),
    ClientTimeout(usize, u32),
    ClientNext(u32, usize),
    Fault,
}

#[derive(Debug)]
struct Scheduled {
    time_us: u64,
    sequence: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.time_us, self.sequence) == (other.time_us, other.sequence)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: `BinaryHeap` is a max-heap and the earliest event goes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time_us, other.sequence).cmp(&(self.time_us, self.sequence))
    }
}

/// Random choices of one run that stay fixed for it.
#[derive(Debug, Clone, Copy)]
struct Profile {
    drop_per_million: u64,
    duplicate_per_million: u64,
    slow_link_per_million: u64,
    slow_fsync_per_million: u64,
    fault_interval_us: u64,
    cross_group_per_million: u64,
    pipeline_prepares_max: u64,
}

/// The whole simulated cluster and its checkers.
#[derive(Debug)]
pub struct World {
    pub(super) seed: u64,
    pub(super) options: Options,
    rng: SimRng,
    profile: Profile,
    pub(super) now_us: u64,
    pub(super) step: u64,
    sequence: u64,
    queue: BinaryHeap<Scheduled>,
    pub(super) nodes: Vec<Node>,
    connections: Vec<Connection>,
    /// Partition side of each replica: replicas talk only within a side.
    sides: Vec<u8>,
    pub(super) accounts: Vec<Vec<u128>>,
    pub(super) history: Vec<Request>,
    clients_started: bool,
    /// New requests stop and faults heal once this is set (simulated µs).
    pub(super) healed_at_us: Option<u64>,
    pub(super) check: CheckState,
    trace: VecDeque<String>,
    pub(super) summary: Summary,
    body_bytes_max: usize,
    entry_buffer: Vec<u8>,
    results_buffer: Vec<RecordResult>,
}

impl World {
    /// A cluster for `seed`, all replicas up with empty journals.
    pub fn new(seed: u64, options: Options) -> World {
        assert!(
            options.replicas == 3 || options.replicas == 5,
            "3 or 5 replicas"
        );
        assert!(options.groups == 1 || options.groups == 2, "1 or 2 groups");
        let mut rng = SimRng::new(seed);
        let faults = options.faults;
        let profile = Profile {
            drop_per_million: if faults { rng.range(0, 30_000) } else { 0 },
            duplicate_per_million: if faults { rng.range(0, 30_000) } else { 0 },
            slow_link_per_million: if faults { rng.range(0, 50_000) } else { 0 },
            slow_fsync_per_million: if faults { rng.range(0, 50_000) } else { 0 },
            fault_interval_us: rng.range(20_000, 200_000),
            cross_group_per_million: if options.groups > 1 {
                rng.range(100_000, 600_000)
            } else {
                0
            },
            pipeline_prepares_max: options.pipeline_prepares_max,
        };
        let body_bytes_max = BATCH_RECORDS_MAX * RECORD_BYTES;
        let groups = options.groups as usize;
        let replicas = usize::from(options.replicas);
        let accounts = (0..options.groups)
            .map(|group| accounts_of(group, options.groups))
            .collect();
        let mut world = World {
            seed,
            options,
            rng,
            profile,
            now_us: 0,
            step: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::with_capacity(replicas * groups),
            connections: vec![Connection::default(); groups * replicas * replicas],
            sides: vec![0; replicas],
            accounts,
            history: Vec::new(),
            clients_started: false,
            healed_at_us: None,
            check: CheckState::new(options.groups, body_bytes_max),
            trace: VecDeque::new(),
            summary: Summary::default(),
            body_bytes_max,
            entry_buffer: vec![0; journal::entry_bytes_padded(body_bytes_max)],
            results_buffer: vec![<RecordResult as bytemuck::Zeroable>::zeroed(); BATCH_RECORDS_MAX],
        };
        for replica in 0..options.replicas {
            for group in 0..options.groups {
                world.nodes.push(Node {
                    replica,
                    group,
                    disk: Disk::new(body_bytes_max),
                    live: None,
                    epoch: 0,
                });
            }
        }
        for index in 0..world.nodes.len() {
            world.node_start(index);
        }
        world.topology_changed();
        for group in 0..options.groups {
            world.setup_request(group);
        }
        if faults {
            let delay = world.profile.fault_interval_us;
            world.schedule(delay, Event::Fault);
        }
        world.trace_line(format!(
            "start: seed {seed}, {replicas} replicas, {groups} groups, {:?}",
            world.profile
        ));
        world
    }

    /// Runs to the end: the faulty phase of `options.steps` events, then healing, then the
    /// liveness bound. Checkers run after every event.
    pub fn run(mut self) -> Result<Summary, Box<Failure>> {
        loop {
            if self.healed_at_us.is_none() && self.step >= self.options.steps {
                self.heal();
            }
            let Some(scheduled) = self.queue.pop() else {
                return Err(self.fail("liveness", "the event queue ran dry".to_string()));
            };
            debug_assert!(scheduled.time_us >= self.now_us, "time never goes back");
            self.now_us = scheduled.time_us;
            self.step += 1;
            self.handle(scheduled.event);
            if let Err((checker, message)) = self.check_step() {
                return Err(self.fail(checker, message));
            }
            if let Some(healed_at_us) = self.healed_at_us {
                if self.converged() {
                    if let Err((checker, message)) = self.check_end() {
                        return Err(self.fail(checker, message));
                    }
                    self.summary.steps = self.step;
                    self.summary.time_us = self.now_us;
                    self.summary.view_change_actions_dropped = self.check.view_change_actions;
                    return Ok(self.summary);
                }
                if self.now_us > healed_at_us + LIVENESS_BOUND_US {
                    let message = self.liveness_report();
                    return Err(self.fail("liveness", message));
                }
            }
        }
    }

    pub(super) fn fail(&self, checker: &'static str, message: String) -> Box<Failure> {
        Box::new(Failure {
            seed: self.seed,
            step: self.step,
            time_us: self.now_us,
            checker,
            message,
            trace: self.trace.iter().cloned().collect(),
        })
    }

    fn trace_line(&mut self, line: String) {
        if !self.options.verbose && self.trace.len() >= TRACE_EVENTS_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>10} {line}", self.now_us));
    }

    fn schedule(&mut self, delay_us: u64, event: Event) {
        self.sequence += 1;
        self.queue.push(Scheduled {
            time_us: self.now_us + delay_us,
            sequence: self.sequence,
            event,
        });
    }

    pub(super) fn node_index(&self, replica: u8, group: u32) -> NodeIndex {
        usize::from(replica) * self.options.groups as usize + group as usize
    }

    pub(super) fn leader_of(&self, group: u32) -> u8 {
        (group % u32::from(self.options.replicas)) as u8
    }

    fn connection_index(&self, group: u32, from: u8, to: u8) -> usize {
        let replicas = usize::from(self.options.replicas);
        (group as usize * replicas + usize::from(from)) * replicas + usize::from(to)
    }

    fn replica_up(&self, replica: u8) -> bool {
        self.nodes[self.node_index(replica, 0)].live.is_some()
    }

    // ---------------------------------------------------------------------------------
    // Events.

    fn handle(&mut self, event: Event) {
        let line = describe(&event, self.options.groups);
        self.trace_line(line);
        match event {
            Event::Deliver(message, epoch) => self.deliver(message, epoch),
            Event::FsyncDone(node, epoch) => {
                if self.nodes[node].epoch == epoch && self.nodes[node].live.is_some() {
                    self.fsync_done(node);
                }
            }
            Event::Timer(node, epoch) => {
                if self.nodes[node].epoch == epoch && self.nodes[node].live.is_some() {
                    self.timer(node);
                }
            }
            Event::ConnectionUp(group, from, to) => self.connection_up(group, from, to),
            Event::Mesh(node, epoch, submission) => {
                if self.nodes[node].epoch == epoch {
                    self.submit(node, submission);
                }
            }
            Event::ClientArrive(request) => self.client_arrive(request),
            Event::ClientTimeout(request, attempt) => self.client_timeout(request, attempt),
            Event::ClientNext(group, client) => self.client_next(group, client),
            Event::Fault => self.fault(),
        }
    }

    // ---------------------------------------------------------------------------------
    // Nodes: start, crash, restart.

    /// Starts (or restarts) a node from its journal, as the runtime does: recover, replay
    /// everything into a fresh ledger, `Replica::new` at the head, resend unconfirmed legs.
    fn node_start(&mut self, index: NodeIndex) {
        let (replica_index, group) = (self.nodes[index].replica, self.nodes[index].group);
        let mut ledger = Ledger::with_hash_seed(self.ledger_config(group), LEDGER_HASH_SEED);
        let mut replayed: Vec<(u64, percore_engine::checksum::Digest256)> = Vec::new();
        let recovered = {
            let results = &mut self.results_buffer;
            self.nodes[index].disk.recover(|op, operation, body| {
                let operation = LedgerOperation::try_from(operation).expect("ledger operation");
                let records: Vec<RecordSlot> = bytemuck::pod_collect_to_vec(body);
                ledger.apply(op, operation, &records, &mut results[..records.len()]);
                while ledger.poll_outbound().is_some() {}
                if super::check::digest_sampled(op) {
                    replayed.push((op, ledger.digest()));
                }
            })
        };
        if matches!(recovered.tail, journal::Tail::Torn { .. }) {
            self.summary.torn_tails += 1;
        }
        for (op, digest) in replayed {
            self.check.digest_observed(group, op, digest, replica_index);
        }
        let mut seed_mix = self.seed ^ (u64::from(replica_index) << 32) ^ u64::from(group);
        let mut config = ReplicaConfig::new(
            group,
            replica_index,
            self.options.replicas,
            splitmix64(&mut seed_mix),
        )
        .expect("valid replica config");
        config.pipeline_prepares_max = self.profile.pipeline_prepares_max;
        // As the runtime: the last ops' checksums let acknowledgements of the recovered
        // tail count, so it commits without waiting for a new op.
        let recent = self.nodes[index]
            .disk
            .recent_checksums(2 * config.pipeline_prepares_max as usize);
        let persisted = percore_engine::replica::Persisted {
            view: config.view,
            log_view: config.view,
        };
        let replica = Replica::restart(
            config,
            persisted,
            recovered.op_last,
            recovered.checksum_last,
            recovered.op_last,
            &recent,
            self.now_us,
        )
        .expect("valid replica config");
        let mut unconfirmed = Vec::new();
        ledger.unconfirmed_outbound(&mut |outbound| unconfirmed.push(outbound));
        let node = &mut self.nodes[index];
        node.epoch += 1;
        node.live = Some(Live {
            seen_commit_max: replica.commit_max(),
            seen_commit_min: replica.commit_min(),
            replica,
            ledger,
            actions: Vec::with_capacity(ACTIONS_MAX),
            actions_held: Vec::with_capacity(ACTIONS_MAX),
            submissions: VecDeque::new(),
            origins: BTreeMap::new(),
            inbound: VecDeque::new(),
            repairs: VecDeque::new(),
            held: Vec::new(),
            legs_oldest: None,
            legs_check_us: self.now_us,
        });
        let epoch = node.epoch;
        self.trace_line(format!(
            "node r{replica_index}g{group} start: recovered op {} ({:?}), {} legs to resend",
            recovered.op_last,
            recovered.tail,
            unconfirmed.len()
        ));
        // The runtime sends unconfirmed legs at start-up, from every replica.
        for outbound in unconfirmed {
            self.route_outbound(replica_index, outbound);
        }
        self.schedule(0, Event::Timer(index, epoch));
    }

    fn ledger_config(&self, group: u32) -> LedgerConfig {
        let mut config = LedgerConfig::new(group, self.options.groups);
        config.accounts_max = LEDGER_ACCOUNTS_MAX;
        config.transfers_max = LEDGER_TRANSFERS_MAX;
        config.credit_legs_in_flight_max = LEDGER_CREDIT_LEGS_IN_FLIGHT_MAX;
        config.batch_entries_max = BATCH_RECORDS_MAX;
        config
    }

    /// A replica's process dies: every group's volatile state goes, unsynced bytes may be
    /// lost or torn.
    fn crash(&mut self, replica: u8) {
        self.summary.crashes += 1;
        for group in 0..self.options.groups {
            let index = self.node_index(replica, group);
            let faults = self.options.faults;
            let node = &mut self.nodes[index];
            let unsynced = node.disk.op_head() - node.disk.op_durable();
            node.live = None;
            node.epoch += 1;
            let tail = node.disk.crash(&mut self.rng, faults);
            let head = node.disk.op_head();
            self.trace_line(format!(
                "node r{replica}g{group} CRASH: {unsynced} unsynced ops, {tail:?}, head now {head}"
            ));
            if tail != CrashTail::Nothing {
                self.check.note_crash_loss(group);
            }
        }
        self.topology_changed();
    }

    fn restart(&mut self, replica: u8) {
        for group in 0..self.options.groups {
            let index = self.node_index(replica, group);
            self.node_start(index);
        }
        self.topology_changed();
    }

    // ---------------------------------------------------------------------------------
    // Connections and the network.

    fn reachable(&self, a: u8, b: u8) -> bool {
        self.sides[usize::from(a)] == self.sides[usize::from(b)]
    }

    /// Brings every connection in line with who is up and who can reach whom: the sender
    /// notices a broken connection at once; a new one comes up after a dial delay.
    fn topology_changed(&mut self) {
        for group in 0..self.options.groups {
            for from in 0..self.options.replicas {
                for to in 0..self.options.replicas {
                    if from == to {
                        continue;
                    }
                    let possible =
                        self.replica_up(from) && self.replica_up(to) && self.reachable(from, to);
                    let index = self.connection_index(group, from, to);
                    let connection = self.connections[index];
                    if connection.up && !possible {
                        self.connections[index].up = false;
                        self.connections[index].epoch += 1;
                        let node = self.node_index(from, group);
                        if let Some(live) = self.nodes[node].live.as_mut() {
                            live.replica.on_connection(to, false);
                        }
                    } else if !connection.up && possible && !connection.dialing {
                        self.connections[index].dialing = true;
                        let delay = self.rng.range(1_000, 30_000);
                        self.schedule(delay, Event::ConnectionUp(group, from, to));
                    }
                }
            }
        }
    }

    fn connection_up(&mut self, group: u32, from: u8, to: u8) {
        let index = self.connection_index(group, from, to);
        self.connections[index].dialing = false;
        let possible = self.replica_up(from) && self.replica_up(to) && self.reachable(from, to);
        if !possible || self.connections[index].up {
            return;
        }
        self.connections[index].up = true;
        let node = self.node_index(from, group);
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.replica.on_connection(to, true);
        }
        // A fresh connection gives the batcher a chance (held work, repairs).
        self.batcher_turn(node);
    }

    fn connected(&self, group: u32, from: u8, to: u8) -> bool {
        self.connections[self.connection_index(group, from, to)].up
    }

    /// Puts a message on its connection: `false` (dropped) if the connection is down, as
    /// the runtime's outbox refuses. Faults: delay, loss, duplication (so also reordering).
    fn send(&mut self, message: Message) -> bool {
        let index = self.connection_index(message.group, message.from, message.to);
        let connection = self.connections[index];
        if !connection.up {
            self.summary.messages_dropped += 1;
            return false;
        }
        if self.rng.chance(self.profile.drop_per_million) {
            self.summary.messages_dropped += 1;
            return true;
        }
        let copies = if self.rng.chance(self.profile.duplicate_per_million) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.chance(self.profile.slow_link_per_million) {
                self.rng.range(5_000, 60_000)
            } else {
                self.rng.range(50, 800)
            };
            self.schedule(delay, Event::Deliver(message.clone(), connection.epoch));
        }
        true
    }

    fn deliver(&mut self, message: Message, epoch: u64) {
        let index = self.connection_index(message.group, message.from, message.to);
        if !self.connections[index].up || self.connections[index].epoch != epoch {
            // The connection broke while the message was on it.
            self.summary.messages_dropped += 1;
            return;
        }
        let node = self.node_index(message.to, message.group);
        self.dispatch(node, message);
    }

    // ---------------------------------------------------------------------------------
    // The driver: `dispatch`, `execute`, the batcher turn (replication.rs).

    /// One received message (the runtime's `dispatch`).
    fn dispatch(&mut self, node: NodeIndex, message: Message) {
        let now_us = self.now_us;
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let mut actions = std::mem::take(&mut live.actions);
        actions.clear();
        let from = message.from;
        match message.body {
            Body::Prepare { .. } => {
                live.inbound.push_back(message);
            }
            Body::PrepareOk {
                op,
                checksum,
                commit_min,
            } => {
                // The latency sample it returns is for metrics only.
                let _ = live.replica.on_prepare_ok(
                    now_us,
                    from,
                    message.view,
                    op,
                    checksum,
                    commit_min,
                );
            }
            Body::Commit { commit, op_head } => {
                live.replica
                    .on_commit(now_us, from, message.view, commit, op_head, &mut actions);
            }
            Body::Ping {
                pong: false,
                time_us,
                op_durable,
                commit_min,
                log_view,
            } => live.replica.on_ping(
                from,
                time_us,
                op_durable,
                commit_min,
                log_view,
                &mut actions,
            ),
            Body::Ping {
                pong: true,
                time_us,
                op_durable,
                commit_min,
                log_view,
            } => live.replica.on_pong(
                now_us,
                from,
                time_us,
                op_durable,
                commit_min,
                log_view,
                &mut actions,
            ),
            Body::RequestPrepare { op_min, op_max } => {
                live.replica
                    .on_request_prepare(from, op_min, op_max, &mut actions);
            }
            Body::Forward { operation, records } => {
                // Accepted only by the group's leader; the origin resends otherwise.
                if live.replica.is_leader() {
                    for record in records {
                        if live.submissions.len() < SUBMISSIONS_QUEUED_MAX {
                            live.submissions.push_back(Submission {
                                operation,
                                records: vec![record],
                                origin: Origin::Internal,
                            });
                        }
                    }
                }
            }
        }
        self.execute(node, &actions);
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.actions = actions;
        }
        self.batcher_turn(node);
    }

    /// Carries out a core's actions. One `match`: a new `Action` variant is one new arm.
    fn execute(&mut self, node: NodeIndex, actions: &[Action]) {
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let view = live.replica.view();
        let mut messages = Vec::new();
        for action in actions {
            let (to, body) = match *action {
                Action::PrepareOk {
                    to,
                    op,
                    checksum,
                    commit_min,
                } => (
                    to,
                    Body::PrepareOk {
                        op,
                        checksum,
                        commit_min,
                    },
                ),
                Action::Commit {
                    to,
                    commit,
                    op_head,
                } => (to, Body::Commit { commit, op_head }),
                Action::Ping {
                    to,
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                } => (
                    to,
                    Body::Ping {
                        pong: false,
                        time_us,
                        op_durable,
                        commit_min,
                        log_view,
                    },
                ),
                Action::Pong {
                    to,
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                } => (
                    to,
                    Body::Ping {
                        pong: true,
                        time_us,
                        op_durable,
                        commit_min,
                        log_view,
                    },
                ),
                Action::RequestPrepare { to, op_min, op_max } => {
                    (to, Body::RequestPrepare { op_min, op_max })
                }
                Action::ServeRepair { to, op_min, op_max } => {
                    if live.repairs.len() < REPAIRS_QUEUED_MAX {
                        live.repairs.push_back((to, op_min, op_max));
                    }
                    continue;
                }
                // View change (docs/protocol.md section 7) is not driven yet: the simulator
                // runs the fixed view. Its actions are counted; a truncation in the fixed
                // view breaks "no replica truncates" and fails the run.
                Action::Persist { .. } => {
                    self.check.view_change_actions += 1;
                    continue;
                }
                Action::Truncate { op } => {
                    self.check.truncated = Some((replica, group, op));
                    continue;
                }
                Action::PreVote { .. }
                | Action::PreVoteReply { .. }
                | Action::StartViewChange { .. }
                | Action::DoViewChange { .. }
                | Action::StartView { .. }
                | Action::RequestStartView { .. } => {
                    self.check.view_change_actions += 1;
                    continue;
                }
            };
            messages.push(Message {
                from: replica,
                to,
                group,
                view,
                body,
            });
        }
        for message in messages {
            self.send(message);
        }
    }

    /// One batcher turn (the runtime's `replicated_turn`), repeated while it has work.
    /// Returns at a group commit in flight; [`World::fsync_done`] carries on.
    fn batcher_turn(&mut self, node: NodeIndex) {
        // Bounded: every pass either stages something (finite submissions and inbound) or
        // stops.
        loop {
            let Some(live) = self.nodes[node].live.as_ref() else {
                return;
            };
            if self.nodes[node].disk.fsync_busy() {
                return;
            }
            let leader = live.replica.is_leader();
            let staged = if leader {
                self.leader_prepare(node)
            } else {
                self.follower_append(node)
            };
            if staged {
                return;
            }
            self.serve_repairs(node);
            self.apply_committed(node);
            let Some(live) = self.nodes[node].live.as_ref() else {
                return;
            };
            let more = if leader {
                !live.submissions.is_empty() && live.replica.can_seal()
            } else {
                !live.inbound.is_empty()
            };
            if !more {
                return;
            }
        }
    }

    /// Leader: seals batches, stages them, holds their Prepares, starts the group commit.
    /// Returns whether a group commit started.
    fn leader_prepare(&mut self, node: NodeIndex) -> bool {
        let now_us = self.now_us;
        let (replica_index, group) = (self.nodes[node].replica, self.nodes[node].group);
        let bug = self.options.bug;
        let mut sealed = 0;
        let mut prepares = Vec::new();
        let peers: Vec<u8> = (0..self.options.replicas)
            .filter(|peer| *peer != replica_index && self.connected(group, replica_index, *peer))
            .collect();
        while sealed < GROUP_COMMIT_BATCHES_MAX {
            let n = &mut self.nodes[node];
            let Some(live) = n.live.as_mut() else {
                return false;
            };
            if !live.replica.can_seal() || live.submissions.is_empty() {
                break;
            }
            let (operation, mut records, origins) = seal(&mut live.submissions);
            live.ledger.prepare(operation, now_us * 1_000, &mut records);
            let op = n.disk.op_head() + 1;
            let view = live.replica.view();
            let meta = EntryMeta {
                shard: group,
                view,
                op,
                operation: operation.into(),
                entry_count: records.len() as u32,
                record_bytes: RECORD_BYTES as u32,
            };
            let body: &[u8] = bytemuck::cast_slice(&records);
            let checksum_previous = n.disk.checksum_head();
            let (padded, checksum) =
                journal::encode_entry(&mut self.entry_buffer, &meta, body, checksum_previous);
            let entry: Rc<[u8]> = Rc::from(&self.entry_buffer[..ENTRY_HEADER_BYTES + body.len()]);
            let staged = n
                .disk
                .stage(&entry, padded)
                .expect("the leader's own entry continues its journal");
            debug_assert_eq!(staged, checksum);
            live.replica.on_staged(now_us, op, checksum);
            live.origins.insert(op, origins);
            let commit = live.replica.commit_max();
            if self.options.verbose {
                self.trace.push_back(format!(
                    "{:>10} r{replica_index}g{group} seals op {op}: {operation:?} x{}",
                    now_us,
                    records.len()
                ));
            }
            for peer in peers.iter().copied() {
                live.replica.note_sent(peer, now_us);
                prepares.push(Message {
                    from: replica_index,
                    to: peer,
                    group,
                    view,
                    body: Body::Prepare {
                        op,
                        commit,
                        entry: entry.clone(),
                        repair: false,
                    },
                });
            }
            sealed += 1;
        }
        if sealed == 0 {
            return false;
        }
        if bug == Some(Bug::SendBeforeDurable) {
            for message in prepares {
                self.send(message);
            }
        } else {
            let live = self.nodes[node].live.as_mut().expect("live");
            live.held.extend(prepares);
        }
        self.fsync_start(node);
        true
    }

    /// Starts the group commit of everything staged; it completes after a simulated
    /// fsync latency (sometimes slow).
    fn fsync_start(&mut self, node: NodeIndex) {
        self.nodes[node].disk.fsync_start();
        let latency = if self.rng.chance(self.profile.slow_fsync_per_million) {
            self.rng.range(10_000, 80_000)
        } else {
            self.rng.range(100, 2_000)
        };
        let epoch = self.nodes[node].epoch;
        self.schedule(latency, Event::FsyncDone(node, epoch));
    }

    /// The group commit finished: the core learns what is durable, held Prepares go out
    /// (leader), held acknowledgements go out (follower), and the turn carries on.
    fn fsync_done(&mut self, node: NodeIndex) {
        let now_us = self.now_us;
        let durable = self.nodes[node].disk.fsync_done();
        let live = self.nodes[node].live.as_mut().expect("live");
        let mut actions = std::mem::take(&mut live.actions_held);
        live.replica.on_durable(now_us, durable, &mut actions);
        let held = std::mem::take(&mut live.held);
        for message in held {
            // The outbox was cleared if the connection broke while they were held.
            if self.connected(message.group, message.from, message.to) {
                self.send(message);
            }
        }
        self.execute(node, &actions);
        actions.clear();
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.actions_held = actions;
        }
        self.serve_repairs(node);
        self.apply_committed(node);
        self.batcher_turn(node);
    }

    /// Follower: stages what arrived, in order, after checking the chain; starts the group
    /// commit. Returns whether one started.
    fn follower_append(&mut self, node: NodeIndex) -> bool {
        let now_us = self.now_us;
        let bug = self.options.bug;
        let group = self.nodes[node].group;
        let mut staged = 0;
        let mut actions = {
            let Some(live) = self.nodes[node].live.as_mut() else {
                return false;
            };
            std::mem::take(&mut live.actions_held)
        };
        actions.clear();
        loop {
            let live = self.nodes[node].live.as_mut().expect("live");
            let Some(message) = live.inbound.pop_front() else {
                break;
            };
            let Body::Prepare {
                op,
                commit,
                entry,
                repair,
            } = message.body
            else {
                continue;
            };
            let disposition = live.replica.on_prepare(
                now_us,
                message.from,
                message.view,
                op,
                commit,
                repair,
                &mut actions,
            );
            if disposition != PrepareDisposition::Append {
                continue;
            }
            // The journal verifies the entry and the chain; a refused entry is dropped.
            let valid = journal::decode_entry(&entry, self.body_bytes_max)
                .is_ok_and(|decoded| decoded.meta.op == op && decoded.meta.shard == group);
            if !valid {
                self.check.refused += 1;
                continue;
            }
            let padded = journal::entry_bytes_padded(entry.len() - ENTRY_HEADER_BYTES);
            let checksum = match self.nodes[node].disk.stage(&entry, padded) {
                Ok(checksum) => checksum,
                Err(error) => {
                    self.check.refused += 1;
                    self.trace_line(format!(
                        "node r{}g{group} refused op {op}: {error}",
                        self.nodes[node].replica
                    ));
                    continue;
                }
            };
            let live = self.nodes[node].live.as_mut().expect("live");
            live.replica.on_staged(now_us, op, checksum);
            if bug == Some(Bug::AckBeforeDurable) {
                live.replica.on_durable(now_us, op, &mut actions);
            }
            staged += 1;
        }
        if staged == 0 || bug == Some(Bug::AckBeforeDurable) {
            self.execute(node, &actions);
            actions.clear();
        }
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.actions_held = actions;
        }
        if staged > 0 {
            self.fsync_start(node);
            return true;
        }
        false
    }

    /// Serves queued repair requests from the durable journal, oldest op first.
    fn serve_repairs(&mut self, node: NodeIndex) {
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        loop {
            let Some(live) = self.nodes[node].live.as_mut() else {
                return;
            };
            let Some((to, op_min, op_max)) = live.repairs.pop_front() else {
                return;
            };
            let commit = live.replica.commit_max();
            let view = live.replica.view();
            let op_max = op_max.min(self.nodes[node].disk.op_durable());
            for op in op_min..=op_max {
                let entry: Rc<[u8]> =
                    Rc::from(self.nodes[node].disk.entry(op).expect("durable entry"));
                let message = Message {
                    from: replica,
                    to,
                    group,
                    view,
                    body: Body::Prepare {
                        op,
                        commit,
                        entry,
                        repair: true,
                    },
                };
                if !self.send(message) {
                    break;
                }
            }
        }
    }

    /// Applies every committed op held here; the leader answers clients and routes legs.
    fn apply_committed(&mut self, node: NodeIndex) {
        let (replica_index, group) = (self.nodes[node].replica, self.nodes[node].group);
        loop {
            let n = &mut self.nodes[node];
            let Some(live) = n.live.as_mut() else {
                return;
            };
            let limit = live.replica.apply_limit();
            let op = live.replica.commit_min() + 1;
            if op > limit {
                return;
            }
            let entry = n.disk.entry(op).expect("durable entry");
            let decoded = journal::decode_entry(entry, self.body_bytes_max).expect("verified");
            let operation =
                LedgerOperation::try_from(decoded.meta.operation).expect("ledger operation");
            let records: Vec<RecordSlot> = bytemuck::pod_collect_to_vec(decoded.body);
            let results = &mut self.results_buffer[..records.len()];
            live.ledger.apply(op, operation, &records, results);
            live.replica.on_applied(op);
            let leader = live.replica.is_leader();
            let digest = super::check::digest_sampled(op).then(|| live.ledger.digest());
            let origins = if leader {
                live.origins.remove(&op).unwrap_or_default()
            } else {
                Vec::new()
            };
            let mut outbound = Vec::new();
            while let Some(message) = live.ledger.poll_outbound() {
                if leader {
                    outbound.push(message);
                }
            }
            let codes: Vec<u32> = self.results_buffer[..records.len()]
                .iter()
                .map(|result| result.code)
                .collect();
            if let Some(digest) = digest {
                self.check.digest_observed(group, op, digest, replica_index);
            }
            for (origin, first, count) in origins {
                if let Origin::Client(request) = origin {
                    self.client_reply(request, &codes[first..first + count]);
                }
            }
            for message in outbound {
                self.route_outbound(replica_index, message);
            }
        }
    }

    /// A credit leg or acknowledgement leaves `replica`'s shard for group `outbound.shard`:
    /// over the local mesh if this replica leads that group, else as `Forward` to its leader.
    fn route_outbound(&mut self, replica: u8, outbound: LedgerOutbound) {
        let target = outbound.shard;
        let node = self.node_index(replica, target);
        let Some(live) = self.nodes[node].live.as_ref() else {
            return;
        };
        let submission = Submission {
            operation: outbound.operation,
            records: vec![outbound.record],
            origin: Origin::Internal,
        };
        if live.replica.is_leader() {
            let epoch = self.nodes[node].epoch;
            self.schedule(1, Event::Mesh(node, epoch, submission));
            return;
        }
        let leader = live.replica.leader();
        let view = live.replica.view();
        self.send(Message {
            from: replica,
            to: leader,
            group: target,
            view,
            body: Body::Forward {
                operation: submission.operation,
                records: submission.records,
            },
        });
    }

    /// Records reach a leader (client request, mesh, forward).
    fn submit(&mut self, node: NodeIndex, submission: Submission) {
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        if !live.replica.is_leader() || live.submissions.len() >= SUBMISSIONS_QUEUED_MAX {
            return;
        }
        live.submissions.push_back(submission);
        self.batcher_turn(node);
    }

    /// The driver's timer: `tick`, credit-leg resends, then sleep until the core's next
    /// deadline (clamped as the runtime does).
    fn timer(&mut self, node: NodeIndex) {
        let now_us = self.now_us;
        let live = self.nodes[node].live.as_mut().expect("live");
        let mut actions = std::mem::take(&mut live.actions);
        actions.clear();
        live.replica.tick(now_us, &mut actions);
        self.execute(node, &actions);
        self.resend_credit_legs(node);
        let live = self.nodes[node].live.as_mut().expect("live");
        live.actions = actions;
        let sleep_us = live
            .replica
            .poll_timeout()
            .saturating_sub(now_us)
            .clamp(TIMER_SLEEP_US_MIN, TIMER_SLEEP_US_MAX);
        let epoch = self.nodes[node].epoch;
        self.schedule(sleep_us, Event::Timer(node, epoch));
        self.batcher_turn(node);
    }

    /// Leader: resends every unacknowledged leg when the oldest did not change for an
    /// interval (the runtime's `resend_credit_legs`).
    fn resend_credit_legs(&mut self, node: NodeIndex) {
        let now_us = self.now_us;
        let replica_index = self.nodes[node].replica;
        let live = self.nodes[node].live.as_mut().expect("live");
        if now_us < live.legs_check_us + CREDIT_LEG_RESEND_INTERVAL_US {
            return;
        }
        live.legs_check_us = now_us;
        let ready = live.replica.is_leader() && live.replica.commit_min() >= live.replica.op_head();
        if !ready {
            live.legs_oldest = None;
            return;
        }
        let mut legs = Vec::new();
        live.ledger.unconfirmed_outbound(&mut |outbound| {
            if legs.len() < CREDIT_LEGS_RESEND_MAX {
                legs.push(outbound);
            }
        });
        let oldest = legs
            .first()
            .map(|leg| journal::journal_checksum(bytemuck::bytes_of(&leg.record)));
        let stalled = oldest.is_some() && oldest == live.legs_oldest;
        live.legs_oldest = oldest;
        if !stalled {
            return;
        }
        for leg in legs {
            self.route_outbound(replica_index, leg);
        }
    }

    // ---------------------------------------------------------------------------------
    // Clients.

    fn setup_request(&mut self, group: u32) {
        let records = self.accounts[group as usize]
            .iter()
            .map(|id| {
                RecordSlot::from_account(&Account {
                    id: *id,
                    ledger: 1,
                    code: 1,
                    flags: account_flags::ALLOW_NEGATIVE,
                    ..bytemuck::Zeroable::zeroed()
                })
            })
            .collect();
        self.request_new(group, usize::MAX, LedgerOperation::CreateAccounts, records);
    }

    fn request_new(
        &mut self,
        group: u32,
        client: usize,
        operation: LedgerOperation,
        records: Vec<RecordSlot>,
    ) {
        let request = self.history.len();
        self.history.push(Request {
            group,
            client,
            operation,
            records,
            invoke_us: self.now_us,
            ack_us: None,
            results: Vec::new(),
            attempts: 0,
            replies: 0,
        });
        self.client_send(request);
    }

    fn client_send(&mut self, request: usize) {
        self.history[request].attempts += 1;
        let attempt = self.history[request].attempts;
        let delay = self.rng.range(20, 500);
        self.schedule(delay, Event::ClientArrive(request));
        self.schedule(CLIENT_RETRY_US, Event::ClientTimeout(request, attempt));
    }

    /// The request reaches the group's leader (clients talk to it directly, outside the
    /// replica network). Lost if the leader is down.
    fn client_arrive(&mut self, request: usize) {
        if self.history[request].ack_us.is_some() {
            return;
        }
        let group = self.history[request].group;
        let leader = self.node_index(self.leader_of(group), group);
        let submission = Submission {
            operation: self.history[request].operation,
            records: self.history[request].records.clone(),
            origin: Origin::Client(request),
        };
        self.submit(leader, submission);
    }

    fn client_timeout(&mut self, request: usize, attempt: u32) {
        let state = &self.history[request];
        if state.ack_us.is_none() && state.attempts == attempt {
            self.client_send(request);
        }
    }

    fn client_reply(&mut self, request: usize, codes: &[u32]) {
        let now_us = self.now_us;
        let state = &mut self.history[request];
        state.replies += 1;
        if state.ack_us.is_some() {
            return;
        }
        state.ack_us = Some(now_us);
        state.results = codes.to_vec();
        let line = format!("request {request} acknowledged: {codes:?}");
        self.trace_line(line);
        let state = &self.history[request];
        self.summary.requests += 1;
        let (group, client) = (state.group, state.client);
        self.check
            .client_acknowledged(request, &self.history[request]);
        if client == usize::MAX {
            self.clients_maybe_start();
        } else if self.healed_at_us.is_none() {
            let think = self.rng.range(0, 5_000);
            self.schedule(think, Event::ClientNext(group, client));
        }
    }

    /// Transfer clients start once every group's accounts exist (so no leg is parked).
    fn clients_maybe_start(&mut self) {
        let setups_done = self
            .history
            .iter()
            .filter(|request| request.client == usize::MAX)
            .all(|request| request.ack_us.is_some());
        if !setups_done || self.clients_started {
            return;
        }
        self.clients_started = true;
        for group in 0..self.options.groups {
            for client in 0..CLIENTS_PER_GROUP {
                self.schedule(0, Event::ClientNext(group, client));
            }
        }
    }

    fn client_next(&mut self, group: u32, client: usize) {
        if self.healed_at_us.is_some() || self.check.group_commit[group as usize] >= CLIENT_OPS_MAX
        {
            return;
        }
        self.request_transfers(group, client);
    }

    /// A new request of random transfers debiting `group`'s accounts.
    fn request_transfers(&mut self, group: u32, client: usize) {
        let count = self.rng.range(1, TRANSFERS_PER_REQUEST_MAX);
        let request = self.history.len() as u128;
        let mut records = Vec::new();
        for index in 0..count {
            let debit =
                self.accounts[group as usize][self.rng.below(ACCOUNTS_PER_GROUP as u64) as usize];
            let credit_group = if self.rng.chance(self.profile.cross_group_per_million) {
                (group + 1) % self.options.groups
            } else {
                group
            };
            let credit = loop {
                let candidate = self.accounts[credit_group as usize]
                    [self.rng.below(ACCOUNTS_PER_GROUP as u64) as usize];
                if candidate != debit {
                    break candidate;
                }
            };
            records.push(RecordSlot::from_transfer(&Transfer {
                id: (request << 8) | u128::from(index) | (1 << 100),
                debit_account_id: debit,
                credit_account_id: credit,
                amount: u128::from(self.rng.range(1, 1_000)),
                ledger: 1,
                code: 1,
                ..bytemuck::Zeroable::zeroed()
            }));
        }
        self.request_new(group, client, LedgerOperation::CreateTransfers, records);
    }

    // ---------------------------------------------------------------------------------
    // Faults.

    fn fault(&mut self) {
        if self.healed_at_us.is_some() {
            return;
        }
        let replicas = self.options.replicas;
        let down: Vec<u8> = (0..replicas).filter(|r| !self.replica_up(*r)).collect();
        let draw = self.rng.below(100);
        if draw < 30 {
            // Crash: prefer a replica with unsynced entries (a group commit in flight):
            // that is when a lost write can hurt.
            let up: Vec<u8> = (0..replicas).filter(|r| self.replica_up(*r)).collect();
            let busy: Vec<u8> = up
                .iter()
                .copied()
                .filter(|r| {
                    (0..self.options.groups).any(|g| {
                        let node = &self.nodes[self.node_index(*r, g)];
                        node.disk.has_unsynced()
                    })
                })
                .collect();
            let pool = if !busy.is_empty() && self.rng.chance(700_000) {
                busy
            } else {
                up
            };
            if !pool.is_empty() && down.len() < usize::from(replicas) - 1 {
                let victim = pool[self.rng.below(pool.len() as u64) as usize];
                self.crash(victim);
            }
        } else if draw < 60 {
            if !down.is_empty() {
                let replica = down[self.rng.below(down.len() as u64) as usize];
                self.trace_line(format!("replica {replica} RESTART"));
                self.restart(replica);
            }
        } else if draw < 75 {
            self.summary.partitions += 1;
            if self.rng.chance(500_000) {
                let isolated = self.rng.below(u64::from(replicas)) as usize;
                self.sides.iter_mut().for_each(|side| *side = 0);
                self.sides[isolated] = 1;
            } else {
                for side in self.sides.iter_mut() {
                    *side = self.rng.below(2) as u8;
                }
            }
            self.trace_line(format!("PARTITION sides {:?}", self.sides));
            self.topology_changed();
        } else if draw < 90 {
            self.sides.iter_mut().for_each(|side| *side = 0);
            self.trace_line("HEAL partition".to_string());
            self.topology_changed();
        }
        let delay = self.rng.range(
            self.profile.fault_interval_us / 2,
            self.profile.fault_interval_us * 2,
        );
        self.schedule(delay, Event::Fault);
    }

    /// Faults stop: partitions heal, crashed replicas restart, links and disks behave.
    fn heal(&mut self) {
        self.healed_at_us = Some(self.now_us);
        self.trace_line("HEAL everything: faults stop".to_string());
        self.profile.drop_per_million = 0;
        self.profile.duplicate_per_million = 0;
        self.profile.slow_link_per_million = 0;
        self.profile.slow_fsync_per_million = 0;
        self.sides.iter_mut().for_each(|side| *side = 0);
        for replica in 0..self.options.replicas {
            if !self.replica_up(replica) {
                self.restart(replica);
            }
        }
        self.topology_changed();
        // Traffic goes on after a failure in practice: one more request per group makes a
        // restarted leader commit the tail it recovered (docs/simulator.md, known issue 1).
        if !self.options.quiet_heal && self.clients_started {
            for group in 0..self.options.groups {
                self.request_transfers(group, 0);
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // Liveness.

    /// Everything done: all requests answered, every replica holds and applied the leader's
    /// whole log, the leader committed it, no submission or credit leg outstanding.
    fn converged(&self) -> bool {
        if !self.clients_started || self.history.iter().any(|request| request.ack_us.is_none()) {
            return false;
        }
        (0..self.options.groups).all(|group| self.group_converged(group))
    }

    fn group_converged(&self, group: u32) -> bool {
        let leader_node = &self.nodes[self.node_index(self.leader_of(group), group)];
        let Some(leader) = leader_node.live.as_ref() else {
            return false;
        };
        let head = leader_node.disk.op_head();
        // The group's highest committed op, not the leader's `commit_max`: a restarted
        // leader's is 0 until it commits a new op (docs/simulator.md, known issue 1).
        if self.check.group_commit[group as usize] < head
            || !leader.submissions.is_empty()
            || leader.ledger.credit_legs_unacked_count() > 0
        {
            return false;
        }
        (0..self.options.replicas).all(|replica| {
            let node = &self.nodes[self.node_index(replica, group)];
            node.live.as_ref().is_some_and(|live| {
                node.disk.op_durable() == head && live.replica.commit_min() == head
            })
        })
    }

    fn liveness_report(&self) -> String {
        let mut report = format!(
            "not converged {} us after faults stopped; unanswered requests: {}",
            LIVENESS_BOUND_US,
            self.history.iter().filter(|r| r.ack_us.is_none()).count()
        );
        for node in &self.nodes {
            let Some(live) = node.live.as_ref() else {
                report.push_str(&format!("; r{}g{} down", node.replica, node.group));
                continue;
            };
            report.push_str(&format!(
                "; r{}g{}: disk head {} durable {}, op_head {} op_durable {} commit_max {} commit_min {}, {} queued, {} legs unacked",
                node.replica,
                node.group,
                node.disk.op_head(),
                node.disk.op_durable(),
                live.replica.op_head(),
                live.replica.op_durable(),
                live.replica.commit_max(),
                live.replica.commit_min(),
                live.submissions.len(),
                live.ledger.credit_legs_unacked_count(),
            ));
        }
        report
    }
}

/// Takes the front submission and every following one of the same operation that fits one
/// batch; returns the records and who waits for which range.
fn seal(
    submissions: &mut VecDeque<Submission>,
) -> (
    LedgerOperation,
    Vec<RecordSlot>,
    Vec<(Origin, usize, usize)>,
) {
    let operation = submissions.front().expect("non-empty").operation;
    let mut records = Vec::new();
    let mut origins = Vec::new();
    while let Some(front) = submissions.front() {
        if front.operation != operation || records.len() + front.records.len() > BATCH_RECORDS_MAX {
            break;
        }
        let submission = submissions.pop_front().expect("front exists");
        origins.push((submission.origin, records.len(), submission.records.len()));
        records.extend_from_slice(&submission.records);
    }
    debug_assert!(!records.is_empty() && records.len() <= BATCH_RECORDS_MAX);
    (operation, records, origins)
}

/// The first [`ACCOUNTS_PER_GROUP`] account ids (from 1 up) that `shard_of` puts in `group`.
fn accounts_of(group: u32, groups: u32) -> Vec<u128> {
    (1u128..)
        .filter(|id| shard_of(*id, groups) == group)
        .take(ACCOUNTS_PER_GROUP)
        .collect()
}

/// One line of trace for an event.
fn describe(event: &Event, groups: u32) -> String {
    let node =
        |index: &NodeIndex| format!("r{}g{}", *index / groups as usize, *index % groups as usize);
    match event {
        Event::Deliver(message, _) => {
            let body = match &message.body {
                Body::Prepare {
                    op, commit, repair, ..
                } => format!(
                    "{} op {op} commit {commit}",
                    if *repair { "PrepareRepair" } else { "Prepare" }
                ),
                Body::Forward { operation, records } => {
                    format!("Forward {operation:?} x{}", records.len())
                }
                other => format!("{other:?}"),
            };
            format!(
                "deliver g{} r{}->r{}: {body}",
                message.group, message.from, message.to
            )
        }
        Event::FsyncDone(index, _) => format!("fsync done {}", node(index)),
        Event::Timer(index, _) => format!("timer {}", node(index)),
        Event::ConnectionUp(group, from, to) => format!("connect g{group} r{from}->r{to}"),
        Event::Mesh(index, _, submission) => format!(
            "mesh to {}: {:?} x{}",
            node(index),
            submission.operation,
            submission.records.len()
        ),
        Event::ClientArrive(request) => format!("client request {request} arrives"),
        Event::ClientTimeout(request, attempt) => {
            format!("client request {request} timeout (attempt {attempt})")
        }
        Event::ClientNext(group, client) => format!("client {client} of g{group} next"),
        Event::Fault => "fault".to_string(),
    }
}
