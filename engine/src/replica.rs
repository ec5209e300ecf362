//! The sans-IO replication core of one replication group on one replica.
//!
//! A replication group is shard `k` on every node; its leader in view `v` is replica
//! `(k + v) mod N` (`docs/protocol.md`, section 1). This module owns the protocol decisions
//! of normal operation: which op is committed (a majority, the leader included, has it
//! durable), what a follower does with a `Prepare` (append, re-acknowledge, or repair a
//! gap), when heartbeats and pings go out, which peer a repair request goes to (the lowest
//! latency score, RFC 6298 estimates) and when it times out.
//!
//! It performs no I/O, reads no clock and draws no randomness of its own: every input
//! carries `now_us`, the routing RNG is seeded from the configuration, and decisions come
//! back as [`Action`]s in a caller-owned buffer. The io_uring runtime (`percore_shards`)
//! executes them; the simulator will drive the same code. Bytes (entries) never pass
//! through here: the runtime moves them, this core only tracks ops and checksums.
//!
//! Scope today: one view per group (view 0 unless configured), no view change. The leader
//! makes an op durable in its own journal *before* it sends the `Prepare`, so every
//! follower's log is a prefix of the leader's, even across a leader restart; the view
//! change of `docs/protocol.md` section 7 replaces that rule when failover lands.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use crate::journal::JournalChecksum;

/// Most replicas a group may have (quorums of 4).
pub const REPLICA_COUNT_MAX: usize = 7;
/// Default most ops prepared and not yet committed (leader).
pub const PIPELINE_PREPARES_MAX_DEFAULT: u64 = 128;
/// Default interval of `Commit` heartbeats to a follower that got no `Prepare` (µs).
pub const HEARTBEAT_INTERVAL_US_DEFAULT: u64 = 20_000;
/// Default interval of `Ping`s to every peer (µs).
pub const PING_INTERVAL_US_DEFAULT: u64 = 100_000;
/// Default most ops one repair request asks for.
pub const REPAIR_OPS_MAX_DEFAULT: u64 = 64;
/// Default bounds of a repair request's timeout (µs): `clamp(2 · score, min, max)`.
pub const REPAIR_TIMEOUT_US_MIN_DEFAULT: u64 = 2_000;
/// See [`REPAIR_TIMEOUT_US_MIN_DEFAULT`].
pub const REPAIR_TIMEOUT_US_MAX_DEFAULT: u64 = 500_000;
/// Default: one repair request in this many goes to a random eligible peer.
pub const ROUTING_EXPLORE_ONE_IN_DEFAULT: u32 = 16;
/// Most actions one call can produce: a few per peer.
pub const ACTIONS_MAX: usize = 4 * REPLICA_COUNT_MAX;

const _: () = assert!(REPLICA_COUNT_MAX <= 8, "ack sets fit a u8");
const _: () = assert!(REPAIR_TIMEOUT_US_MIN_DEFAULT < REPAIR_TIMEOUT_US_MAX_DEFAULT);
const _: () = assert!(PING_INTERVAL_US_DEFAULT >= HEARTBEAT_INTERVAL_US_DEFAULT);

/// Limits and identity of one replica of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The group (shard index).
    pub group: u32,
    /// This replica's index, `< replica_count`.
    pub replica: u8,
    /// Replicas in the group.
    pub replica_count: u8,
    /// The view (fixed until view change lands).
    pub view: u64,
    /// Most ops prepared and not yet committed.
    pub pipeline_prepares_max: u64,
    /// Heartbeat interval (µs).
    pub heartbeat_interval_us: u64,
    /// Ping interval (µs).
    pub ping_interval_us: u64,
    /// Most ops per repair request.
    pub repair_ops_max: u64,
    /// Repair timeout lower bound (µs).
    pub repair_timeout_us_min: u64,
    /// Repair timeout upper bound (µs).
    pub repair_timeout_us_max: u64,
    /// One repair request in this many goes to a random eligible peer.
    pub routing_explore_one_in: u32,
    /// Seed of the routing RNG (injected, so one seed replays one run).
    pub seed: u64,
}

/// A configuration that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaConfigError {
    /// `replica_count` is 0 or above [`REPLICA_COUNT_MAX`].
    #[error("replica_count {0} must be in 1..={REPLICA_COUNT_MAX}")]
    ReplicaCount(u8),
    /// `replica` is not below `replica_count`.
    #[error("replica {replica} must be below replica_count {replica_count}")]
    Replica {
        /// The index given.
        replica: u8,
        /// Replicas in the group.
        replica_count: u8,
    },
    /// A limit is zero or the timeout bounds are reversed.
    #[error("limit {0} is out of range")]
    Limit(&'static str),
}

impl ReplicaConfig {
    /// Defaults for replica `replica` of `replica_count` in `group`.
    pub fn new(
        group: u32,
        replica: u8,
        replica_count: u8,
        seed: u64,
    ) -> Result<Self, ReplicaConfigError> {
        let config = Self {
            group,
            replica,
            replica_count,
            view: 0,
            pipeline_prepares_max: PIPELINE_PREPARES_MAX_DEFAULT,
            heartbeat_interval_us: HEARTBEAT_INTERVAL_US_DEFAULT,
            ping_interval_us: PING_INTERVAL_US_DEFAULT,
            repair_ops_max: REPAIR_OPS_MAX_DEFAULT,
            repair_timeout_us_min: REPAIR_TIMEOUT_US_MIN_DEFAULT,
            repair_timeout_us_max: REPAIR_TIMEOUT_US_MAX_DEFAULT,
            routing_explore_one_in: ROUTING_EXPLORE_ONE_IN_DEFAULT,
            seed,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), ReplicaConfigError> {
        if self.replica_count == 0 || usize::from(self.replica_count) > REPLICA_COUNT_MAX {
            return Err(ReplicaConfigError::ReplicaCount(self.replica_count));
        }
        if self.replica >= self.replica_count {
            return Err(ReplicaConfigError::Replica {
                replica: self.replica,
                replica_count: self.replica_count,
            });
        }
        let limits = [
            (self.pipeline_prepares_max, "pipeline_prepares_max"),
            (self.heartbeat_interval_us, "heartbeat_interval_us"),
            (self.ping_interval_us, "ping_interval_us"),
            (self.repair_ops_max, "repair_ops_max"),
            (self.repair_timeout_us_min, "repair_timeout_us_min"),
            (
                u64::from(self.routing_explore_one_in),
                "routing_explore_one_in",
            ),
        ];
        for (value, name) in limits {
            if value == 0 {
                return Err(ReplicaConfigError::Limit(name));
            }
        }
        if self.repair_timeout_us_max < self.repair_timeout_us_min {
            return Err(ReplicaConfigError::Limit("repair_timeout_us_max"));
        }
        Ok(())
    }

    /// How long a repair request to a peer with `latency` may go unanswered:
    /// `clamp(2 · score, min, max)`; a peer never measured gets a quarter of the maximum
    /// (its first answer may come from a cold disk).
    pub fn repair_timeout_us(&self, latency: &LatencyEstimate) -> u64 {
        if latency.samples == 0 {
            return (self.repair_timeout_us_max / 4).max(self.repair_timeout_us_min);
        }
        (2 * latency.score_us()).clamp(self.repair_timeout_us_min, self.repair_timeout_us_max)
    }

    /// Replicas whose durable copy commits an op: `⌊N/2⌋ + 1`.
    pub fn quorum(&self) -> usize {
        usize::from(self.replica_count) / 2 + 1
    }

    /// The leader of `view`: `(group + view) mod N`.
    pub fn leader_of(&self, view: u64) -> u8 {
        ((u64::from(self.group) + view) % u64::from(self.replica_count)) as u8
    }
}

/// What the core asks the runtime to do. Sends name the peer; the runtime fills in the
/// message header (view, replica, group) and, for `ServeRepair`, reads the entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Acknowledge everything durable up to `op` (cumulative) to the leader.
    PrepareOk {
        /// The leader.
        to: u8,
        /// This replica's `op_durable`.
        op: u64,
        /// `checksum(op)`.
        checksum: JournalChecksum,
        /// This replica's `commit_min`.
        commit_min: u64,
    },
    /// Heartbeat carrying the commit number.
    Commit {
        /// A follower.
        to: u8,
        /// The leader's `commit_max`.
        commit: u64,
        /// The leader's highest durable op (what followers may repair up to).
        op_head: u64,
    },
    /// Latency probe and progress report.
    Ping {
        /// A peer.
        to: u8,
        /// Sender clock.
        time_us: u64,
        /// Sender's `op_durable`.
        op_durable: u64,
        /// Sender's `commit_min`.
        commit_min: u64,
    },
    /// Answer to a ping (echoes its time).
    Pong {
        /// The pinger.
        to: u8,
        /// The ping's `time_us`.
        time_us: u64,
        /// Sender's `op_durable`.
        op_durable: u64,
        /// Sender's `commit_min`.
        commit_min: u64,
    },
    /// Ask `to` for the entries `op_min..=op_max`.
    RequestPrepare {
        /// The peer chosen by the routing rule.
        to: u8,
        /// First op wanted.
        op_min: u64,
        /// Last op wanted.
        op_max: u64,
    },
    /// Send `to` the entries `op_min..=op_max` from the journal, oldest first, as
    /// `PrepareRepair` (all of them are durable here).
    ServeRepair {
        /// The requester.
        to: u8,
        /// First op.
        op_min: u64,
        /// Last op.
        op_max: u64,
    },
}

/// What to do with a `Prepare` or `PrepareRepair` that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareDisposition {
    /// The next op: stage it in the journal (the journal checks the chain), then call
    /// [`Replica::on_staged`].
    Append,
    /// Already held; nothing to write (a re-acknowledgement may be among the actions).
    Duplicate,
    /// Beyond a gap: dropped; a repair request is among the actions (or already in flight).
    Gap,
    /// From another view or a replica that is not the leader: ignored.
    Ignore,
}

/// Per-peer latency estimate (RFC 6298, integer): `score = srtt + 4 · rttvar`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyEstimate {
    /// Smoothed round trip (µs).
    pub srtt_us: u64,
    /// Round-trip variation (µs).
    pub rttvar_us: u64,
    /// Samples taken.
    pub samples: u64,
}

impl LatencyEstimate {
    /// Feeds one sample (µs).
    pub fn sample(&mut self, sample_us: u64) {
        if self.samples == 0 {
            self.srtt_us = sample_us;
            self.rttvar_us = sample_us / 2;
        } else {
            let deviation = self.srtt_us.abs_diff(sample_us);
            self.rttvar_us = (self.rttvar_us * 3 + deviation) / 4;
            self.srtt_us = (self.srtt_us * 7 + sample_us) / 8;
        }
        self.samples += 1;
    }

    /// `srtt + 4 · rttvar`, an estimate of a high percentile; 0 before any sample, so a
    /// peer never measured is tried first.
    pub fn score_us(&self) -> u64 {
        self.srtt_us + 4 * self.rttvar_us
    }
}

/// What this replica knows of one peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerState {
    /// An authenticated connection to it is up (the runtime says so).
    pub connected: bool,
    /// Its highest durable op, as last reported (acks, pings, commits).
    pub op_durable: u64,
    /// Its highest applied op, as last reported.
    pub commit_min: u64,
    /// Leader: its cumulative acknowledgement in this view.
    pub ack_op: u64,
    /// Latency estimate (acks, repairs, pings).
    pub latency: LatencyEstimate,
    /// Last time anything was sent to it (µs).
    pub sent_us: u64,
    /// Last ping sent (µs).
    pub ping_sent_us: u64,
    /// Repair requests to it not yet answered in full.
    pub repairs_inflight: u8,
}

/// One op in the leader's pipeline.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    op: u64,
    checksum: JournalChecksum,
    staged_us: u64,
    durable_us: u64,
}

/// One outstanding repair request.
#[derive(Debug, Clone, Copy)]
struct Repair {
    peer: u8,
    op_min: u64,
    op_max: u64,
    sent_us: u64,
    deadline_us: u64,
    answered: bool,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaCounters {
    /// Repair requests sent.
    pub repairs_requested: u64,
    /// Repair requests that timed out.
    pub repairs_timed_out: u64,
    /// Repair requests served.
    pub repairs_served: u64,
    /// Prepares dropped behind a gap.
    pub prepares_gap: u64,
    /// Duplicate prepares.
    pub prepares_duplicate: u64,
    /// Acknowledgements ignored (another view, unknown checksum).
    pub acks_ignored: u64,
}

/// The replication state of one group on one replica. See the module docs.
#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    /// Highest op staged in the local journal.
    op_head: u64,
    checksum_head: JournalChecksum,
    /// Highest op durable in the local journal.
    op_durable: u64,
    checksum_durable: JournalChecksum,
    /// Highest op known committed.
    commit_max: u64,
    /// Highest op applied.
    commit_min: u64,
    /// Highest op known to exist somewhere (repair target).
    op_known_max: u64,
    /// Leader: slots indexed by `op % capacity`.
    pipeline: Box<[Slot]>,
    peers: [PeerState; REPLICA_COUNT_MAX],
    /// Outstanding repair request (one at a time: entries are appended in order and
    /// nothing is buffered behind a gap, so parallel ranges would arrive out of order).
    repair: Option<Repair>,
    ping_next_us: u64,
    heartbeat_next_us: u64,
    rng: u64,
    counters: ReplicaCounters,
}

impl Replica {
    /// A replica whose journal recovered up to `op_recovered` (durable, chain head
    /// `checksum_recovered`), all of it already applied by replay.
    pub fn new(
        config: ReplicaConfig,
        op_recovered: u64,
        checksum_recovered: JournalChecksum,
        now_us: u64,
    ) -> Result<Self, ReplicaConfigError> {
        config.validate()?;
        let capacity = (config.pipeline_prepares_max * 2).next_power_of_two() as usize;
        Ok(Self {
            config,
            op_head: op_recovered,
            checksum_head: checksum_recovered,
            op_durable: op_recovered,
            checksum_durable: checksum_recovered,
            // Replay applied the whole journal; a leader's journal is the group's log and a
            // follower's a prefix of it, so none of it is ever undone (module docs).
            commit_max: 0,
            commit_min: op_recovered,
            op_known_max: op_recovered,
            pipeline: vec![Slot::default(); capacity].into_boxed_slice(),
            peers: [PeerState::default(); REPLICA_COUNT_MAX],
            repair: None,
            ping_next_us: now_us,
            heartbeat_next_us: now_us,
            rng: config.seed | 1,
            counters: ReplicaCounters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Current view.
    pub fn view(&self) -> u64 {
        self.config.view
    }

    /// The leader of the current view.
    pub fn leader(&self) -> u8 {
        self.config.leader_of(self.config.view)
    }

    /// Whether this replica leads its group.
    pub fn is_leader(&self) -> bool {
        self.leader() == self.config.replica
    }

    /// Highest op staged locally.
    pub fn op_head(&self) -> u64 {
        self.op_head
    }

    /// Checksum of `op_head` (the chain head).
    pub fn checksum_head(&self) -> JournalChecksum {
        self.checksum_head
    }

    /// Highest op durable locally.
    pub fn op_durable(&self) -> u64 {
        self.op_durable
    }

    /// Highest op known committed.
    pub fn commit_max(&self) -> u64 {
        self.commit_max
    }

    /// Highest op applied.
    pub fn commit_min(&self) -> u64 {
        self.commit_min
    }

    /// Highest op that may be applied now: committed and held locally.
    pub fn apply_limit(&self) -> u64 {
        self.commit_max.min(self.op_durable)
    }

    /// What this replica knows of `peer`.
    pub fn peer(&self, peer: u8) -> &PeerState {
        &self.peers[usize::from(peer)]
    }

    /// Counters for metrics.
    pub fn counters(&self) -> ReplicaCounters {
        self.counters
    }

    /// Iterates the other replicas' indexes.
    pub fn others(&self) -> impl Iterator<Item = u8> + use<> {
        let me = self.config.replica;
        (0..self.config.replica_count).filter(move |peer| *peer != me)
    }

    /// Leader: whether one more op may be sealed (the pipeline has room).
    pub fn can_seal(&self) -> bool {
        self.is_leader() && self.op_head - self.commit_max.min(self.op_head) < self.pipeline_room()
    }

    fn pipeline_room(&self) -> u64 {
        self.config.pipeline_prepares_max
    }

    /// When the op `op` was staged here (leader, while in the pipeline window).
    pub fn staged_us(&self, op: u64) -> Option<u64> {
        let slot = &self.pipeline[self.slot_index(op)];
        (slot.op == op).then_some(slot.staged_us)
    }

    fn slot_index(&self, op: u64) -> usize {
        (op as usize) & (self.pipeline.len() - 1)
    }

    /// The runtime staged `op` (chained to the previous head) in the journal.
    pub fn on_staged(&mut self, now_us: u64, op: u64, checksum: JournalChecksum) {
        assert_eq!(op, self.op_head + 1, "ops are staged in order");
        self.op_head = op;
        self.checksum_head = checksum;
        self.op_known_max = self.op_known_max.max(op);
        let index = self.slot_index(op);
        self.pipeline[index] = Slot {
            op,
            checksum,
            staged_us: now_us,
            durable_us: 0,
        };
    }

    /// The journal made everything up to `op` durable. A leader counts itself (and then
    /// sends the Prepares: the runtime flushes them after this); a follower acknowledges.
    pub fn on_durable(&mut self, now_us: u64, op: u64, actions: &mut Vec<Action>) {
        assert!(op <= self.op_head && op >= self.op_durable);
        for durable in self.op_durable + 1..=op {
            let index = self.slot_index(durable);
            if self.pipeline[index].op == durable {
                self.pipeline[index].durable_us = now_us;
            }
        }
        self.op_durable = op;
        self.checksum_durable = self.checksum_head_at(op);
        if self.is_leader() {
            self.commit_advance();
        } else {
            self.acknowledge(actions);
            self.repair_schedule(now_us, actions);
        }
    }

    fn checksum_head_at(&self, op: u64) -> JournalChecksum {
        if op == self.op_head {
            return self.checksum_head;
        }
        let slot = &self.pipeline[self.slot_index(op)];
        assert_eq!(slot.op, op, "durable op is within the pipeline window");
        slot.checksum
    }

    fn acknowledge(&mut self, actions: &mut Vec<Action>) {
        let leader = self.leader();
        push(
            actions,
            Action::PrepareOk {
                to: leader,
                op: self.op_durable,
                checksum: self.checksum_durable,
                commit_min: self.commit_min,
            },
        );
    }

    /// Leader: `from` acknowledged everything up to `op` in `view`. Returns the ack
    /// latency sample taken (µs from the op's durability here to this ack), if any.
    pub fn on_prepare_ok(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        op: u64,
        checksum: JournalChecksum,
        commit_min: u64,
    ) -> Option<u64> {
        if !self.is_leader() || view != self.config.view || from == self.config.replica {
            self.counters.acks_ignored += 1;
            return None;
        }
        let slot = self.pipeline[self.slot_index(op)];
        let known = if op == 0 {
            checksum == crate::journal::JOURNAL_CHAIN_ROOT
        } else {
            op <= self.op_durable && slot.op == op && slot.checksum == checksum
        };
        let peer = &mut self.peers[usize::from(from)];
        peer.commit_min = peer.commit_min.max(commit_min);
        if !known {
            // An op older than the pipeline window (a follower catching up) cannot move the
            // commit point; anything else would be a bug or a foreign log.
            self.counters.acks_ignored += 1;
            peer.op_durable = peer.op_durable.max(op.min(self.op_durable));
            return None;
        }
        let mut sample = None;
        if op > peer.ack_op && slot.durable_us > 0 {
            let latency_us = now_us.saturating_sub(slot.durable_us);
            peer.latency.sample(latency_us);
            sample = Some(latency_us);
        }
        peer.ack_op = peer.ack_op.max(op);
        peer.op_durable = peer.op_durable.max(op);
        self.commit_advance();
        sample
    }

    /// The highest op held durable by a quorum, the leader included.
    fn commit_advance(&mut self) {
        let mut durable = [0u64; REPLICA_COUNT_MAX];
        let count = usize::from(self.config.replica_count);
        for (replica, value) in durable.iter_mut().enumerate().take(count) {
            *value = if replica == usize::from(self.config.replica) {
                self.op_durable
            } else {
                self.peers[replica].ack_op.min(self.op_durable)
            };
        }
        let values = &mut durable[..count];
        values.sort_unstable_by(|a, b| b.cmp(a));
        let committed = values[self.config.quorum() - 1];
        self.commit_max = self.commit_max.max(committed);
    }

    /// Follower: a `Prepare` (or `PrepareRepair`) of `op` from `from` in `view`, carrying
    /// the leader's `commit`. The runtime has verified the entry's checksums.
    #[allow(clippy::too_many_arguments)]
    pub fn on_prepare(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        op: u64,
        commit: u64,
        repair: bool,
        actions: &mut Vec<Action>,
    ) -> PrepareDisposition {
        if view != self.config.view || self.is_leader() {
            return PrepareDisposition::Ignore;
        }
        if !repair && from != self.leader() {
            return PrepareDisposition::Ignore;
        }
        let peer = &mut self.peers[usize::from(from)];
        peer.op_durable = peer.op_durable.max(op);
        if from == self.leader() {
            self.commit_max = self.commit_max.max(commit);
        }
        self.op_known_max = self.op_known_max.max(op);
        if repair {
            self.repair_answered(now_us, from, op);
        }
        if op <= self.op_head {
            self.counters.prepares_duplicate += 1;
            if op <= self.op_durable && !repair {
                self.acknowledge(actions);
            }
            return PrepareDisposition::Duplicate;
        }
        if op == self.op_head + 1 {
            return PrepareDisposition::Append;
        }
        self.counters.prepares_gap += 1;
        self.repair_schedule(now_us, actions);
        PrepareDisposition::Gap
    }

    /// A `Commit` heartbeat from the leader.
    pub fn on_commit(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        commit: u64,
        op_head: u64,
        actions: &mut Vec<Action>,
    ) {
        if view != self.config.view || from != self.leader() || self.is_leader() {
            return;
        }
        self.commit_max = self.commit_max.max(commit);
        self.op_known_max = self.op_known_max.max(op_head);
        let peer = &mut self.peers[usize::from(from)];
        peer.op_durable = peer.op_durable.max(op_head);
        self.repair_schedule(now_us, actions);
    }

    /// A `Ping` from `from`: answer it and note its progress.
    pub fn on_ping(
        &mut self,
        from: u8,
        time_us: u64,
        op_durable: u64,
        commit_min: u64,
        actions: &mut Vec<Action>,
    ) {
        self.peer_progress(from, op_durable, commit_min);
        push(
            actions,
            Action::Pong {
                to: from,
                time_us,
                op_durable: self.op_durable,
                commit_min: self.commit_min,
            },
        );
    }

    /// A `Pong` answering our ping sent at `time_us`.
    pub fn on_pong(
        &mut self,
        now_us: u64,
        from: u8,
        time_us: u64,
        op_durable: u64,
        commit_min: u64,
        actions: &mut Vec<Action>,
    ) {
        if time_us <= now_us {
            self.peers[usize::from(from)]
                .latency
                .sample(now_us - time_us);
        }
        self.peer_progress(from, op_durable, commit_min);
        if !self.is_leader() {
            self.repair_schedule(now_us, actions);
        }
    }

    fn peer_progress(&mut self, from: u8, op_durable: u64, commit_min: u64) {
        let peer = &mut self.peers[usize::from(from)];
        peer.op_durable = peer.op_durable.max(op_durable);
        peer.commit_min = peer.commit_min.max(commit_min);
        // Only the leader's word makes an op part of the log; a follower's durable head is a
        // prefix of it, so it may also be repaired from.
        self.op_known_max = self.op_known_max.max(op_durable);
    }

    /// `from` asks for `op_min..=op_max`. Serves the part durable here; nothing if none.
    pub fn on_request_prepare(
        &mut self,
        from: u8,
        op_min: u64,
        op_max: u64,
        actions: &mut Vec<Action>,
    ) {
        let op_max = op_max
            .min(self.op_durable)
            .min(op_min.saturating_add(self.config.repair_ops_max - 1));
        if op_min == 0 || op_min > op_max || from == self.config.replica {
            return;
        }
        self.counters.repairs_served += 1;
        push(
            actions,
            Action::ServeRepair {
                to: from,
                op_min,
                op_max,
            },
        );
    }

    /// The runtime applied `op`.
    pub fn on_applied(&mut self, op: u64) {
        assert_eq!(op, self.commit_min + 1, "ops apply in order");
        assert!(
            op <= self.apply_limit(),
            "only committed, durable ops apply"
        );
        self.commit_min = op;
    }

    /// The runtime's connection to `peer` came up or went down.
    pub fn on_connection(&mut self, peer: u8, connected: bool) {
        let state = &mut self.peers[usize::from(peer)];
        state.connected = connected;
        if !connected
            && let Some(repair) = self.repair
            && repair.peer == peer
        {
            self.repair = None;
            state.repairs_inflight = 0;
        }
    }

    /// The runtime sent `peer` a message at `now_us` (a Prepare counts as a heartbeat).
    pub fn note_sent(&mut self, peer: u8, now_us: u64) {
        self.peers[usize::from(peer)].sent_us = now_us;
    }

    /// Timers: heartbeats (leader), pings, repair timeouts. Call when
    /// [`Replica::poll_timeout`] is due (calling early is harmless).
    pub fn tick(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.is_leader() && now_us >= self.heartbeat_next_us {
            for peer in self.others() {
                let state = &mut self.peers[usize::from(peer)];
                if now_us.saturating_sub(state.sent_us) >= self.config.heartbeat_interval_us {
                    state.sent_us = now_us;
                    push(
                        actions,
                        Action::Commit {
                            to: peer,
                            commit: self.commit_max,
                            op_head: self.op_durable,
                        },
                    );
                }
            }
            self.heartbeat_next_us = now_us + self.config.heartbeat_interval_us / 2;
        }
        if now_us >= self.ping_next_us {
            for peer in self.others() {
                self.peers[usize::from(peer)].ping_sent_us = now_us;
                push(
                    actions,
                    Action::Ping {
                        to: peer,
                        time_us: now_us,
                        op_durable: self.op_durable,
                        commit_min: self.commit_min,
                    },
                );
            }
            self.ping_next_us = now_us + self.config.ping_interval_us;
        }
        if let Some(repair) = self.repair
            && now_us >= repair.deadline_us
        {
            // The timeout is a sample too: a dead peer's score climbs past the others.
            let timeout_us = repair.deadline_us - repair.sent_us;
            let peer = &mut self.peers[usize::from(repair.peer)];
            peer.latency.sample(timeout_us);
            peer.repairs_inflight = 0;
            self.repair = None;
            self.counters.repairs_timed_out += 1;
        }
        if !self.is_leader() {
            self.repair_schedule(now_us, actions);
        }
    }

    /// The next time [`Replica::tick`] has work (µs).
    pub fn poll_timeout(&self) -> u64 {
        let mut next = self.ping_next_us;
        if self.is_leader() {
            next = next.min(self.heartbeat_next_us);
        }
        if let Some(repair) = self.repair {
            next = next.min(repair.deadline_us);
        }
        next
    }

    fn repair_answered(&mut self, now_us: u64, from: u8, op: u64) {
        let Some(repair) = self.repair.as_mut() else {
            return;
        };
        if repair.peer != from || op < repair.op_min || op > repair.op_max {
            return;
        }
        if !repair.answered {
            repair.answered = true;
            let sample = now_us.saturating_sub(repair.sent_us);
            self.peers[usize::from(from)].latency.sample(sample);
        }
        // A request being answered is alive: each answer extends its deadline, so a long
        // range read from the peer's disk is not abandoned half way.
        let timeout_us = self
            .config
            .repair_timeout_us(&self.peers[usize::from(from)].latency);
        repair.deadline_us = now_us + timeout_us;
        if op == repair.op_max {
            self.peers[usize::from(from)].repairs_inflight = 0;
            self.repair = None;
        }
    }

    /// Follower: asks for the next missing range if nothing is outstanding.
    fn repair_schedule(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.is_leader() || self.op_head >= self.op_known_max {
            return;
        }
        if let Some(repair) = self.repair {
            if repair.op_max > self.op_head {
                return;
            }
            // Answered by appends we already have: finished.
            self.peers[usize::from(repair.peer)].repairs_inflight = 0;
            self.repair = None;
        }
        let op_min = self.op_head + 1;
        let op_max = self
            .op_known_max
            .min(self.op_head + self.config.repair_ops_max);
        let Some(peer) = self.repair_route(op_max) else {
            return;
        };
        let state = &mut self.peers[usize::from(peer)];
        let timeout_us = self.config.repair_timeout_us(&state.latency);
        state.repairs_inflight = 1;
        self.repair = Some(Repair {
            peer,
            op_min,
            op_max,
            sent_us: now_us,
            deadline_us: now_us + timeout_us,
            answered: false,
        });
        self.counters.repairs_requested += 1;
        push(
            actions,
            Action::RequestPrepare {
                to: peer,
                op_min,
                op_max,
            },
        );
    }

    /// The routing rule (`docs/protocol.md` 6.5): among connected peers known to hold
    /// `op_max`, the lowest latency score; one request in `routing_explore_one_in` goes to
    /// a random eligible peer so that estimates of peers not chosen stay fresh.
    fn repair_route(&mut self, op_max: u64) -> Option<u8> {
        let mut eligible = [0u8; REPLICA_COUNT_MAX];
        let mut count = 0;
        for peer in self.others() {
            let state = &self.peers[usize::from(peer)];
            if state.connected && state.op_durable >= op_max {
                eligible[count] = peer;
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        let draw = self.random();
        if draw.is_multiple_of(u64::from(self.config.routing_explore_one_in)) {
            return Some(eligible[(draw >> 32) as usize % count]);
        }
        eligible[..count]
            .iter()
            .copied()
            .min_by_key(|peer| (self.peers[usize::from(*peer)].latency.score_us(), *peer))
    }

    /// xorshift64*: deterministic from the configured seed.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn push(actions: &mut Vec<Action>, action: Action) {
    debug_assert!(
        actions.len() < actions.capacity(),
        "action buffer sized at start-up"
    );
    actions.push(action);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(group: u32, replica: u8, count: u8) -> Replica {
        let config = ReplicaConfig::new(group, replica, count, 7).unwrap();
        Replica::new(config, 0, 0, 0).unwrap()
    }

    fn actions() -> Vec<Action> {
        Vec::with_capacity(ACTIONS_MAX)
    }

    #[test]
    fn config_is_validated() {
        assert_eq!(
            ReplicaConfig::new(0, 0, 0, 1),
            Err(ReplicaConfigError::ReplicaCount(0))
        );
        assert_eq!(
            ReplicaConfig::new(0, 3, 3, 1),
            Err(ReplicaConfigError::Replica {
                replica: 3,
                replica_count: 3
            })
        );
        assert!(ReplicaConfig::new(0, 0, 8, 1).is_err());
        let config = ReplicaConfig::new(2, 0, 3, 1).unwrap();
        assert_eq!(config.quorum(), 2);
        assert_eq!(config.leader_of(0), 2);
        assert_eq!(config.leader_of(1), 0);
        assert_eq!(ReplicaConfig::new(0, 0, 5, 1).unwrap().quorum(), 3);
    }

    #[test]
    fn leader_commits_with_a_majority_including_itself() {
        let mut leader = replica(0, 0, 3);
        let mut out = actions();
        assert!(leader.can_seal());
        leader.on_staged(10, 1, 111);
        leader.on_staged(11, 2, 222);
        assert_eq!(leader.commit_max(), 0);
        // An acknowledgement before the leader's own write does not commit.
        leader.on_prepare_ok(20, 1, 0, 1, 111, 0);
        assert_eq!(
            leader.commit_max(),
            0,
            "op 1 is not durable on the leader yet"
        );
        leader.on_durable(30, 2, &mut out);
        assert_eq!(
            leader.commit_max(),
            0,
            "acks above the durable op are not counted"
        );
        leader.on_prepare_ok(40, 1, 0, 2, 222, 0);
        assert_eq!(leader.commit_max(), 2);
        assert_eq!(leader.apply_limit(), 2);
        assert_eq!(leader.peer(1).latency.samples, 1);
        assert_eq!(leader.peer(1).latency.srtt_us, 10);
    }

    #[test]
    fn leader_ignores_wrong_checksum_view_and_sender() {
        let mut leader = replica(0, 0, 3);
        let mut out = actions();
        leader.on_staged(0, 1, 111);
        leader.on_durable(0, 1, &mut out);
        leader.on_prepare_ok(1, 1, 0, 1, 999, 0);
        leader.on_prepare_ok(1, 1, 1, 1, 111, 0);
        leader.on_prepare_ok(1, 0, 0, 1, 111, 0);
        assert_eq!(leader.commit_max(), 0);
        assert_eq!(leader.counters().acks_ignored, 3);
        leader.on_prepare_ok(1, 2, 0, 1, 111, 0);
        assert_eq!(leader.commit_max(), 1);
    }

    #[test]
    fn commit_is_the_quorum_th_highest_and_never_goes_back() {
        let mut leader = replica(1, 1, 5);
        let mut out = actions();
        for op in 1..=10 {
            leader.on_staged(0, op, u128::from(op) * 7);
        }
        leader.on_durable(0, 10, &mut out);
        leader.on_prepare_ok(1, 2, 0, 9, 63, 0);
        assert_eq!(leader.commit_max(), 0, "two of five");
        leader.on_prepare_ok(1, 3, 0, 4, 28, 0);
        assert_eq!(leader.commit_max(), 4, "three of five hold op 4");
        leader.on_prepare_ok(1, 4, 0, 6, 42, 0);
        assert_eq!(leader.commit_max(), 6);
        leader.on_prepare_ok(1, 4, 0, 5, 35, 0);
        assert_eq!(leader.commit_max(), 6, "acks are cumulative");
    }

    #[test]
    fn pipeline_bounds_sealing() {
        let mut leader = replica(0, 0, 3);
        let mut out = actions();
        let max = leader.config().pipeline_prepares_max;
        for op in 1..=max {
            assert!(leader.can_seal());
            leader.on_staged(0, op, u128::from(op));
        }
        assert!(!leader.can_seal());
        leader.on_durable(0, max, &mut out);
        leader.on_prepare_ok(0, 2, 0, 1, 1, 0);
        assert!(leader.can_seal());
        assert!(!replica(0, 1, 3).can_seal(), "followers never seal");
    }

    #[test]
    fn follower_appends_acks_and_applies_committed() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        assert_eq!(
            follower.on_prepare(0, 0, 0, 1, 0, false, &mut out),
            PrepareDisposition::Append
        );
        follower.on_staged(0, 1, 11);
        follower.on_durable(0, 1, &mut out);
        assert_eq!(
            out.pop(),
            Some(Action::PrepareOk {
                to: 0,
                op: 1,
                checksum: 11,
                commit_min: 0
            })
        );
        assert_eq!(follower.apply_limit(), 0);
        follower.on_commit(1, 0, 0, 1, 1, &mut out);
        assert_eq!(follower.apply_limit(), 1);
        follower.on_applied(1);
        assert_eq!(follower.commit_min(), 1);
        assert!(out.is_empty());
    }

    #[test]
    fn follower_ignores_other_views_and_non_leaders() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        assert_eq!(
            follower.on_prepare(0, 0, 1, 1, 0, false, &mut out),
            PrepareDisposition::Ignore
        );
        assert_eq!(
            follower.on_prepare(0, 2, 0, 1, 0, false, &mut out),
            PrepareDisposition::Ignore
        );
        follower.on_commit(0, 2, 0, 5, 5, &mut out);
        assert_eq!(follower.commit_max(), 0);
    }

    #[test]
    fn gap_asks_the_fastest_connected_peer_and_retries_on_timeout() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_connection(2, true);
        // Peer 2 answers pings fast, the leader slowly.
        follower.on_pong(1_000, 0, 0, 0, 0, &mut out);
        assert!(out.is_empty(), "nothing known to be missing yet");
        // Peer 2 answers pings fast and reports op 50 durable (a prefix of the leader's log).
        let now = 2_000;
        follower.on_pong(now, 2, now - 100, 50, 0, &mut out);
        let Some(Action::RequestPrepare { to, op_min, op_max }) = out.pop() else {
            panic!("expected a repair request, got {out:?}");
        };
        assert_eq!((to, op_min, op_max), (2, 1, 50));
        let now = now + 1;
        // A second gap while one is outstanding asks nothing more.
        assert_eq!(
            follower.on_prepare(now, 0, 0, 41, 30, false, &mut out),
            PrepareDisposition::Gap
        );
        assert!(out.is_empty());
        // Timeout: re-routed, and the timed-out peer's score grew.
        let before = follower.peer(to).latency.score_us();
        follower.tick(now + REPAIR_TIMEOUT_US_MAX_DEFAULT, &mut out);
        assert!(follower.peer(to).latency.score_us() > before);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::RequestPrepare { op_min: 1, .. }))
        );
        assert_eq!(follower.counters().repairs_timed_out, 1);
    }

    #[test]
    fn routing_prefers_the_lowest_score() {
        let mut follower = replica(0, 1, 5);
        let mut out = actions();
        for peer in [0, 2, 3, 4] {
            follower.on_connection(peer, true);
            follower.on_pong(
                10_000,
                peer,
                10_000 - 100 * u64::from(peer + 1),
                100,
                0,
                &mut out,
            );
        }
        let mut chosen = [0u32; 5];
        for _ in 0..1_000 {
            let peer = follower.repair_route(100).unwrap();
            chosen[usize::from(peer)] += 1;
        }
        assert_eq!(chosen[1], 0);
        assert!(chosen[0] > 850, "{chosen:?}");
        assert!(
            chosen[2] + chosen[3] + chosen[4] > 0,
            "explores: {chosen:?}"
        );
        // Peers not known to hold the op, or disconnected, are not eligible.
        follower.on_connection(0, false);
        for _ in 0..100 {
            assert_ne!(follower.repair_route(100), Some(0));
        }
        assert_eq!(follower.repair_route(101), None);
    }

    #[test]
    fn repair_answers_are_accepted_in_order_and_complete_the_request() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_commit(0, 0, 0, 3, 3, &mut out);
        let Some(Action::RequestPrepare { to, op_min, op_max }) = out.pop() else {
            panic!("repair expected");
        };
        assert_eq!((to, op_min, op_max), (0, 1, 3));
        for op in 1..=3 {
            assert_eq!(
                follower.on_prepare(10, 0, 0, op, 3, true, &mut out),
                PrepareDisposition::Append
            );
            follower.on_staged(10, op, u128::from(op));
        }
        follower.on_durable(20, 3, &mut out);
        assert_eq!(follower.apply_limit(), 3);
        assert!(follower.repair.is_none());
        assert_eq!(follower.peer(0).latency.samples, 1);
    }

    #[test]
    fn request_prepare_is_served_up_to_what_is_durable() {
        let mut leader = replica(0, 0, 3);
        let mut out = actions();
        for op in 1..=100 {
            leader.on_staged(0, op, u128::from(op));
        }
        leader.on_durable(0, 90, &mut out);
        leader.on_request_prepare(1, 5, 200, &mut out);
        assert_eq!(
            out.pop(),
            Some(Action::ServeRepair {
                to: 1,
                op_min: 5,
                op_max: 68
            })
        );
        leader.on_request_prepare(1, 91, 95, &mut out);
        leader.on_request_prepare(1, 0, 5, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn heartbeats_go_only_to_idle_followers_and_pings_to_all() {
        let mut leader = replica(0, 0, 3);
        let mut out = actions();
        leader.tick(0, &mut out);
        assert_eq!(
            out.iter()
                .filter(|a| matches!(a, Action::Ping { .. }))
                .count(),
            2
        );
        out.clear();
        leader.note_sent(1, 25_000);
        leader.tick(30_000, &mut out);
        assert_eq!(
            out,
            vec![Action::Commit {
                to: 2,
                commit: 0,
                op_head: 0
            }]
        );
        assert!(leader.poll_timeout() > 30_000);
    }

    #[test]
    fn latency_estimate_follows_rfc6298() {
        let mut estimate = LatencyEstimate::default();
        assert_eq!(estimate.score_us(), 0);
        estimate.sample(100);
        assert_eq!((estimate.srtt_us, estimate.rttvar_us), (100, 50));
        estimate.sample(200);
        assert_eq!((estimate.srtt_us, estimate.rttvar_us), (112, 62));
        for _ in 0..100 {
            estimate.sample(100);
        }
        assert!(estimate.srtt_us <= 101 && estimate.rttvar_us <= 1);
    }
}
