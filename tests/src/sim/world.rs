//! The simulated cluster: nodes (one per replica × group), connections, the event queue,
//! clients and the fault schedule, and the driver that executes each [`Replica`]'s actions
//! the way `shards/src/replication.rs` does.
//!
//! Everything happens at a simulated time in µs, one event at a time, in `(time, sequence)`
//! order. Doing work takes no simulated time; waiting for the disk and the network does.

use crate::sched::Scheduled;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::rc::Rc;

use percore_engine::journal::{self, ENTRY_HEADER_BYTES, EntryMeta, JournalChecksum};
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation, LedgerOutbound};
use percore_engine::record::{
    Account, RECORD_BYTES, RecordResult, RecordSlot, Transfer, account_flags, shard_of,
};
use percore_engine::replica::{
    ACTIONS_MAX, Action, Persisted, PrepareDisposition, Replica, ReplicaConfig, Status,
};
use percore_engine::session::{RequestDescriptor, Sessioned};
use percore_engine::state_machine::StateMachine;

use super::check::CheckState;
use super::disk::{Checkpoint, CrashTail, Disk};
use super::linearizability::Position;
use super::rng::{SimRng, splitmix64};
use super::{Bug, FAILOVER_BUCKETS_US, Failure, Options, Summary};

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
/// Prepares queued for a batcher before more are dropped (the runtime bounds its inbound
/// buffer in bytes).
pub const INBOUND_QUEUED_MAX: usize = 512;
/// Actions waiting behind a `Persist` or `Truncate` (the runtime's `DEFERRED_ACTIONS_MAX`).
pub const DEFERRED_ACTIONS_MAX: usize = 4_096;
/// View change: bounds of the applied ops between superblock records of the commit number,
/// drawn per run (the runtime's `COMMIT_PERSIST_INTERVAL_OPS` is 64; any value is correct).
pub const COMMIT_PERSIST_INTERVAL_OPS_MIN: u64 = 1;
/// See [`COMMIT_PERSIST_INTERVAL_OPS_MIN`].
pub const COMMIT_PERSIST_INTERVAL_OPS_MAX: u64 = 32;
/// View change: a paused replica (SIGSTOP) stays stopped this long, at least (µs).
pub const PAUSE_US_MIN: u64 = 20_000;
/// See [`PAUSE_US_MIN`]: longer than the leader timeout, so a paused leader is replaced.
pub const PAUSE_US_MAX: u64 = 1_000_000;
/// View change: a client refused by a replica that is not the ready leader tries the next
/// one after this long (µs).
pub const CLIENT_REFUSED_BACKOFF_US: u64 = 2_000;
/// View change: after faults stop, every group has a ready leader within this (µs).
pub const LEADER_BOUND_US: u64 = 5_000_000;
/// Runs (per million) in which a fault restart may first damage durable journal entries.
pub const CORRUPT_RUNS_PER_MILLION: u64 = 400_000;
/// Mixed into the seed for the disk-corruption fault's own random stream.
const CORRUPT_SEED_MIX: u64 = 0xC0DE_DA3A_6E00_0001;
/// Share of `--replace` runs in which replicas lose their disks at all.
pub const REPLACE_RUNS_PER_MILLION: u64 = 500_000;
/// Mixed into the seed for the disk-loss fault's own random stream.
const REPLACE_SEED_MIX: u64 = 0x0D15_C105_7000_0002;
/// `--sync on`: checkpoint intervals drawn per run (multiples of the digest sampling, so
/// that every installed checkpoint's state is compared with the committed log's).
pub const CHECKPOINT_INTERVALS_OPS: [u64; 4] = [4, 8, 12, 16];
/// `--sync on`: the largest `retain_ops` drawn (the runtime's `--retain-ops`).
pub const RETAIN_OPS_MAX: u64 = 24;
/// A state sync whose peer has not answered for this long fails (the runtime's
/// `SYNC_CHUNK_TIMEOUT_US`, shortened to the simulator's time scale).
pub const SYNC_TIMEOUT_US: u64 = 500_000;
const SYNC_SEED_MIX: u64 = 0x5EC0_C4EC_7000_0003;

const _: () = assert!(TRANSFERS_PER_REQUEST_MAX as usize <= BATCH_RECORDS_MAX);
const _: () = assert!(ACCOUNTS_PER_GROUP <= BATCH_RECORDS_MAX);
const _: () = assert!(TIMER_SLEEP_US_MIN < TIMER_SLEEP_US_MAX);
const _: () = assert!(CLIENT_RETRY_US * 4 < LIVENESS_BOUND_US);
const _: () = assert!(PAUSE_US_MAX + LEADER_BOUND_US < LIVENESS_BOUND_US);
const _: () = assert!(COMMIT_PERSIST_INTERVAL_OPS_MIN >= 1);
const _: () = assert!(COMMIT_PERSIST_INTERVAL_OPS_MIN <= COMMIT_PERSIST_INTERVAL_OPS_MAX);
const _: () = {
    let mut index = 0;
    while index < CHECKPOINT_INTERVALS_OPS.len() {
        assert!(CHECKPOINT_INTERVALS_OPS[index].is_multiple_of(super::check::DIGEST_EVERY_OPS));
        index += 1;
    }
};

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
        /// The view of the log the entry was read from (`field::PREPARE_LOG_VIEW`).
        log_view: u64,
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
    /// `PreVote` (or `PreVoteReply` when `reply`).
    PreVote {
        /// The view the candidate would start.
        view_target: u64,
        /// Whether this answers a pre-vote.
        reply: bool,
        /// The answer (replies only).
        granted: bool,
    },
    /// `StartViewChange` for the header's view.
    StartViewChange,
    /// `DoViewChange` for the header's view: the sender's voting log.
    DoViewChange {
        /// The view of that log.
        log_view: u64,
        /// Its head.
        op_durable: u64,
        /// The sender's `commit_max`.
        commit_max: u64,
        /// `checksum_at(op)` for the last ops up to `op_durable`, oldest first.
        checksums: Rc<[JournalChecksum]>,
    },
    /// `StartView` for the header's view: the new leader's log.
    StartView {
        /// Its head.
        op_head: u64,
        /// The leader's `commit_max`.
        commit_max: u64,
        /// `checksum_at(op)` for the last ops up to `op_head`, oldest first.
        checksums: Rc<[JournalChecksum]>,
    },
    /// `RequestStartView` for the header's view.
    RequestStartView,
    /// `NotRetained`: a repair asked for ops the sender no longer holds (`--sync on`).
    NotRetained {
        /// The first op asked for.
        op_min: u64,
        /// The sender's first retained op.
        op_retained_min: u64,
        /// The sender's latest checkpoint.
        op_checkpoint: u64,
    },
    /// `RequestSnapshot`: the checkpoint at `op` (the runtime fetches it in chunks; one
    /// message here).
    RequestSnapshot {
        /// The checkpoint's op.
        op: u64,
    },
    /// The checkpoint asked for, whole.
    Snapshot {
        /// The checkpoint: its op, checksum, snapshot and digest.
        checkpoint: Checkpoint,
    },
    /// The checkpoint asked for is no longer kept (the runtime answers `NotRetained`).
    SnapshotRefused {
        /// Its op.
        op: u64,
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
    /// The state machine: the ledger with its client sessions, as the node runs it.
    pub ledger: Sessioned<Ledger>,
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
    /// View change: actions waiting behind a `Persist` or `Truncate`, in order (the
    /// runtime's `deferred`).
    deferred: VecDeque<Action>,
    /// View change: the superblock write in flight (lost whole if the process dies first).
    superblock_write: Option<Superblock>,
    /// State sync in progress (`Action::StateSync`).
    sync: Option<SyncWait>,
    /// Checker: ops up to here were compared with the committed log.
    pub agreed_upto: u64,
    /// Last values seen by the monotonicity checker.
    pub seen_commit_max: u64,
    /// See `seen_commit_max`.
    pub seen_commit_min: u64,
}

/// A state sync a node's core asked for.
#[derive(Debug)]
struct SyncWait {
    /// The peer asked for the checkpoint.
    peer: u8,
    /// The checkpoint's op.
    op: u64,
    /// The checkpoint, once it arrived: installed when the disk is idle.
    arrived: Option<Checkpoint>,
}

impl SyncWait {
    /// Whether this sync still waits for checkpoint `op`.
    fn waits(&self, op: u64) -> bool {
        self.op == op && self.arrived.is_none()
    }

    /// Whether `peer`'s answer about checkpoint `op` is the one this sync still waits for.
    fn waits_for(&self, peer: u8, op: u64) -> bool {
        self.peer == peer && self.waits(op)
    }
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
    /// View change: the durable superblock (survives crashes).
    pub superblock: Superblock,
    /// Checker: the highest op this replica acknowledged or voted for (`PrepareOk`,
    /// `DoViewChange`) and that log's view, across crashes; reset by a truncation.
    pub acked: (u64, u64),
}

/// What the superblock of one replica of one group records (view change): `Persist`
/// writes all three, the periodic commit record only `commit_max`. A restart replays the
/// journal up to `commit_max` and rejoins with `view` and `log_view`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Superblock {
    /// Highest view joined.
    pub view: u64,
    /// View of the voting log.
    pub log_view: u64,
    /// Ops known committed (and applied, for the periodic record): replay stops here.
    pub commit_max: u64,
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
    /// First send (µs): the invocation.
    pub invoke_us: u64,
    /// First reply (µs): the completion; `None` while no reply came (sends that time out or
    /// are refused are retried, so a request either completes or is still pending).
    pub ack_us: Option<u64>,
    /// Result codes of the first reply, one per record.
    pub results: Vec<u32>,
    /// Sends, retries included.
    pub attempts: u32,
    /// Replies, duplicates included.
    pub replies: u32,
    /// View change: the replica the client sends to now (it moves on when refused or
    /// when a retry is due).
    pub target: u8,
    /// `(op, checksum)` of the entry whose application answered it first.
    pub acked_op: Option<(u64, JournalChecksum)>,
    /// Index of its first record within that entry's batch (with `acked_op`).
    pub acked_record: usize,
    /// Its client's id (the session key); every try of the request carries it.
    pub client_id: u128,
    /// Its number among its client's requests (from 1).
    pub request_number: u64,
    /// Linearizability: the latest witness position at which a request of its group had
    /// been answered when this one was invoked, and that request. Every record of this
    /// request must come later in the committed log (see `check.rs`).
    pub invoked_after: Option<(Position, usize)>,
}

#[derive(Debug, Clone)]
enum Event {
    Deliver(Message, u64),
    FsyncDone(NodeIndex, u64),
    Timer(NodeIndex, u64),
    ConnectionUp(u32, u8, u8),
    Mesh(NodeIndex, u64, Submission),
    SuperblockDone(NodeIndex, u64),
    ClientArrive(usize, u8),
    ClientTimeout(usize, u32),
    ClientRefused(usize, u32),
    ClientNext(u32, usize),
    SyncTimeout(NodeIndex, u64, u64),
    Fault,
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
    commit_persist_interval_ops: u64,
    /// Chance that a replica restarted by a fault first has one durable entry of each of
    /// its journals damaged (0 in most runs).
    corrupt_per_million: u64,
    /// Chance that a replica restarted by a fault first loses its disk and comes back
    /// formatted with `--replace` (0 unless `Options::replace`).
    replace_per_million: u64,
    /// `--sync on`: a replica checkpoints after applying each multiple of this op (0: never).
    checkpoint_interval_ops: u64,
    /// `--sync on`: ops below the previous checkpoint still kept for a peer behind.
    retain_ops: u64,
}

/// The whole simulated cluster and its checkers.
#[derive(Debug)]
pub struct World {
    pub(super) seed: u64,
    pub(super) options: Options,
    rng: SimRng,
    /// Draws of the disk-corruption fault: a stream of its own, so that runs without it
    /// replay as they did before it existed.
    corrupt_rng: SimRng,
    /// Draws of the disk-loss fault: a stream of its own, like `corrupt_rng`.
    replace_rng: SimRng,
    profile: Profile,
    pub(super) now_us: u64,
    pub(super) step: u64,
    sequence: u64,
    queue: BinaryHeap<Scheduled<Event>>,
    pub(super) nodes: Vec<Node>,
    connections: Vec<Connection>,
    /// Partition side of each replica: replicas talk only within a side.
    sides: Vec<u8>,
    /// View change: a paused replica runs nothing until then (µs); its events wait.
    paused_until: Vec<Option<u64>>,
    /// View change: the replica each group's clients try first (the last that answered).
    client_hint: Vec<u8>,
    /// The last request number of each client id.
    request_numbers: BTreeMap<u128, u64>,
    /// Per group: since when it has had no ready leader (µs), for the failover times.
    leaderless_since: Vec<Option<u64>>,
    /// Per group: its leader handed it over (leader rebalancing) and no leader is ready yet.
    handoff_pending: Vec<bool>,
    /// Per `(group, view)`: the replica and incarnation that became its ready leader.
    pub(super) view_leaders: BTreeMap<(u32, u64), (u8, u64)>,
    /// Per `(group, view)`: the incarnation of the leader that sealed ops in it (P4: only
    /// one ever does, so each op of a view has one entry).
    view_sealers: BTreeMap<(u32, u64), u64>,
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
            commit_persist_interval_ops: 0,
            corrupt_per_million: 0,
            replace_per_million: 0,
            checkpoint_interval_ops: 0,
            retain_ops: 0,
        };
        // Drawn last, and only with view change, so fixed-view runs replay as before.
        let mut profile = profile;
        if options.view_change {
            profile.commit_persist_interval_ops = rng.range(
                COMMIT_PERSIST_INTERVAL_OPS_MIN,
                COMMIT_PERSIST_INTERVAL_OPS_MAX,
            );
        }
        let mut corrupt_rng = SimRng::new(seed ^ CORRUPT_SEED_MIX);
        if faults && options.corrupt && corrupt_rng.chance(CORRUPT_RUNS_PER_MILLION) {
            profile.corrupt_per_million = corrupt_rng.range(200_000, 700_000);
        }
        let mut replace_rng = SimRng::new(seed ^ REPLACE_SEED_MIX);
        if faults
            && options.view_change
            && options.replace
            && replace_rng.chance(REPLACE_RUNS_PER_MILLION)
        {
            profile.replace_per_million = replace_rng.range(150_000, 500_000);
        }
        if options.sync {
            let mut sync_rng = SimRng::new(seed ^ SYNC_SEED_MIX);
            let choice = sync_rng.below(CHECKPOINT_INTERVALS_OPS.len() as u64) as usize;
            profile.checkpoint_interval_ops = CHECKPOINT_INTERVALS_OPS[choice];
            profile.retain_ops = sync_rng.below(RETAIN_OPS_MAX + 1);
        }
        let body_bytes_max = journal::entry_body_bytes_max(BATCH_RECORDS_MAX, RECORD_BYTES);
        let groups = options.groups as usize;
        let replicas = usize::from(options.replicas);
        let accounts = (0..options.groups)
            .map(|group| accounts_of(group, options.groups))
            .collect();
        let mut world = World {
            seed,
            options,
            rng,
            corrupt_rng,
            replace_rng,
            profile,
            now_us: 0,
            step: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::with_capacity(replicas * groups),
            connections: vec![Connection::default(); groups * replicas * replicas],
            sides: vec![0; replicas],
            paused_until: vec![None; replicas],
            request_numbers: BTreeMap::new(),
            client_hint: (0..options.groups)
                .map(|group| (group % u32::from(options.replicas)) as u8)
                .collect(),
            leaderless_since: vec![None; groups],
            handoff_pending: vec![false; groups],
            view_leaders: BTreeMap::new(),
            view_sealers: BTreeMap::new(),
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
                    disk: Disk::new(body_bytes_max, group),
                    live: None,
                    epoch: 0,
                    superblock: Superblock::default(),
                    acked: (0, 0),
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
            // An assertion in the engine (or the driver) fails the run with its trace, where
            // panics unwind (tests, debug builds).
            let event = scheduled.event;
            let handled =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(event)));
            if let Err(panic) = handled {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".to_string());
                return Err(self.fail("panic", message));
            }
            if let Err((checker, message)) = self.check_step() {
                return Err(self.fail(checker, message));
            }
            if self.options.view_change {
                self.leaders_observe();
            }
            if let Some(healed_at_us) = self.healed_at_us {
                if self.options.view_change
                    && self.now_us > healed_at_us + LEADER_BOUND_US
                    && let Some(group) = self.leaderless_since.iter().position(Option::is_some)
                {
                    let message = format!(
                        "group {group} has no ready leader {LEADER_BOUND_US} us after faults stopped; {}",
                        self.liveness_report()
                    );
                    return Err(self.fail("liveness", message));
                }
                if self.converged() {
                    if let Err((checker, message)) = self.check_end() {
                        return Err(self.fail(checker, message));
                    }
                    self.summary.steps = self.step;
                    self.summary.time_us = self.now_us;
                    self.summary.view_change_actions_dropped = self.check.view_change_actions;
                    self.summary.views_led = self.view_leaders.len() as u64;
                    self.summary.answers_checked = self.check.linearizability.answers_checked;
                    self.summary.records_ordered = self.check.linearizability.records_ordered;
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
        if let Some(replica) = self.event_replica(&event)
            && let Some(until) = self.paused_until[usize::from(replica)]
        {
            if until > self.now_us {
                // A stopped process runs nothing: its events wait, in order, until it
                // resumes (messages wait in the socket, timers fire late).
                self.step -= 1;
                self.schedule(until - self.now_us, event);
                return;
            }
            self.paused_until[usize::from(replica)] = None;
            self.trace_line(format!("replica {replica} RESUMES"));
        }
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
                    self.mesh_arrive(node, submission);
                }
            }
            Event::SuperblockDone(node, epoch) => {
                if self.nodes[node].epoch == epoch && self.nodes[node].live.is_some() {
                    self.superblock_done(node);
                }
            }
            Event::ClientArrive(request, target) => self.client_arrive(request, target),
            Event::ClientRefused(request, attempt) => self.client_refused(request, attempt),
            Event::ClientTimeout(request, attempt) => self.client_timeout(request, attempt),
            Event::ClientNext(group, client) => self.client_next(group, client),
            Event::SyncTimeout(node, epoch, op) => {
                if self.nodes[node].epoch == epoch && self.nodes[node].live.is_some() {
                    self.sync_timeout(node, op);
                }
            }
            Event::Fault => self.fault(),
        }
    }

    // ---------------------------------------------------------------------------------
    // Nodes: start, crash, restart.

    /// Starts (or restarts) a node from its journal, as the runtime does: recover, replay
    /// everything into a fresh ledger, `Replica::new` at the head, resend unconfirmed legs.
    fn node_start(&mut self, index: NodeIndex) {
        let (replica_index, group) = (self.nodes[index].replica, self.nodes[index].group);
        // A journal a state sync switched to a checkpoint starts there: the state machine
        // is restored from it, and the entries after it replay onto it.
        let config = self.ledger_config(group);
        let base = self.nodes[index].disk.base();
        let mut ledger = match self.nodes[index].disk.base_checkpoint() {
            Some(checkpoint) => restored(config, checkpoint),
            None => sessioned(Ledger::with_hash_seed(config, LEDGER_HASH_SEED)),
        };
        let mut replayed: Vec<(u64, percore_engine::checksum::Digest256)> = Vec::new();
        // With view change, replay stops at the recorded commit number: what lies above may
        // belong to an abandoned view; it is applied from the journal once committed. A
        // checkpoint above it is committed too: the runtime restores the latest checkpoint
        // and replays after it (replaying up to it here reaches the same state).
        let superblock = self.nodes[index].superblock;
        let replay_to = if self.options.view_change {
            superblock
                .commit_max
                .max(self.nodes[index].disk.checkpoint_op())
        } else {
            u64::MAX
        };
        let recovered = {
            let results = &mut self.results_buffer;
            self.nodes[index]
                .disk
                .recover(|op, operation, body, requests| {
                    if op > replay_to {
                        return;
                    }
                    let operation = LedgerOperation::try_from(operation).expect("ledger operation");
                    let records: Vec<RecordSlot> = bytemuck::pod_collect_to_vec(body);
                    let requests = descriptors(requests);
                    let results = &mut results[..records.len()];
                    ledger.apply_requests(op, operation, &records, &requests, results);
                    while ledger.poll_outbound().is_some() {}
                    if super::check::digest_sampled(op) {
                        replayed.push((op, ledger.digest()));
                    }
                })
        };
        if matches!(recovered.tail, journal::Tail::Torn { .. }) {
            self.summary.torn_tails += 1;
        }
        // The recorded commit number may be above the journal's head (a replica learns of
        // commits before it holds them): replay stops at the head then. What it replays is
        // compared with the committed log by the agreement checker.
        let replayed_op = replay_to.min(recovered.op_last).max(base);
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
        config.view_change = self.options.view_change;
        config.leader_rebalance_us = self.options.rebalance_ms * 1_000;
        // As the runtime: the last ops' checksums let acknowledgements of the recovered
        // tail count, so it commits without waiting for a new op.
        let recent = self.nodes[index]
            .disk
            .recent_checksums(2 * config.pipeline_prepares_max as usize);
        let persisted = if self.options.view_change {
            Persisted {
                view: superblock.view,
                log_view: superblock.log_view,
            }
        } else {
            Persisted {
                view: config.view,
                log_view: config.view,
            }
        };
        // As the runtime: a journal created by this start belongs to a replica that never
        // ran; any other start is a restart, and a leader then leaves its view.
        let first_start = self.nodes[index].epoch == 0;
        let replaced = self.nodes[index].disk.replaced();
        let replica = if first_start {
            assert_eq!(recovered.op_last, 0, "a new journal is empty");
            Replica::new(config, 0, recovered.checksum_last, self.now_us)
        } else {
            Replica::restart(
                config,
                persisted,
                recovered.op_last,
                recovered.checksum_last,
                replayed_op,
                &recent,
                self.now_us,
            )
        }
        .expect("valid replica config");
        let mut replica = replica;
        if self.options.bug == Some(Bug::LeaderResumesView) {
            replica.bug_resume_view();
        }
        let forget = self.options.bug == Some(Bug::ForgetRecovering);
        if let Some(op_promised) = recovered.recovering.filter(|_| !forget) {
            // As the runtime: the journal lost entries it may have acknowledged.
            replica.recovering_start(op_promised);
            self.summary.recoveries += 1;
        }
        if replaced && self.options.bug != Some(Bug::ReplaceAsNew) {
            // As the runtime: the superblock is marked replacing (`format --replace`).
            replica.replacing_start(self.now_us);
            if self.options.bug == Some(Bug::ReplaceSkipFloor) {
                replica.bug_skip_view_floor();
            }
        }
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
            deferred: VecDeque::new(),
            superblock_write: None,
            sync: None,
            agreed_upto: base,
        });
        let epoch = node.epoch;
        self.trace_line(format!(
            "node r{replica_index}g{group} start: recovered op {} ({:?}), replayed to {replayed_op}, {superblock:?}, recovering {:?}, {} legs to resend",
            recovered.op_last,
            recovered.tail,
            recovered.recovering,
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
        self.paused_until[usize::from(replica)] = None;
        for group in 0..self.options.groups {
            let index = self.node_index(replica, group);
            let faults = self.options.faults;
            let node = &mut self.nodes[index];
            let unsynced = node.disk.op_head() - node.disk.op_durable();
            // A leader that sends before its write is durable loses, here, entries its
            // followers may already hold (every staged entry was sent to each connected
            // follower when it was staged).
            let sent_early = node.live.as_ref().is_some_and(|live| {
                live.replica.is_leader() && live.replica.sends_prepares_before_durable()
            });
            let head_before = node.disk.op_head();
            node.live = None;
            node.epoch += 1;
            let tail = node.disk.crash(&mut self.rng, faults);
            let head = node.disk.op_head();
            if sent_early && head < head_before {
                self.summary.leader_sent_crashes += 1;
                self.summary.leader_sent_ops_lost += head_before - head;
            }
            self.trace_line(format!(
                "node r{replica}g{group} CRASH: {unsynced} unsynced ops, {tail:?}, head now {head}"
            ));
            if tail != CrashTail::Nothing {
                self.check.note_crash_loss(group);
            }
        }
        self.topology_changed();
    }

    /// Fault, while `replica` is down: maybe damage one durable entry of each journal
    /// (one that has a durable entry after it; see [`Disk::corrupt`]).
    fn corrupt_maybe(&mut self, replica: u8) {
        if self.profile.corrupt_per_million == 0 {
            return;
        }
        // At most f replicas of a group hold damage they have not repaired: one more could
        // lose a committed op on every replica that held it (open question 6 of
        // docs/protocol.md: correlated faults stop a group for an operator).
        let f = usize::from(self.options.replicas - 1) / 2;
        for group in 0..self.options.groups {
            let damaged = (0..self.options.replicas)
                .filter(|r| self.nodes[self.node_index(*r, group)].disk.promised() > 0)
                .count();
            if damaged >= f || !self.corrupt_rng.chance(self.profile.corrupt_per_million) {
                continue;
            }
            let index = self.node_index(replica, group);
            if self.nodes[index].disk.replaced() {
                continue;
            }
            if let Some(op) = self.nodes[index].disk.corrupt(&mut self.corrupt_rng) {
                self.summary.corruptions += 1;
                self.trace_line(format!("node r{replica}g{group} CORRUPT durable op {op}"));
            }
        }
    }

    /// Fault, while `replica` is down (`--replace`): maybe its disk is lost and a blank one
    /// formatted with `--replace` takes its place, for every group. Returns whether it was.
    fn replace_maybe(&mut self, replica: u8) -> bool {
        if self.profile.replace_per_million == 0 {
            return false;
        }
        // At most f replicas of a group may lack what they acknowledged at once (damaged,
        // or replaced and not rebuilt): one more could lose a committed op everywhere.
        let f = usize::from(self.options.replicas - 1) / 2;
        let allowed = (0..self.options.groups).all(|group| {
            let damaged = (0..self.options.replicas)
                .filter(|r| self.nodes[self.node_index(*r, group)].disk.promised() > 0)
                .count();
            let mine = self.nodes[self.node_index(replica, group)].disk.promised() > 0;
            damaged < f && !mine
        });
        if !allowed || !self.replace_rng.chance(self.profile.replace_per_million) {
            return false;
        }
        for group in 0..self.options.groups {
            let index = self.node_index(replica, group);
            let node = &mut self.nodes[index];
            node.disk.replace();
            node.superblock = Superblock::default();
            node.acked = (0, 0);
            self.summary.replacements += 1;
        }
        self.trace_line(format!(
            "replica {replica} DISK LOST: formatted again with --replace"
        ));
        true
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

    /// [`World::send`] of `body` from `node` (its replica, on its group's connection).
    fn send_from(&mut self, node: NodeIndex, to: u8, view: u64, body: Body) -> bool {
        let (from, group) = (self.nodes[node].replica, self.nodes[node].group);
        self.send(Message {
            from,
            to,
            group,
            view,
            body,
        })
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
        let mut snapshot_asked = None;
        match message.body {
            Body::Prepare { .. } => {
                if live.inbound.len() < INBOUND_QUEUED_MAX {
                    live.inbound.push_back(message);
                }
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
                message.view,
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
            Body::PreVote {
                view_target,
                reply: false,
                ..
            } => live
                .replica
                .on_pre_vote(now_us, from, view_target, &mut actions),
            Body::PreVote {
                view_target,
                reply: true,
                granted,
            } => live
                .replica
                .on_pre_vote_reply(now_us, from, view_target, granted, &mut actions),
            Body::StartViewChange => {
                live.replica
                    .on_start_view_change(now_us, from, message.view, &mut actions);
            }
            Body::DoViewChange {
                log_view,
                op_durable,
                commit_max,
                checksums,
            } => live.replica.on_do_view_change(
                now_us,
                from,
                message.view,
                log_view,
                op_durable,
                commit_max,
                (op_durable + 1).saturating_sub(checksums.len() as u64),
                &checksums,
                &mut actions,
            ),
            Body::StartView {
                op_head,
                commit_max,
                checksums,
            } => live.replica.on_start_view(
                now_us,
                from,
                message.view,
                op_head,
                commit_max,
                (op_head + 1).saturating_sub(checksums.len() as u64),
                &checksums,
                &mut actions,
            ),
            Body::RequestStartView => {
                live.replica
                    .on_request_start_view(now_us, from, message.view, &mut actions);
            }
            Body::NotRetained {
                op_min,
                op_retained_min,
                op_checkpoint,
            } => {
                if live.replica.is_leader() && live.replica.status() == Status::ViewChange {
                    self.summary.not_retained_new_leader += 1;
                }
                live.replica.on_not_retained(
                    from,
                    op_min,
                    op_retained_min,
                    op_checkpoint,
                    &mut actions,
                );
            }
            Body::RequestSnapshot { op } => snapshot_asked = Some(op),
            Body::Snapshot { checkpoint } => {
                if let Some(sync) = live.sync.as_mut()
                    && sync.waits_for(from, checkpoint.op)
                {
                    sync.arrived = Some(checkpoint);
                }
            }
            Body::SnapshotRefused { op } => {
                if live
                    .sync
                    .as_ref()
                    .is_some_and(|sync| sync.waits_for(from, op))
                {
                    live.sync = None;
                    self.summary.state_syncs_failed += 1;
                    live.replica.on_state_sync_failed(now_us, &mut actions);
                }
            }
            Body::Forward { operation, records } => {
                // Accepted only by the group's ready leader; the origin resends otherwise.
                if live.replica.is_ready_leader() {
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
        self.submit_actions(node, &actions);
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.actions = actions;
        }
        if let Some(op) = snapshot_asked {
            // Served from the checkpoint on disk (the runtime's snapshot file), if this
            // replica still keeps it.
            let body = match self.nodes[node].disk.checkpoint(op) {
                Some(checkpoint) => Body::Snapshot {
                    checkpoint: checkpoint.clone(),
                },
                None => Body::SnapshotRefused { op },
            };
            let view = self.nodes[node]
                .live
                .as_ref()
                .map_or(0, |live| live.replica.view());
            self.send_from(node, from, view, body);
        }
        self.batcher_turn(node);
    }

    /// Executes actions now, or queues them behind a `Persist` or `Truncate` (or behind
    /// earlier queued ones) for the batcher: order is kept, and nothing after a `Persist`
    /// goes out before it is durable (the runtime's `submit_actions`).
    fn submit_actions(&mut self, node: NodeIndex, actions: &[Action]) {
        let bug = self.options.bug;
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let journal_action =
            |action: &Action| matches!(action, Action::Persist { .. } | Action::Truncate { .. });
        let needs_journal = self.options.view_change && actions.iter().any(journal_action);
        if !needs_journal && live.deferred.is_empty() {
            self.execute(node, actions);
            return;
        }
        assert!(
            live.deferred.len() + actions.len() <= DEFERRED_ACTIONS_MAX,
            "deferred actions are bounded"
        );
        if bug == Some(Bug::PersistAfterSend) {
            // Injected: messages go out now; only the journal work waits.
            live.deferred
                .extend(actions.iter().copied().filter(journal_action));
            let sends: Vec<Action> = actions
                .iter()
                .copied()
                .filter(|action| !journal_action(action))
                .collect();
            self.execute(node, &sends);
        } else {
            live.deferred.extend(actions.iter().copied());
        }
        self.run_deferred(node);
    }

    /// Whether the node's disk is busy: a group commit or a superblock write in flight.
    fn io_busy(&self, node: NodeIndex) -> bool {
        let n = &self.nodes[node];
        n.disk.fsync_busy()
            || n.live
                .as_ref()
                .is_some_and(|l| l.superblock_write.is_some())
    }

    /// Carries out deferred actions in order while the disk is idle: a `Persist` starts a
    /// superblock write and the rest waits for it; a `Truncate` cuts the journal at once
    /// (the runtime's `run_deferred`).
    fn run_deferred(&mut self, node: NodeIndex) {
        // Bounded: each pass pops one action.
        while !self.io_busy(node) {
            let Some(live) = self.nodes[node].live.as_mut() else {
                return;
            };
            let Some(action) = live.deferred.pop_front() else {
                return;
            };
            match action {
                Action::Persist {
                    view,
                    log_view,
                    commit_max,
                } => self.superblock_start(
                    node,
                    Superblock {
                        view,
                        log_view,
                        commit_max,
                    },
                ),
                Action::Truncate { op } => self.truncate(node, op),
                other => self.execute(node, &[other]),
            }
        }
    }

    /// Starts a superblock write; it is durable after a simulated fsync.
    fn superblock_start(&mut self, node: NodeIndex, superblock: Superblock) {
        let latency = self.fsync_latency_us();
        let epoch = self.nodes[node].epoch;
        let live = self.nodes[node].live.as_mut().expect("live");
        debug_assert!(live.superblock_write.is_none());
        live.superblock_write = Some(superblock);
        self.summary.superblock_writes += 1;
        self.schedule(latency, Event::SuperblockDone(node, epoch));
    }

    /// The superblock write is durable: what the runtime's `write_views` asserts must hold,
    /// then the actions behind it run.
    fn superblock_done(&mut self, node: NodeIndex) {
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let live = self.nodes[node].live.as_mut().expect("live");
        let mut written = live.superblock_write.take().expect("a write in flight");
        let last = self.nodes[node].superblock;
        if written.commit_max < last.commit_max && !self.options.no_workarounds {
            // Known issue 6 (docs/simulator.md): a restart sets the core's commit_max to
            // the op replay reached, which is below a recorded commit_max that was above
            // the journal's head; its next `Persist` lowers it, and the runtime's
            // `write_views` asserts it never does. The driver keeps the higher number.
            written.commit_max = last.commit_max;
            self.summary.superblock_commit_kept += 1;
        }
        if written.log_view > written.view
            || written.view < last.view
            || written.log_view < last.log_view
            || written.commit_max < last.commit_max
        {
            // The runtime asserts these and stops the process.
            self.check.problem_set(
                "superblock",
                format!("r{replica}g{group}: superblock {last:?} overwritten with {written:?}"),
            );
        }
        self.nodes[node].superblock = written;
        self.trace_line(format!(
            "r{replica}g{group} superblock durable: {written:?}"
        ));
        self.run_deferred(node);
        self.batcher_turn(node);
    }

    /// `Truncate`: cuts the journal above `op`, forgets who waited for the ops cut (their
    /// clients are refused), and tells the core the new chain head.
    fn truncate(&mut self, node: NodeIndex, op: u64) {
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let head = self.nodes[node].disk.op_head();
        let acked_op = self.nodes[node].acked.1;
        self.check
            .truncation_observed(replica, group, op, &self.nodes[node].disk, acked_op);
        let checksum = self.nodes[node].disk.truncate(op);
        self.nodes[node].acked = (0, 0);
        self.summary.truncations += 1;
        self.trace_line(format!(
            "r{replica}g{group} TRUNCATE above op {op} (head was {head})"
        ));
        let live = self.nodes[node].live.as_mut().expect("live");
        let cut: Vec<u64> = if self.options.bug == Some(Bug::KeepOriginsOnTruncate) {
            // The injected bug: they stay, and the next entry under their op answers them.
            Vec::new()
        } else {
            live.origins.range(op + 1..).map(|(op, _)| *op).collect()
        };
        let mut refused = Vec::new();
        for op in cut {
            for (origin, _, _) in live.origins.remove(&op).unwrap_or_default() {
                if let Origin::Client(request) = origin {
                    refused.push(request);
                }
            }
        }
        live.replica.on_truncated(op, checksum);
        for request in refused {
            self.client_refuse(request);
        }
    }

    /// Checker **recovering**: a replica acknowledges (`PrepareOk`) or votes
    /// (`DoViewChange`) only while it is not recovering, and never for less than it
    /// acknowledged or voted for before in the same log (across crashes and damage; only a
    /// truncation, which installs another view's log, lowers it).
    fn votes_check(&mut self, node: NodeIndex, actions: &[Action]) {
        let Some(live) = self.nodes[node].live.as_ref() else {
            return;
        };
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let recovering = live.replica.recovering();
        let view = live.replica.view();
        for action in actions {
            let (what, log_view, op) = match *action {
                Action::PrepareOk { op, .. } => ("PrepareOk", view, op),
                Action::DoViewChange {
                    log_view,
                    op_durable,
                    ..
                } => ("DoViewChange", log_view, op_durable),
                _ => continue,
            };
            let acked = self.nodes[node].acked;
            if let Some(op_promised) = recovering {
                self.check.problem_set(
                    "recovering",
                    format!(
                        "r{replica}g{group} sends {what} (log_view {log_view}, op {op}) while recovering (promised op {op_promised})"
                    ),
                );
            } else if acked.0 == log_view && op < acked.1 {
                self.check.problem_set(
                    "recovering",
                    format!(
                        "r{replica}g{group} sends {what} for op {op} in log_view {log_view} after it acknowledged op {} there",
                        acked.1
                    ),
                );
            }
            if log_view > acked.0 || (log_view == acked.0 && op > acked.1) {
                self.nodes[node].acked = (log_view, op);
            }
        }
    }

    /// Carries out a core's actions. One `match`: a new `Action` variant is one new arm.
    fn execute(&mut self, node: NodeIndex, actions: &[Action]) {
        self.votes_check(node, actions);
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let view = live.replica.view();
        let view_change = self.options.view_change;
        let mut messages = Vec::new();
        let mut sync_started = None;
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
                Action::StateSync {
                    from,
                    checkpoint_op,
                } => {
                    assert!(self.options.sync, "only `--sync on` answers NotRetained");
                    live.sync = Some(SyncWait {
                        peer: from,
                        op: checkpoint_op,
                        arrived: None,
                    });
                    self.summary.state_syncs += 1;
                    if live.replica.is_leader() {
                        self.summary.state_syncs_leader += 1;
                    }
                    if live.replica.replacing() {
                        self.summary.state_syncs_replacing += 1;
                    }
                    sync_started = Some(checkpoint_op);
                    messages.push((from, view, Body::RequestSnapshot { op: checkpoint_op }));
                    continue;
                }
                // Without view change the core produces none of these: a truncation in the
                // fixed view breaks "no replica truncates" and fails the run; any other
                // (a pre-vote, a view change, a superblock write) fails it too, since the
                // driver would drop it unseen.
                Action::Truncate { op } if !view_change => {
                    self.check.truncated = Some((replica, group, op));
                    continue;
                }
                _ if !view_change => {
                    self.check.view_change_actions += 1;
                    self.check.problem.get_or_insert((
                        "agreement",
                        format!(
                            "replica {replica} group {group} asked for {action:?} in the fixed view"
                        ),
                    ));
                    continue;
                }
                Action::Persist { .. } | Action::Truncate { .. } => {
                    unreachable!("journal actions go through run_deferred: {action:?}")
                }
                Action::PreVote { to, view_target } => (
                    to,
                    Body::PreVote {
                        view_target,
                        reply: false,
                        granted: false,
                    },
                ),
                Action::PreVoteReply {
                    to,
                    view_target,
                    granted,
                } => (
                    to,
                    Body::PreVote {
                        view_target,
                        reply: true,
                        granted,
                    },
                ),
                Action::StartViewChange { to, view } => {
                    messages.push((to, view, Body::StartViewChange));
                    continue;
                }
                Action::RequestStartView { to, view } => {
                    messages.push((to, view, Body::RequestStartView));
                    continue;
                }
                Action::DoViewChange {
                    to,
                    view,
                    log_view,
                    op_durable,
                    commit_max,
                    headers_op_min,
                } => {
                    // As the runtime: skipped if the core no longer knows a checksum of the
                    // range (its log changed since); it sends again.
                    if let Some(checksums) = checksums_of(&live.replica, headers_op_min, op_durable)
                    {
                        let body = Body::DoViewChange {
                            log_view,
                            op_durable,
                            commit_max,
                            checksums,
                        };
                        messages.push((to, view, body));
                    }
                    continue;
                }
                Action::StartView {
                    to,
                    view,
                    op_head,
                    commit_max,
                    headers_op_min,
                } => {
                    if let Some(checksums) = checksums_of(&live.replica, headers_op_min, op_head) {
                        let body = Body::StartView {
                            op_head,
                            commit_max,
                            checksums,
                        };
                        messages.push((to, view, body));
                    }
                    continue;
                }
            };
            messages.push((to, view, body));
        }
        if let Some(op) = sync_started {
            let epoch = self.nodes[node].epoch;
            self.schedule(SYNC_TIMEOUT_US, Event::SyncTimeout(node, epoch, op));
        }
        for (to, view, body) in messages {
            self.send_from(node, to, view, body);
        }
    }

    /// One batcher turn (the runtime's `replicated_turn`), repeated while it has work.
    /// Returns at a group commit in flight; [`World::fsync_done`] carries on.
    fn batcher_turn(&mut self, node: NodeIndex) {
        // Bounded: every pass either stages something (finite submissions and inbound) or
        // stops.
        loop {
            self.run_deferred(node);
            if self.nodes[node].live.is_none() || self.io_busy(node) {
                return;
            }
            self.sync_install_maybe(node);
            if self.io_busy(node) {
                return;
            }
            let Some(live) = self.nodes[node].live.as_ref() else {
                return;
            };
            let replaced_voting =
                self.nodes[node].disk.replaced() && self.options.bug == Some(Bug::ReplaceAsNew);
            if live.replica.recovering().is_none()
                && self.nodes[node].disk.promised() > 0
                && !replaced_voting
            {
                if self.nodes[node].disk.replaced() {
                    let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
                    self.summary.replacements_rebuilt += 1;
                    self.trace_line(format!(
                        "r{replica}g{group} rebuilt after --replace: view {}, op {}",
                        live.replica.view(),
                        live.replica.op_durable()
                    ));
                }
                // As the runtime: the replica left recovering without reaching the promise
                // (it installed a newer view's log, or no peer held the rest): drop it.
                let op_durable = self.nodes[node].disk.op_durable();
                if !self.options.view_change && op_durable < self.nodes[node].disk.promised() {
                    let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
                    self.trace_line(format!(
                        "r{replica}g{group} leaves recovering at op {op_durable}: no peer held the rest"
                    ));
                    self.check.log_dropped(group, op_durable);
                }
                self.nodes[node].disk.promise_release();
            }
            let Some(live) = self.nodes[node].live.as_ref() else {
                return;
            };
            let leader = live.replica.is_ready_leader();
            let staged = if leader {
                self.leader_prepare(node)
            } else {
                self.abort_unsealed(node);
                self.follower_append(node)
            };
            if staged {
                return;
            }
            self.run_deferred(node);
            if self.io_busy(node) {
                return;
            }
            self.serve_repairs(node);
            self.apply_committed(node);
            if self.persist_applied(node) {
                return;
            }
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
            // As the runtime: each client request sealed here carries its session descriptor.
            let requests: Vec<RequestDescriptor> = origins
                .iter()
                .filter_map(|(origin, first, count)| match origin {
                    Origin::Client(request) if bug != Some(Bug::NoSessions) => {
                        let request = &self.history[*request];
                        Some(RequestDescriptor {
                            client_id: request.client_id,
                            request_number: request.request_number,
                            record_start: *first as u32,
                            record_count: *count as u32,
                        })
                    }
                    _ => None,
                })
                .collect();
            let op = n.disk.op_head() + 1;
            let view = live.replica.view();
            let meta = EntryMeta {
                shard: group,
                view,
                op,
                operation: operation.into(),
                entry_count: records.len() as u32,
                record_bytes: RECORD_BYTES as u32,
                request_count: requests.len() as u32,
            };
            let body: &[u8] = bytemuck::cast_slice(&records);
            let checksum_previous = n.disk.checksum_head();
            let (padded, checksum) = journal::encode_entry_parts(
                &mut self.entry_buffer,
                &meta,
                body,
                bytemuck::cast_slice(&requests),
                checksum_previous,
            );
            let body_bytes = meta.body_bytes() as usize;
            let entry: Rc<[u8]> = Rc::from(&self.entry_buffer[..ENTRY_HEADER_BYTES + body_bytes]);
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
                        log_view: view,
                    },
                });
            }
            sealed += 1;
        }
        if sealed == 0 {
            return false;
        }
        self.sealed_in_view(node);
        // With view change the Prepares leave as soon as the entries are staged (the
        // runtime's order; a crash may then lose entries the followers hold). Fixed view
        // holds them until the group commit is durable; the injected bug does not.
        let send_now = self.nodes[node]
            .live
            .as_ref()
            .is_some_and(|live| live.replica.sends_prepares_before_durable());
        if send_now || bug == Some(Bug::SendBeforeDurable) {
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

    /// Checker `one-leader-per-view`: one incarnation of one replica seals ops in a view. A
    /// restarted leader that sealed in its old view again may have lost entries it had
    /// sent, and now gives their op numbers other entries. Under the injected bug that
    /// does this, it is only counted, so that the sweep shows what the other checkers
    /// catch.
    fn sealed_in_view(&mut self, node: NodeIndex) {
        let n = &self.nodes[node];
        let Some(live) = n.live.as_ref() else {
            return;
        };
        if !self.options.view_change {
            return;
        }
        let (replica, group, view, epoch) = (n.replica, n.group, live.replica.view(), n.epoch);
        match self.view_sealers.insert((group, view), epoch) {
            Some(earlier) if earlier != epoch => {
                if self.options.bug == Some(Bug::LeaderResumesView) {
                    self.summary.leader_resumed_view += 1;
                } else {
                    self.check.problem_set(
                        "one-leader-per-view",
                        format!(
                            "r{replica}g{group}: restarted, it sealed ops in view {view} again"
                        ),
                    );
                }
            }
            _ => {}
        }
    }

    /// Starts the group commit of everything staged; it completes after a simulated
    /// fsync latency (sometimes slow).
    fn fsync_start(&mut self, node: NodeIndex) {
        self.nodes[node].disk.fsync_start();
        let latency = self.fsync_latency_us();
        let epoch = self.nodes[node].epoch;
        self.schedule(latency, Event::FsyncDone(node, epoch));
    }

    /// One fsync's latency: 100 µs – 2 ms, sometimes 10 – 80 ms.
    fn fsync_latency_us(&mut self) -> u64 {
        if self.rng.chance(self.profile.slow_fsync_per_million) {
            self.rng.range(10_000, 80_000)
        } else {
            self.rng.range(100, 2_000)
        }
    }

    /// Records due to be sealed at a replica that is no longer the ready leader are given
    /// back: clients are refused (they look for the leader), internal records are dropped
    /// (their origin resends). The runtime's `abort_unsealed`.
    fn abort_unsealed(&mut self, node: NodeIndex) {
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        if live.submissions.is_empty() {
            return;
        }
        let aborted: Vec<Submission> = live.submissions.drain(..).collect();
        for submission in aborted {
            if let Origin::Client(request) = submission.origin {
                self.client_refuse(request);
            }
        }
    }

    /// View change: once `commit_persist_interval_ops` more ops are applied, records the
    /// applied op as the superblock's commit number, so a restart replays that far (the
    /// runtime's `persist_applied`). Returns whether a write started.
    fn persist_applied(&mut self, node: NodeIndex) -> bool {
        if !self.options.view_change || self.io_busy(node) {
            return false;
        }
        let recorded = self.nodes[node].superblock;
        let Some(live) = self.nodes[node].live.as_ref() else {
            return false;
        };
        let applied = live.replica.commit_min();
        if !live.deferred.is_empty()
            || applied < recorded.commit_max + self.profile.commit_persist_interval_ops
        {
            return false;
        }
        self.superblock_start(
            node,
            Superblock {
                commit_max: applied,
                ..recorded
            },
        );
        true
    }

    /// The group commit finished: the core learns what is durable, held Prepares go out
    /// (leader), held acknowledgements go out (follower), and the turn carries on.
    fn fsync_done(&mut self, node: NodeIndex) {
        let now_us = self.now_us;
        let durable = self.nodes[node].disk.fsync_done();
        let live = self.nodes[node].live.as_mut().expect("live");
        let mut actions = std::mem::take(&mut live.actions_held);
        // Known issue 4 (docs/simulator.md): a StartView that arrived during the group
        // commit made the core truncate its log below what this commit wrote (the
        // `Truncate` waits in `deferred`); `on_durable` asserts `op <= op_head`. The runtime
        // calls it with the journal's op and panics; the driver reports the core's head
        // instead, unless told to behave exactly like the runtime.
        let reported = if self.options.view_change && !self.options.no_workarounds {
            durable.min(live.replica.op_head())
        } else {
            durable
        };
        if reported < durable {
            self.summary.durable_above_truncation += 1;
        }
        live.replica.on_durable(now_us, reported, &mut actions);
        let held = std::mem::take(&mut live.held);
        for message in held {
            // The outbox was cleared if the connection broke while they were held.
            if self.connected(message.group, message.from, message.to) {
                self.send(message);
            }
        }
        self.submit_actions(node, &actions);
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
                log_view,
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
                log_view,
                &mut actions,
            );
            if self.options.view_change {
                // As the runtime: each message's actions go out before the next message.
                self.submit_actions(node, &actions);
                actions.clear();
            }
            if disposition != PrepareDisposition::Append {
                continue;
            }
            // The journal verifies the entry and the chain; a refused entry is dropped.
            let decoded = journal::decode_entry(&entry, self.body_bytes_max)
                .ok()
                .filter(|decoded| decoded.meta.op == op && decoded.meta.shard == group);
            let Some(decoded) = decoded else {
                self.check.refused += 1;
                continue;
            };
            // While a log is installed, only its entries may be appended: an entry of an
            // abandoned view can chain onto the same head and still differ.
            let expected = self.nodes[node]
                .live
                .as_ref()
                .and_then(|live| live.replica.expected_checksum(op));
            if bug != Some(Bug::SkipExpectedChecksum)
                && expected.is_some_and(|checksum| checksum != decoded.checksum)
            {
                self.check.refused += 1;
                continue;
            }
            // Known issue 5 (docs/simulator.md): the core says `Append` for the op just past
            // the head of the log it installs (a Prepare of the new view), and then asserts
            // that the install ends exactly at that head. The driver leaves that op for
            // after the install (it comes back through repair).
            let past_install = self.options.view_change
                && !self.options.no_workarounds
                && expected.is_none()
                && self.nodes[node].live.as_ref().is_some_and(|live| {
                    live.replica.log_view() < live.replica.view()
                        && live.replica.expected_checksum(op - 1).is_some()
                });
            if past_install {
                self.summary.append_past_install += 1;
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
                    // As the runtime: an installed log's entry that does not chain onto
                    // the head tells the core its head belongs to an abandoned view.
                    // A refused entry leaves the disk as it was.
                    let disk = &self.nodes[node].disk;
                    let next = op == disk.op_head() + 1;
                    let chains = decoded.checksum_previous == disk.checksum_head();
                    if next
                        && !chains
                        && let Some(live) = self.nodes[node].live.as_mut()
                    {
                        let before = live.replica.counters().chain_mismatches;
                        live.replica.on_chain_mismatch(now_us, op, &mut actions);
                        self.summary.chain_mismatches +=
                            live.replica.counters().chain_mismatches - before;
                        if self.options.view_change {
                            self.submit_actions(node, &actions);
                            actions.clear();
                        }
                    }
                    continue;
                }
            };
            let Some(live) = self.nodes[node].live.as_mut() else {
                break;
            };
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
            let log_view = live.replica.log_view();
            let core_durable = live.replica.op_durable();
            let disk = &self.nodes[node].disk;
            if op_min < disk.retained_min() {
                // As the runtime: the segments holding it were removed.
                let body = Body::NotRetained {
                    op_min,
                    op_retained_min: disk.retained_min(),
                    op_checkpoint: disk.checkpoint_op(),
                };
                self.summary.not_retained += 1;
                self.send_from(node, to, view, body);
                continue;
            }
            // The core's log, not the disk's: a truncation the core made may not have run
            // on the journal yet, and the ops above it are not in the log the core serves
            // from (simulator seed 394: an old leader served its abandoned op 30 as part
            // of the new view's log).
            let op_max = if self.options.bug == Some(Bug::ServeFromDisk) {
                op_max.min(self.nodes[node].disk.op_durable())
            } else {
                op_max
                    .min(self.nodes[node].disk.op_durable())
                    .min(core_durable)
            };
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
                        log_view,
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
        let bug = self.options.bug;
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
            let records: Vec<RecordSlot> = bytemuck::pod_collect_to_vec(decoded.records());
            let requests = descriptors(decoded.requests());
            let results = &mut self.results_buffer[..records.len()];
            live.ledger
                .apply_requests(op, operation, &records, &requests, results);
            live.replica.on_applied(op);
            // As the runtime: every replica produces the legs, a normal leader sends them.
            let leader = live.replica.is_leader() && live.replica.status() == Status::Normal;
            let digest = super::check::digest_sampled(op).then(|| live.ledger.digest());
            // Whoever waits for this op here is answered, leader or not any more: the entry
            // sealed here was not truncated, so it is the one that committed.
            let origins = live.origins.remove(&op).unwrap_or_default();
            let checksum = n.disk.checksum(op).expect("applied entry");
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
                    // A range always lies within the entry sealed with it; only a range kept
                    // past the truncation of its entry (the injected bug) may not.
                    let end = (first + count).min(codes.len());
                    debug_assert!(
                        end == first + count || bug == Some(Bug::KeepOriginsOnTruncate),
                        "op {op}: records {first}..{} of {}",
                        first + count,
                        codes.len()
                    );
                    let codes = &codes[first.min(end)..end];
                    self.client_reply(request, codes, (replica_index, op, checksum, first));
                }
            }
            for message in outbound {
                self.route_outbound(replica_index, message);
            }
            self.checkpoint_maybe(node, op);
        }
    }

    /// `--sync on`: after applying `op`, a checkpoint if `op` is on the interval, then what
    /// the journal keeps (the runtime's `checkpoint_install` with `retain_from_op`).
    fn checkpoint_maybe(&mut self, node: NodeIndex, op: u64) {
        let interval = self.profile.checkpoint_interval_ops;
        if interval == 0 || !op.is_multiple_of(interval) {
            return;
        }
        let n = &mut self.nodes[node];
        let Some(live) = n.live.as_ref() else {
            return;
        };
        if op <= n.disk.checkpoint_op() {
            return;
        }
        let mut snapshot = Vec::new();
        let digest = live.ledger.snapshot_and_digest(&mut snapshot);
        let checksum = n.disk.checksum(op).expect("an applied op is held");
        n.disk.checkpoint_take(Checkpoint {
            op,
            checksum,
            snapshot: Rc::from(snapshot),
            digest,
        });
        let replica = &live.replica;
        let peers_next_min = replica
            .others()
            .map(|peer| replica.peer(peer).op_durable.saturating_add(1))
            .min()
            .unwrap_or(u64::MAX);
        n.disk.retain_from(peers_next_min, self.profile.retain_ops);
        self.summary.checkpoints += 1;
    }

    /// State sync: the checkpoint arrived and the disk is idle: restore the state machine
    /// from it (its digest must be the committed state's at that op), switch the journal
    /// to it, and tell the core (the runtime's `sync::install`).
    fn sync_install_maybe(&mut self, node: NodeIndex) {
        let now_us = self.now_us;
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let disk = &self.nodes[node].disk;
        if disk.has_unsynced() {
            // As the runtime: staged entries are made durable first.
            return;
        }
        let op_head = disk.op_head();
        let Some(live) = self.nodes[node].live.as_mut() else {
            return;
        };
        let Some(checkpoint) = live
            .sync
            .take_if(|sync| sync.arrived.is_some())
            .and_then(|sync| sync.arrived)
        else {
            return;
        };
        if live.replica.state_sync() != Some(checkpoint.op) {
            // The core gave the sync up meanwhile (it timed out).
            return;
        }
        if checkpoint.op <= op_head {
            // As the runtime: the journal reached the checkpoint meanwhile.
            self.summary.state_syncs_failed += 1;
            self.core_call(node, |replica, actions| {
                replica.on_state_sync_failed(now_us, actions);
            });
            return;
        }
        live.ledger = restored(*live.ledger.inner().config(), &checkpoint);
        live.agreed_upto = live.agreed_upto.max(checkpoint.op);
        // Who waited here for an op the checkpoint holds is not answered by this replica
        // (its clients retry elsewhere and get the session's reply).
        live.origins.retain(|op, _| *op > checkpoint.op);
        let (op, checksum, digest) = (checkpoint.op, checkpoint.checksum, checkpoint.digest);
        self.nodes[node].disk.install_checkpoint(checkpoint);
        self.summary.state_syncs_installed += 1;
        if super::check::digest_sampled(op) {
            self.check.digest_observed(group, op, digest, replica);
        }
        self.trace_line(format!(
            "r{replica}g{group} STATE SYNC installed: checkpoint op {op}"
        ));
        self.core_call(node, |replica, actions| {
            replica.on_state_synced(now_us, op, checksum, actions);
        });
    }

    /// Calls the core of live `node` with its action buffer, then executes what it asked.
    fn core_call(&mut self, node: NodeIndex, call: impl FnOnce(&mut Replica, &mut Vec<Action>)) {
        let live = self.nodes[node].live.as_mut().expect("live");
        let mut actions = std::mem::take(&mut live.actions);
        actions.clear();
        call(&mut live.replica, &mut actions);
        self.submit_actions(node, &actions);
        if let Some(live) = self.nodes[node].live.as_mut() {
            live.actions = actions;
        }
    }

    /// State sync: no checkpoint came from the peer in time; the core may start another.
    fn sync_timeout(&mut self, node: NodeIndex, op: u64) {
        let now_us = self.now_us;
        let live = self.nodes[node].live.as_mut().expect("live");
        if !live.sync.as_ref().is_some_and(|sync| sync.waits(op)) {
            return;
        }
        live.sync = None;
        self.summary.state_syncs_failed += 1;
        self.core_call(node, |replica, actions| {
            replica.on_state_sync_failed(now_us, actions);
        });
        self.batcher_turn(node);
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
        if self.options.view_change {
            // The target shard decides when the message arrives (the runtime's mesh drain).
            let epoch = self.nodes[node].epoch;
            self.schedule(1, Event::Mesh(node, epoch, submission));
            return;
        }
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

    /// A credit leg reaches its target shard on this replica over the mesh: submitted if
    /// this replica is the group's ready leader, else forwarded to the group's leader (the
    /// runtime's mesh drain).
    fn mesh_arrive(&mut self, node: NodeIndex, submission: Submission) {
        let Some(live) = self.nodes[node].live.as_ref() else {
            return;
        };
        if !self.options.view_change || live.replica.is_ready_leader() {
            self.submit(node, submission);
            return;
        }
        let (replica, group) = (self.nodes[node].replica, self.nodes[node].group);
        let leader = live.replica.leader();
        if leader == replica {
            // Leader of a view it has not finished taking over: the origin resends.
            return;
        }
        let view = live.replica.view();
        self.send(Message {
            from: replica,
            to: leader,
            group,
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
        if !live.replica.is_ready_leader() || live.submissions.len() >= SUBMISSIONS_QUEUED_MAX {
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
        let handoffs = live.replica.counters().leader_handoffs;
        live.replica.tick(now_us, &mut actions);
        if live.replica.counters().leader_handoffs > handoffs {
            self.summary.leader_handoffs += 1;
            let group = self.nodes[node].group;
            self.handoff_pending[group as usize] = true;
        }
        self.submit_actions(node, &actions);
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
        // Also with ops in the pipeline, as the runtime (steady load always has some).
        if !live.replica.is_ready_leader() {
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
        // One id per client of a group (the set-up requests share their group's last one).
        let client_id = (u128::from(group) + 1) << 32 | (client as u32 as u128);
        let request_number = {
            let number = self.request_numbers.entry(client_id).or_insert(0);
            *number += 1;
            *number
        };
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
            target: self.client_hint[group as usize],
            acked_op: None,
            acked_record: 0,
            client_id,
            request_number,
            invoked_after: None,
        });
        self.check
            .linearizability
            .invoked(request, &mut self.history[request]);
        self.client_send(request);
    }

    fn client_send(&mut self, request: usize) {
        self.history[request].attempts += 1;
        let attempt = self.history[request].attempts;
        let target = self.history[request].target;
        let delay = self.rng.range(20, 500);
        self.schedule(delay, Event::ClientArrive(request, target));
        self.schedule(CLIENT_RETRY_US, Event::ClientTimeout(request, attempt));
    }

    /// The request reaches a replica (clients talk to it directly, outside the replica
    /// network); lost if it is down. In the fixed view clients know the leader. With view
    /// change a replica that is not the group's ready leader refuses (`NOT_LEADER`), and the
    /// client tries the next replica, with the same transfer ids.
    fn client_arrive(&mut self, request: usize, target: u8) {
        if self.history[request].ack_us.is_some() {
            return;
        }
        let group = self.history[request].group;
        let replica = if self.options.view_change {
            target
        } else {
            self.leader_of(group)
        };
        let node = self.node_index(replica, group);
        let submission = Submission {
            operation: self.history[request].operation,
            records: self.history[request].records.clone(),
            origin: Origin::Client(request),
        };
        if self.options.view_change
            && self.nodes[node]
                .live
                .as_ref()
                .is_some_and(|live| !live.replica.is_ready_leader())
        {
            self.client_refuse(request);
            return;
        }
        self.submit(node, submission);
    }

    /// A replica refuses the request (not the ready leader, or the op holding it was cut):
    /// the answer reaches the client after a network delay.
    fn client_refuse(&mut self, request: usize) {
        if !self.options.view_change || self.history[request].ack_us.is_some() {
            return;
        }
        self.summary.refusals += 1;
        let attempt = self.history[request].attempts;
        let delay = self.rng.range(20, 500);
        self.schedule(delay, Event::ClientRefused(request, attempt));
    }

    /// Refused: after a short back-off the client tries the next replica (as after a
    /// timeout; the refused attempt's own timeout is void).
    fn client_refused(&mut self, request: usize, attempt: u32) {
        let state = &mut self.history[request];
        if state.ack_us.is_some() || state.attempts != attempt {
            return;
        }
        state.attempts += 1;
        let attempt = state.attempts;
        self.schedule(
            CLIENT_REFUSED_BACKOFF_US,
            Event::ClientTimeout(request, attempt),
        );
    }

    /// No answer in time (or refused): send again, with view change to the next view's leader.
    fn client_timeout(&mut self, request: usize, attempt: u32) {
        let replicas = self.options.replicas;
        let view_change = self.options.view_change;
        let state = &mut self.history[request];
        if state.ack_us.is_none() && state.attempts == attempt {
            if view_change {
                // As the real client: the leader of the view after the one the target leads.
                state.target =
                    percore_engine::placement::leader_next(state.group, state.target, replicas);
            }
            self.client_send(request);
        }
    }

    /// The replica `replica` applied op `op` (checksum `checksum`) holding the request from
    /// record `first` on, and answers with `codes`.
    fn client_reply(
        &mut self,
        request: usize,
        codes: &[u32],
        (replica, op, checksum, first): (u8, u64, JournalChecksum, usize),
    ) {
        let now_us = self.now_us;
        let state = &mut self.history[request];
        state.replies += 1;
        if state.ack_us.is_some() {
            return;
        }
        state.ack_us = Some(now_us);
        state.results = codes.to_vec();
        state.acked_op = Some((op, checksum));
        state.acked_record = first;
        let line = format!("request {request} acknowledged by r{replica} (op {op}): {codes:?}");
        self.trace_line(line);
        let state = &self.history[request];
        self.summary.requests += 1;
        let (group, client) = (state.group, state.client);
        self.client_hint[group as usize] = replica;
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
        if self.options.view_change {
            self.fault_view_change();
            let delay = self.rng.range(
                self.profile.fault_interval_us / 2,
                self.profile.fault_interval_us * 2,
            );
            self.schedule(delay, Event::Fault);
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
                self.corrupt_maybe(replica);
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

    /// The fault mix with view change: crashes, restarts, partitions, heals and pauses,
    /// half of the crashes, pauses and isolations aimed at a group's ready leader.
    fn fault_view_change(&mut self) {
        let replicas = self.options.replicas;
        let up: Vec<u8> = (0..replicas).filter(|r| self.replica_up(*r)).collect();
        let down: Vec<u8> = (0..replicas).filter(|r| !self.replica_up(*r)).collect();
        let draw = self.rng.below(100);
        // A ready leader of a random group, if there is one up and running.
        let group = self.rng.below(u64::from(self.options.groups)) as u32;
        let leader = (0..replicas).find(|replica| {
            self.paused_until[usize::from(*replica)].is_none()
                && self.nodes[self.node_index(*replica, group)]
                    .live
                    .as_ref()
                    .is_some_and(|live| live.replica.is_ready_leader())
        });
        let aim = leader.filter(|_| self.rng.chance(500_000));
        if aim.is_some() && (draw < 25 || (45..60).contains(&draw) || (72..85).contains(&draw)) {
            self.summary.leader_faults += 1;
        }
        if draw < 25 {
            // Otherwise prefer a replica with a write in flight (group commit or
            // superblock): that is when a lost write can hurt.
            let busy: Vec<u8> = up
                .iter()
                .copied()
                .filter(|r| (0..self.options.groups).any(|g| self.io_busy(self.node_index(*r, g))))
                .collect();
            let pool = if !busy.is_empty() && self.rng.chance(600_000) {
                busy
            } else {
                up.clone()
            };
            let victim = aim.or_else(|| {
                (!pool.is_empty()).then(|| pool[self.rng.below(pool.len() as u64) as usize])
            });
            if let Some(victim) = victim
                && down.len() + 1 < usize::from(replicas)
            {
                self.crash(victim);
            }
        } else if draw < 45 {
            if !down.is_empty() {
                let replica = down[self.rng.below(down.len() as u64) as usize];
                self.trace_line(format!("replica {replica} RESTART"));
                if !self.replace_maybe(replica) {
                    self.corrupt_maybe(replica);
                }
                self.restart(replica);
            }
        } else if draw < 60 {
            self.summary.partitions += 1;
            let isolated = aim.unwrap_or_else(|| self.rng.below(u64::from(replicas)) as u8);
            if aim.is_some() || self.rng.chance(500_000) {
                self.sides.iter_mut().for_each(|side| *side = 0);
                self.sides[usize::from(isolated)] = 1;
            } else {
                for side in self.sides.iter_mut() {
                    *side = self.rng.below(2) as u8;
                }
            }
            self.trace_line(format!("PARTITION sides {:?}", self.sides));
            self.topology_changed();
        } else if draw < 72 {
            self.sides.iter_mut().for_each(|side| *side = 0);
            self.trace_line("HEAL partition".to_string());
            self.topology_changed();
        } else if draw < 85 {
            let running: Vec<u8> = up
                .iter()
                .copied()
                .filter(|r| self.paused_until[usize::from(*r)].is_none())
                .collect();
            let victim = aim.or_else(|| {
                (!running.is_empty())
                    .then(|| running[self.rng.below(running.len() as u64) as usize])
            });
            if let Some(victim) = victim
                && running.len() > 1
            {
                let pause_us = self.rng.range(PAUSE_US_MIN, PAUSE_US_MAX);
                self.paused_until[usize::from(victim)] = Some(self.now_us + pause_us);
                self.summary.pauses += 1;
                self.trace_line(format!("replica {victim} PAUSED for {pause_us} us"));
            }
        }
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
        if self.options.view_change {
            return self.group_converged_view_change(group);
        }
        let leader_node = &self.nodes[self.node_index(self.leader_of(group), group)];
        let Some(leader) = leader_node.live.as_ref() else {
            return false;
        };
        let head = leader_node.disk.op_head();
        // The group's highest committed op, not the leader's `commit_max`: a restarted
        // leader's is 0 until it commits a new op (docs/simulator.md, known issue 1).
        if self.check.group_commit[group as usize] < head
            || !leader.submissions.is_empty()
            || leader.ledger.inner().credit_legs_unacked_count() > 0
        {
            return false;
        }
        (0..self.options.replicas).all(|replica| {
            let node = &self.nodes[self.node_index(replica, group)];
            node.live.as_ref().is_some_and(|live| {
                node.disk.op_durable() == head
                    && live.replica.commit_min() == head
                    && live.replica.recovering().is_none()
            })
        })
    }

    /// With view change: one ready leader in the group's highest view, which committed and
    /// applied its whole journal, with nothing queued; every replica normal in that view,
    /// its log installed (`log_view`), holding and having applied the leader's journal;
    /// nothing deferred, nobody paused.
    fn group_converged_view_change(&self, group: u32) -> bool {
        let Some(leader) = self.ready_leader(group) else {
            return false;
        };
        let leader_node = &self.nodes[self.node_index(leader, group)];
        let live = leader_node.live.as_ref().expect("ready leader is up");
        let (view, head) = (live.replica.view(), leader_node.disk.op_head());
        if live.replica.commit_max() < head
            || !live.submissions.is_empty()
            || live.ledger.inner().credit_legs_unacked_count() > 0
        {
            return false;
        }
        (0..self.options.replicas).all(|replica| {
            let node = &self.nodes[self.node_index(replica, group)];
            self.paused_until[usize::from(replica)].is_none()
                && node.live.as_ref().is_some_and(|live| {
                    live.replica.view() == view
                        && live.replica.log_view() == view
                        && live.replica.status() == Status::Normal
                        && live.deferred.is_empty()
                        && node.disk.op_durable() == head
                        && node.disk.checksum(head) == leader_node.disk.checksum(head)
                        && live.replica.commit_min() == head
                        && live.replica.recovering().is_none()
                })
        })
    }

    /// The group's available leader: up, running, a ready leader, in the highest view any
    /// replica of the group that is up has joined.
    pub(super) fn ready_leader(&self, group: u32) -> Option<u8> {
        let view = self.group_view(group);
        (0..self.options.replicas).find(|replica| {
            self.paused_until[usize::from(*replica)].is_none()
                && self.nodes[self.node_index(*replica, group)]
                    .live
                    .as_ref()
                    .is_some_and(|live| {
                        live.replica.is_ready_leader() && live.replica.view() == view
                    })
        })
    }

    /// The highest view a replica of `group` that is up has joined.
    fn group_view(&self, group: u32) -> u64 {
        (0..self.options.replicas)
            .filter_map(|replica| {
                let node = &self.nodes[self.node_index(replica, group)];
                node.live.as_ref().map(|live| live.replica.view())
            })
            .max()
            .unwrap_or(0)
    }

    /// Failover times: how long each group goes without an available leader.
    fn leaders_observe(&mut self) {
        for group in 0..self.options.groups {
            let has_leader = self.ready_leader(group).is_some();
            let since = self.leaderless_since[group as usize];
            match (has_leader, since) {
                (false, None) => self.leaderless_since[group as usize] = Some(self.now_us),
                (true, Some(since)) => {
                    self.leaderless_since[group as usize] = None;
                    let took_us = self.now_us - since;
                    let bucket = FAILOVER_BUCKETS_US
                        .iter()
                        .position(|bound| took_us <= *bound)
                        .unwrap_or(FAILOVER_BUCKETS_US.len());
                    self.summary.failovers += 1;
                    self.summary.failover_buckets[bucket] += 1;
                    self.summary.failover_us_max = self.summary.failover_us_max.max(took_us);
                    if std::mem::take(&mut self.handoff_pending[group as usize]) {
                        self.summary.handoff_periods += 1;
                        self.summary.handoff_us_sum += took_us;
                        self.summary.handoff_us_max = self.summary.handoff_us_max.max(took_us);
                    }
                    self.trace_line(format!(
                        "group {group} has a ready leader again after {took_us} us"
                    ));
                }
                _ => {}
            }
        }
    }

    /// The replica an event runs on, if it runs on one (for pauses).
    fn event_replica(&self, event: &Event) -> Option<u8> {
        if !self.options.view_change {
            return None;
        }
        match event {
            Event::Deliver(message, _) => Some(message.to),
            Event::FsyncDone(node, _)
            | Event::Timer(node, _)
            | Event::Mesh(node, _, _)
            | Event::SyncTimeout(node, _, _)
            | Event::SuperblockDone(node, _) => Some(self.nodes[*node].replica),
            Event::ConnectionUp(_, from, _) => Some(*from),
            Event::ClientArrive(_, target) => Some(*target),
            Event::ClientTimeout(..)
            | Event::ClientRefused(..)
            | Event::ClientNext(..)
            | Event::Fault => None,
        }
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
                "; r{}g{}: view {} log_view {} {:?}{} ready leader {}, {} deferred, disk head {} durable {}, op_head {} op_durable {} commit_max {} commit_min {}, {} queued, {} legs unacked",
                node.replica,
                node.group,
                live.replica.view(),
                live.replica.log_view(),
                live.replica.status(),
                if self.paused_until[usize::from(node.replica)].is_some() {
                    " PAUSED"
                } else {
                    ""
                },
                live.replica.is_ready_leader(),
                live.deferred.len(),
                node.disk.op_head(),
                node.disk.op_durable(),
                live.replica.op_head(),
                live.replica.op_durable(),
                live.replica.commit_max(),
                live.replica.commit_min(),
                live.submissions.len(),
                live.ledger.inner().credit_legs_unacked_count(),
            ));
        }
        report
    }
}

/// The checksums of ops `op_min..=op_max` as the core knows them (what a DoViewChange or
/// StartView body carries), or `None` if it no longer knows one.
fn checksums_of(replica: &Replica, op_min: u64, op_max: u64) -> Option<Rc<[JournalChecksum]>> {
    (op_min..=op_max)
        .map(|op| replica.checksum_at(op))
        .collect::<Option<Vec<_>>>()
        .map(Rc::from)
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
                Body::Snapshot { checkpoint } => format!(
                    "Snapshot op {} ({} bytes)",
                    checkpoint.op,
                    checkpoint.snapshot.len()
                ),
                other => format!("{other:?}"),
            };
            format!(
                "deliver g{} r{}->r{} v{}: {body}",
                message.group, message.from, message.to, message.view
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
        Event::ClientArrive(request, target) => {
            format!("client request {request} arrives at r{target}")
        }
        Event::ClientRefused(request, attempt) => {
            format!("client request {request} refused (attempt {attempt})")
        }
        Event::SuperblockDone(index, _) => format!("superblock written {}", node(index)),
        Event::ClientTimeout(request, attempt) => {
            format!("client request {request} timeout (attempt {attempt})")
        }
        Event::ClientNext(group, client) => format!("client {client} of g{group} next"),
        Event::SyncTimeout(index, _, op) => format!("state sync timeout {} op {op}", node(index)),
        Event::Fault => "fault".to_string(),
    }
}

/// Sessions per group in the simulator: more than its clients, so none is evicted and every
/// retry is answered from its session.
pub const SESSION_CLIENTS_MAX: usize = 8;
// The set-up requests use one more client id per group.
const _: () = assert!(CLIENTS_PER_GROUP < SESSION_CLIENTS_MAX);

/// The state machine a simulated node runs: `ledger` with its client sessions.
pub fn sessioned(ledger: Ledger) -> Sessioned<Ledger> {
    Sessioned::new(ledger, SESSION_CLIENTS_MAX, BATCH_RECORDS_MAX)
}

/// A node's state machine restored from `checkpoint`, whose recorded digest it must have.
fn restored(config: LedgerConfig, checkpoint: &Checkpoint) -> Sessioned<Ledger> {
    let mut ledger = sessioned(Ledger::with_hash_seed(config, LEDGER_HASH_SEED));
    ledger
        .restore(&checkpoint.snapshot)
        .expect("a checkpoint restores");
    assert_eq!(
        ledger.digest(),
        checkpoint.digest,
        "the snapshot's recorded digest"
    );
    ledger
}

/// The request descriptors in an entry's bytes.
pub fn descriptors(bytes: &[u8]) -> Vec<RequestDescriptor> {
    let mut out = vec![RequestDescriptor::default(); BATCH_RECORDS_MAX];
    let count = journal::request_descriptors(bytes, &mut out).expect("verified entry");
    out.truncate(count);
    out
}
