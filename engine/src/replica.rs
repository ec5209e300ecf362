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
pub const ACTIONS_MAX: usize = 6 * REPLICA_COUNT_MAX;
/// Default bounds of the follower's randomized leader timeout (µs).
pub const LEADER_TIMEOUT_US_MIN_DEFAULT: u64 = 150_000;
/// See [`LEADER_TIMEOUT_US_MIN_DEFAULT`].
pub const LEADER_TIMEOUT_US_MAX_DEFAULT: u64 = 300_000;
/// Default bounds of the randomized view-change and pre-vote timeouts (µs).
pub const VIEW_CHANGE_TIMEOUT_US_MIN_DEFAULT: u64 = 150_000;
/// See [`VIEW_CHANGE_TIMEOUT_US_MIN_DEFAULT`].
pub const VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT: u64 = 300_000;
/// A normal leader that keeps hearing StartViewChange for a higher view this long joins it
/// (µs): a replica stranded alone in that view rejoins the group.
pub const STRANDED_VIEW_JOIN_US: u64 = 1_000_000;
/// A starting replica waits this many maximal leader timeouts (plus one) before suspecting
/// a leader it has not heard from yet: peers start and connect at different moments.
pub const LEADER_TIMEOUT_STARTUP_FACTOR: u64 = 4;
/// A follower that finds it did not run for a while (its tick came more than half a
/// minimal leader timeout after the deadline it asked for: a descheduled process, a long
/// turn of its own executor) could not read its leader's messages meanwhile, which may be
/// waiting in its socket behind the timer that just fired. It then starts no pre-vote for
/// this many heartbeat intervals, time for those messages to be read: on an overloaded
/// host two followers that were both descheduled would otherwise elect a new leader
/// although the leader was heartbeating all along.
pub const STALL_GRACE_HEARTBEATS: u64 = 3;
/// See [`STALL_GRACE_HEARTBEATS`]: not once the leader has been silent this long (µs), so
/// that a replica that stalls again and again still fails over a dead leader.
pub const STALL_DEFER_US_MAX: u64 = 2_000_000;
/// Default interval at which view-change messages are sent again (µs).
pub const VIEW_CHANGE_RESEND_INTERVAL_US_DEFAULT: u64 = 30_000;
/// Default time a group's preferred leader (its view-0 leader) must have been connected and
/// acknowledging before the leader of another view hands the group back to it (µs); see
/// [`ReplicaConfig::leader_rebalance_us`].
pub const LEADER_REBALANCE_US_DEFAULT: u64 = 30_000_000;

const _: () = assert!(REPLICA_COUNT_MAX <= 8, "ack sets fit a u8");
const _: () = assert!(REPAIR_TIMEOUT_US_MIN_DEFAULT < REPAIR_TIMEOUT_US_MAX_DEFAULT);
const _: () = assert!(PING_INTERVAL_US_DEFAULT >= HEARTBEAT_INTERVAL_US_DEFAULT);
const _: () = assert!(LEADER_TIMEOUT_US_MIN_DEFAULT >= 5 * HEARTBEAT_INTERVAL_US_DEFAULT);
const _: () =
    assert!(VIEW_CHANGE_TIMEOUT_US_MIN_DEFAULT >= 3 * VIEW_CHANGE_RESEND_INTERVAL_US_DEFAULT);

/// Limits and identity of one replica of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The group (shard index).
    pub group: u32,
    /// This replica's index, `< replica_count`.
    pub replica: u8,
    /// Replicas in the group.
    pub replica_count: u8,
    /// The view a fresh replica starts in.
    pub view: u64,
    /// Whether this replica takes part in view changes (pre-vote, leader timeouts). Off, the
    /// group keeps its first view for good (the io_uring runtime until it persists views and
    /// truncates journals); on, the driver must execute `Persist` and `Truncate`.
    pub view_change: bool,
    /// Follower: leader timeout bounds (µs), drawn from the injected RNG.
    pub leader_timeout_us_min: u64,
    /// See `leader_timeout_us_min`.
    pub leader_timeout_us_max: u64,
    /// View-change and pre-vote timeout bounds (µs).
    pub view_change_timeout_us_min: u64,
    /// See `view_change_timeout_us_min`.
    pub view_change_timeout_us_max: u64,
    /// Interval at which StartViewChange and DoViewChange are sent again (µs).
    pub view_change_resend_interval_us: u64,
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
    /// Leader rebalancing (view change only): a leader that is not the group's preferred
    /// leader (its view-0 leader, `group mod N`) hands the group back to it once that
    /// replica has been connected, in this view, and acknowledging and applying to within a
    /// pipeline of the commit point for this long (µs): it starts a view change to the next view the
    /// preferred replica leads. So the groups a node led come back to it after it failed
    /// and returned, and the leaders stay spread over the nodes. 0: never.
    pub leader_rebalance_us: u64,
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
    /// A replaced replica ([`Replica::replacing_start`]) without view change: it could
    /// never install its group's log.
    #[error("a replica formatted with --replace needs view change to rebuild")]
    ReplacingWithoutViewChange,
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
            view_change: false,
            leader_timeout_us_min: LEADER_TIMEOUT_US_MIN_DEFAULT,
            leader_timeout_us_max: LEADER_TIMEOUT_US_MAX_DEFAULT,
            view_change_timeout_us_min: VIEW_CHANGE_TIMEOUT_US_MIN_DEFAULT,
            view_change_timeout_us_max: VIEW_CHANGE_TIMEOUT_US_MAX_DEFAULT,
            view_change_resend_interval_us: VIEW_CHANGE_RESEND_INTERVAL_US_DEFAULT,
            pipeline_prepares_max: PIPELINE_PREPARES_MAX_DEFAULT,
            heartbeat_interval_us: HEARTBEAT_INTERVAL_US_DEFAULT,
            ping_interval_us: PING_INTERVAL_US_DEFAULT,
            repair_ops_max: REPAIR_OPS_MAX_DEFAULT,
            repair_timeout_us_min: REPAIR_TIMEOUT_US_MIN_DEFAULT,
            repair_timeout_us_max: REPAIR_TIMEOUT_US_MAX_DEFAULT,
            routing_explore_one_in: ROUTING_EXPLORE_ONE_IN_DEFAULT,
            seed,
            leader_rebalance_us: LEADER_REBALANCE_US_DEFAULT,
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
        if self.leader_timeout_us_min == 0
            || self.leader_timeout_us_max < self.leader_timeout_us_min
        {
            return Err(ReplicaConfigError::Limit("leader_timeout_us"));
        }
        if self.view_change_timeout_us_min == 0
            || self.view_change_timeout_us_max < self.view_change_timeout_us_min
            || self.view_change_resend_interval_us == 0
        {
            return Err(ReplicaConfigError::Limit("view_change_timeout_us"));
        }
        if self.leader_rebalance_us != 0 && self.leader_rebalance_us < self.leader_timeout_us_max {
            // Shorter than a failover: a replica that just came back would take its groups
            // back before anyone could tell it is healthy.
            return Err(ReplicaConfigError::Limit("leader_rebalance_us"));
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

    /// Headers (op checksums) a DoViewChange or StartView carries: the uncommitted window
    /// plus its anchor.
    pub fn view_change_headers_max(&self) -> u64 {
        self.pipeline_prepares_max + 1
    }

    /// Replicas whose durable copy commits an op: `⌊N/2⌋ + 1`.
    pub fn quorum(&self) -> usize {
        usize::from(self.replica_count) / 2 + 1
    }

    /// The leader of `view` ([`crate::placement::leader_of`]).
    pub fn leader_of(&self, view: u64) -> u8 {
        crate::placement::leader_of(self.group, view, self.replica_count)
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
        /// Sender's `log_view`.
        log_view: u64,
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
        /// Sender's `log_view`.
        log_view: u64,
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
    /// State sync (`docs/protocol.md` 9): the ops this replica needs next are no longer
    /// retained by `from`, whose latest checkpoint `checkpoint_op` is above this replica's
    /// head. Fetch that checkpoint's snapshot from `from`, install it (journal restarted at
    /// the checkpoint, state restored), then report [`Replica::on_state_synced`], or
    /// [`Replica::on_state_sync_failed`] if it cannot be done. Repair waits meanwhile.
    StateSync {
        /// The peer that has the checkpoint.
        from: u8,
        /// Its op.
        checkpoint_op: u64,
    },
    /// Make `view` and `log_view` durable (the superblock). Actions after this one in the
    /// same buffer must not be executed before it is durable: they rely on it.
    Persist {
        /// The view joined.
        view: u64,
        /// The view whose log the journal holds (the voting log's view).
        log_view: u64,
        /// Highest op known committed: a restart replays at most this far.
        commit_max: u64,
    },
    /// Remove every journal entry above `op` (a divergent suffix of an abandoned view), and
    /// every queued, unapplied batch above it; the chain head becomes entry `op`. Before the
    /// next action.
    Truncate {
        /// The last op kept.
        op: u64,
    },
    /// Ask whether the group would move to `view_target` (changes no one's state).
    PreVote {
        /// A peer.
        to: u8,
        /// The view the sender would start.
        view_target: u64,
    },
    /// Answer to a pre-vote.
    PreVoteReply {
        /// The candidate.
        to: u8,
        /// The view asked about.
        view_target: u64,
        /// Whether this replica would join it.
        granted: bool,
    },
    /// The sender left its view for `view` (the header's view).
    StartViewChange {
        /// A peer.
        to: u8,
        /// The new view.
        view: u64,
    },
    /// The sender's voting log, to the leader of `view`. The body holds the checksums of
    /// ops `headers_op_min..=op_durable` ([`Replica::checksum_at`]).
    DoViewChange {
        /// The new view's leader.
        to: u8,
        /// The new view.
        view: u64,
        /// The view whose log the sender holds.
        log_view: u64,
        /// Head of the sender's voting log.
        op_durable: u64,
        /// Highest op the sender knows committed.
        commit_max: u64,
        /// First op whose checksum the body carries.
        headers_op_min: u64,
    },
    /// The new leader's log: its head, commit number and the checksums of ops
    /// `headers_op_min..=op_head`.
    StartView {
        /// A follower.
        to: u8,
        /// The view.
        view: u64,
        /// Head of the view's log.
        op_head: u64,
        /// The leader's `commit_max`.
        commit_max: u64,
        /// First op whose checksum the body carries.
        headers_op_min: u64,
    },
    /// Ask the leader of `view` for its StartView (this replica missed it).
    RequestStartView {
        /// The leader of `view`.
        to: u8,
        /// The view.
        view: u64,
    },
}

/// Where a replica stands in its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Leading or following the view's leader.
    Normal,
    /// Between views: gathering StartViewChange / DoViewChange for `view`.
    ViewChange,
}

/// What a replica had persisted (superblock) when it stopped, for [`Replica::restart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Persisted {
    /// Highest view joined.
    pub view: u64,
    /// View of the voting log.
    pub log_view: u64,
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
#[derive(Debug, Clone, Copy)]
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
    /// The view of its voting log, as last reported: only a peer whose log is the one being
    /// followed (or installed) may serve repairs ([`u64::MAX`]: unknown).
    pub log_view: u64,
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
    /// Entries of an installed log that did not chain onto this replica's head, each
    /// cutting one kept entry ([`Replica::on_chain_mismatch`]).
    pub chain_mismatches: u64,
    /// Views this replica left as leader to hand its group back to the preferred leader
    /// ([`ReplicaConfig::leader_rebalance_us`]).
    pub leader_handoffs: u64,
    /// Duplicate prepares.
    pub prepares_duplicate: u64,
    /// Acknowledgements ignored (another view, unknown checksum).
    pub acks_ignored: u64,
    /// State syncs started (a peer no longer retained the ops needed).
    pub state_syncs: u64,
    /// State syncs installed.
    pub state_syncs_installed: u64,
    /// Ticks that came more than half a leader timeout after the deadline the previous
    /// tick asked for: this replica itself did not run (a stalled process or executor).
    pub stalls: u64,
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
    /// A state sync in progress: the peer and the checkpoint op being installed.
    sync: Option<(u8, u64)>,
    ping_next_us: u64,
    heartbeat_next_us: u64,
    rng: u64,
    counters: ReplicaCounters,
    /// Highest view joined (persisted through `Action::Persist`).
    view: u64,
    /// View of the voting log (persisted): the journal is a prefix of `L(log_view)`.
    log_view: u64,
    status: Status,
    /// Leader: applied every op of its log since it took over, so it may seal.
    ready: bool,
    /// Follower: the leader's silence until then starts a pre-vote.
    leader_deadline_us: u64,
    /// Last time the leader of the current view was heard (µs).
    leader_heard_us: u64,
    /// The tick that ended this replica's last stall, when the stall grace applied
    /// ([`Replica::stall_check`]): for granting pre-votes, the leader counts as heard then.
    stall_heard_us: u64,
    /// The latest time the previous tick asked to be woken by (`poll_timeout`).
    tick_due_us: u64,
    /// Highest view seen in any message.
    view_seen_max: u64,
    pre_vote: Option<PreVoteState>,
    /// A restarted leader never leads the view it crashed in again (it may have sent
    /// Prepares it never made durable, section 8): that view, left at the first tick.
    view_abdicated: Option<u64>,
    view_change_deadline_us: u64,
    view_change_resend_us: u64,
    /// StartViewChange for `view` received from these replicas (bit set).
    svc_from: u8,
    /// New leader: the DoViewChanges received for `view`, by replica.
    dvc: Box<[DoViewChangeState]>,
    dvc_sent: bool,
    /// The log being installed (new leader or follower): its head, commit number, and the
    /// checksums of its last ops, which repaired entries must match.
    install: Option<Install>,
    expected: Box<[JournalChecksum]>,
    /// Time of the last input (µs), for decisions that depend on recency.
    now_us: u64,
    /// RequestStartView is not sent again before this (µs).
    request_start_view_us: u64,
    /// StartViewChange for a view above the current one: the view and who sent it.
    svc_future: (u64, u8),
    /// When StartViewChange for `svc_future`'s view was first heard (µs).
    svc_future_since_us: u64,
    /// Leader rebalancing: since when the preferred leader has looked ready to take the
    /// group back (µs); `None` while it does not.
    rebalance_since_us: Option<u64>,
    /// Recovering (`docs/protocol.md` 8): the journal lost entries this replica may have
    /// acknowledged; the op it promised (it must hold everything up to it again, or install
    /// a newer view's log, before it acknowledges or votes).
    recovering: Option<Recovering>,
}

/// What a recovering replica waits for.
#[derive(Debug, Clone, Copy)]
struct Recovering {
    /// The promise: ops up to here may have been acknowledged (`u64::MAX` for a replaced
    /// replica, which does not know what it promised).
    op_promised: u64,
    /// Fixed view, leader: peers that reported their durable head (Ping or Pong) since.
    heard: u8,
    /// The highest durable head those peers reported.
    heard_op_max: u64,
    /// The replica lost its disk and was formatted again to replace itself
    /// ([`Replica::replacing_start`]).
    replaced: Option<Replaced>,
}

/// A replaced replica learning the views it may have taken part in before it lost its disk.
#[derive(Debug, Clone, Copy)]
struct Replaced {
    /// When it started: only Pongs answering Pings sent since count.
    started_us: u64,
    /// Peers whose view it heard in such a Pong (bit set).
    heard: u8,
    /// The highest view they reported.
    view_floor: u64,
}

/// A pre-vote in progress.
#[derive(Debug, Clone, Copy)]
struct PreVoteState {
    view_target: u64,
    granted: u8,
    deadline_us: u64,
}

/// One replica's DoViewChange, kept by the new leader.
#[derive(Debug, Clone)]
struct DoViewChangeState {
    present: bool,
    log_view: u64,
    op_durable: u64,
    commit_max: u64,
    headers_op_min: u64,
    checksums: Box<[JournalChecksum]>,
}

/// The log a replica is installing.
#[derive(Debug, Clone, Copy)]
struct Install {
    op_head: u64,
    commit_max: u64,
    /// `expected[i]` is the checksum of op `expected_op_min + i`.
    expected_op_min: u64,
    /// The view of the log being installed: only peers holding it serve repairs.
    source_log_view: u64,
}

impl Replica {
    /// A replica that never ran before (it never sent anything), whose log is `op_recovered`
    /// ops (durable, chain head `checksum_recovered`), all applied, in `config.view`. Unlike
    /// [`Replica::restart`], a leader leads its view at once. A driver that cannot tell a
    /// first start from a restart (an empty journal may be one that lost what it sent)
    /// must call `restart`.
    pub fn new(
        config: ReplicaConfig,
        op_recovered: u64,
        checksum_recovered: JournalChecksum,
        now_us: u64,
    ) -> Result<Self, ReplicaConfigError> {
        let persisted = Persisted {
            view: config.view,
            log_view: config.view,
        };
        let mut replica = Self::restart(
            config,
            persisted,
            op_recovered,
            checksum_recovered,
            op_recovered,
            &[],
            now_us,
        )?;
        if replica.view_abdicated.take().is_some() {
            replica.status = Status::Normal;
            replica.ready = true;
        }
        Ok(replica)
    }

    /// A replica restarting from its journal (head `op_recovered`, `checksum_recovered`),
    /// its persisted views, and `commit_min`, the op replay stopped at. `recent` holds
    /// `(op, checksum)` of the journal's last ops (up to twice the pipeline), so that the
    /// replica can compare its log with others' in a view change.
    pub fn restart(
        config: ReplicaConfig,
        persisted: Persisted,
        op_recovered: u64,
        checksum_recovered: JournalChecksum,
        commit_min: u64,
        recent: &[(u64, JournalChecksum)],
        now_us: u64,
    ) -> Result<Self, ReplicaConfigError> {
        config.validate()?;
        assert!(commit_min <= op_recovered && persisted.log_view <= persisted.view);
        let capacity = (config.pipeline_prepares_max * 2).next_power_of_two() as usize;
        let headers_max = config.view_change_headers_max() as usize;
        let dvc = (0..config.replica_count)
            .map(|_| DoViewChangeState {
                present: false,
                log_view: 0,
                op_durable: 0,
                commit_max: 0,
                headers_op_min: 0,
                checksums: vec![0; headers_max].into_boxed_slice(),
            })
            .collect();
        let mut replica = Self {
            config,
            op_head: op_recovered,
            checksum_head: checksum_recovered,
            op_durable: op_recovered,
            checksum_durable: checksum_recovered,
            // Without view change, replay applied the whole journal: a leader's journal is
            // the group's log and a follower's a prefix of it (module docs). With it, the
            // driver replays only up to the persisted commit number.
            commit_max: 0,
            commit_min,
            op_known_max: op_recovered,
            pipeline: vec![Slot::default(); capacity].into_boxed_slice(),
            peers: [PeerState {
                connected: false,
                op_durable: 0,
                commit_min: 0,
                ack_op: 0,
                latency: LatencyEstimate::default(),
                sent_us: 0,
                ping_sent_us: 0,
                repairs_inflight: 0,
                log_view: if config.view_change {
                    u64::MAX
                } else {
                    config.view
                },
            }; REPLICA_COUNT_MAX],
            repair: None,
            sync: None,
            ping_next_us: now_us,
            heartbeat_next_us: now_us,
            rng: config.seed | 1,
            counters: ReplicaCounters::default(),
            view: persisted.view,
            log_view: persisted.log_view,
            status: Status::Normal,
            ready: commit_min == op_recovered,
            leader_deadline_us: 0,
            leader_heard_us: now_us,
            stall_heard_us: 0,
            tick_due_us: u64::MAX,
            view_seen_max: persisted.view,
            pre_vote: None,
            view_abdicated: None,
            view_change_deadline_us: 0,
            view_change_resend_us: 0,
            svc_from: 0,
            dvc,
            dvc_sent: false,
            install: None,
            expected: vec![0; headers_max].into_boxed_slice(),
            now_us,
            request_start_view_us: 0,
            svc_future: (0, 0),
            svc_future_since_us: 0,
            rebalance_since_us: None,
            recovering: None,
        };
        // The head is always known, even when `recent` lacks it: a journal that a state
        // sync started at a checkpoint holds no entry for it. Without it, once the next op
        // is staged, the replica could not name its durable head in a StartView or
        // DoViewChange (simulator `--sync on`, seed 92 with 5 replicas: a leader restarted
        // at its checkpoint sent a StartView with no checksums, and a follower cut its log
        // to its commit number, below committed entries it had acknowledged).
        let recovered = (op_recovered > 0).then_some((op_recovered, checksum_recovered));
        for &(op, checksum) in recent.iter().chain(recovered.iter()) {
            let index = replica.slot_index(op);
            replica.pipeline[index] = Slot {
                op,
                checksum,
                staged_us: 0,
                durable_us: 0,
            };
        }
        if config.view_change {
            // Replay stopped at a persisted commit number: what it applied is committed.
            replica.commit_max = commit_min;
            // Peers start at different moments and connect with back-off: a leader that is
            // merely not connected yet must not be voted out. The grace ends early when the
            // connection to the leader comes up (`on_connection`).
            replica.leader_deadline_us = now_us
                + LEADER_TIMEOUT_STARTUP_FACTOR * config.leader_timeout_us_max
                + replica.leader_timeout_us();
            if persisted.log_view < persisted.view {
                // It stopped in a view change: rejoin through pre-vote. Even as this view's
                // leader it never sealed in it: a leader seals only once `log_view = view`
                // is durable (the drivers run every `Persist` before sealing).
                replica.status = Status::ViewChange;
                replica.view_change_deadline_us = now_us;
            } else if replica.is_leader() {
                // It may have led this view and sent Prepares before its own write was
                // durable (6.1), so followers may hold ops it lost: preparing in this view
                // again could give one op two entries (P4). It stops leading now and leaves
                // the view at its first tick. (A replica known never to have run, with a
                // journal created by this start, is built with `Replica::new` instead.)
                replica.status = Status::ViewChange;
                replica.ready = false;
                replica.view_abdicated = Some(persisted.view);
            }
        }
        Ok(replica)
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Current view.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// View of the voting log.
    pub fn log_view(&self) -> u64 {
        self.log_view
    }

    /// Normal or in a view change.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The leader of the current view.
    pub fn leader(&self) -> u8 {
        self.config.leader_of(self.view)
    }

    /// Whether this replica is the leader of its current view (it leads only once normal).
    pub fn is_leader(&self) -> bool {
        self.leader() == self.config.replica
    }

    /// Whether this replica leads a normal view and may admit clients: it has applied
    /// every op it inherited.
    pub fn is_ready_leader(&self) -> bool {
        self.is_leader() && self.status == Status::Normal && self.ready && self.recovering.is_none()
    }

    /// The op this replica promised while it is recovering (`docs/protocol.md` 8), `None`
    /// once it holds its voting log again.
    pub fn recovering(&self) -> Option<u64> {
        self.recovering.map(|recovering| recovering.op_promised)
    }

    /// Recovery found that the journal lost entries up to `op_promised` that this replica
    /// may have acknowledged (a corrupt entry at or below the superblock's promise was cut
    /// with everything after it, or the journal ends below the promise). Until it holds
    /// every op up to `op_promised` again (repaired from peers), or installs a newer view's
    /// log whole, it sends no `PrepareOk`, no `DoViewChange`, no `StartView`, and does not
    /// lead. Call right after [`Replica::restart`].
    pub fn recovering_start(&mut self, op_promised: u64) {
        if op_promised <= self.op_durable {
            return;
        }
        self.recovering = Some(Recovering {
            op_promised,
            heard: 0,
            heard_op_max: 0,
            replaced: None,
        });
        self.op_known_max = self.op_known_max.max(op_promised);
        self.ready = false;
    }

    /// This replica lost its disk and was formatted again to take its own place
    /// (`percore format --replace`, `docs/protocol.md` 8): it may have acknowledged any op
    /// and taken part in any view before, and remembers none of it. It neither acknowledges
    /// nor votes nor leads until it has (1) heard, in Pongs answering its own Pings, the
    /// view of `f + 1` other replicas (the view floor: every view change that counted its
    /// lost vote had a quorum, and `f + 1` of the others include one of that quorum's other
    /// members), and then (2) installed whole the log of a view at or above that floor from
    /// its leader's StartView. That log holds every op committed before its view, and the
    /// leader's own ops of it. Call right after [`Replica::restart`]; only with view change.
    /// A crash before it is done starts it over (the driver keeps the mark durable until
    /// [`Replica::recovering`] is `None`).
    pub fn replacing_start(&mut self, now_us: u64) {
        assert!(
            self.config.view_change,
            "a replaced replica needs view change to install a log"
        );
        self.recovering = Some(Recovering {
            op_promised: u64::MAX,
            heard: 0,
            heard_op_max: 0,
            replaced: Some(Replaced {
                started_us: now_us,
                heard: 0,
                view_floor: 0,
            }),
        });
        self.ready = false;
        if self.status == Status::Normal {
            // Like a replica that stopped in a view change: it holds no log of its view,
            // so its view's leader's messages ask it for the view's StartView.
            self.status = Status::ViewChange;
            self.view_change_deadline_us = now_us;
        }
    }

    /// A replaced replica ([`Replica::replacing_start`]): the view floor once `f + 1` other
    /// replicas reported their view, `None` before (or when not replaced).
    pub fn replacing_view_floor(&self) -> Option<u64> {
        let replaced = self.recovering?.replaced?;
        let f = usize::from(self.config.replica_count) - self.config.quorum();
        (replaced.heard.count_ones() as usize > f).then_some(replaced.view_floor)
    }

    /// Whether this replica was replaced and still rebuilds ([`Replica::replacing_start`]).
    pub fn replacing(&self) -> bool {
        self.recovering
            .is_some_and(|recovering| recovering.replaced.is_some())
    }

    /// Breaks the restart rule on purpose (simulator builds only): a restarted leader
    /// resumes its view at once instead of leaving it. The simulator's `leader-resumes-view`
    /// bug shows that its checkers catch what the rule prevents. Call right after
    /// [`Replica::restart`].
    #[cfg(feature = "bug-injection")]
    pub fn bug_resume_view(&mut self) {
        if self.view_abdicated.take().is_some() {
            self.status = Status::Normal;
            self.ready = self.commit_min == self.op_head && self.recovering.is_none();
        }
    }

    /// Breaks the replacement rule on purpose (simulator builds only): a replaced replica
    /// takes its view floor as known at once, so it installs the first StartView it gets,
    /// whatever views its lost incarnation voted in. The simulator's `replace-skip-floor`
    /// bug runs it. Call right after [`Replica::replacing_start`].
    #[cfg(feature = "bug-injection")]
    pub fn bug_skip_view_floor(&mut self) {
        let others = self.others().fold(0u8, |mask, peer| mask | (1 << peer));
        if let Some(replaced) = self
            .recovering
            .as_mut()
            .and_then(|recovering| recovering.replaced.as_mut())
        {
            replaced.heard = others;
        }
    }

    /// Leaves recovering once the journal holds the promise again, or (fixed view, leader)
    /// once every peer reported a head this replica has reached: the ops it lost above
    /// those were held by no one else, so they were never committed, and it alone
    /// prepares ops in this view.
    fn recovering_check(&mut self) {
        let Some(recovering) = self.recovering else {
            return;
        };
        let others = self.others().fold(0u8, |mask, peer| mask | (1 << peer));
        let peers_reached = !self.config.view_change
            && self.is_leader()
            && recovering.heard == others
            && self.op_durable >= recovering.heard_op_max;
        if self.op_durable >= recovering.op_promised || peers_reached {
            self.recovering_end();
        }
    }

    fn recovering_end(&mut self) {
        self.recovering = None;
        self.ready = self.commit_min >= self.op_head;
    }

    /// The checksum of `op` if this replica still knows it (the chain head and the last
    /// ops, twice the pipeline): what DoViewChange and StartView bodies carry.
    pub fn checksum_at(&self, op: u64) -> Option<JournalChecksum> {
        if op == 0 {
            return Some(crate::journal::JOURNAL_CHAIN_ROOT);
        }
        if op == self.op_head {
            return Some(self.checksum_head);
        }
        if op > self.op_head {
            return None;
        }
        if op == self.op_durable {
            // Known even when the pipeline ring no longer holds it: a small pipeline
            // whose staged ops overwrote its slot (simulator seed 4019 with
            // `--pipeline 1`), so that a DoViewChange or StartView can always name it.
            return Some(self.checksum_durable);
        }
        let slot = &self.pipeline[self.slot_index(op)];
        (slot.op == op).then_some(slot.checksum)
    }

    /// While a log is being installed: the checksum op `op` must have (entries that do not
    /// match it come from another log and must not be appended).
    pub fn expected_checksum(&self, op: u64) -> Option<JournalChecksum> {
        let install = self.install?;
        if op < install.expected_op_min || op > install.op_head {
            return None;
        }
        Some(self.expected[(op - install.expected_op_min) as usize])
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

    /// Highest op that may be applied now: committed and held locally, in a log known to
    /// be the current view's (a log from an abandoned view may differ above the match
    /// point even where the op number is committed).
    pub fn apply_limit(&self) -> u64 {
        if self.status != Status::Normal || self.log_view != self.view {
            return self.commit_min;
        }
        self.commit_max.min(self.op_durable).max(self.commit_min)
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

    /// Leader: whether the driver sends each Prepare as soon as the entry is staged, before
    /// its own write of it is durable (`docs/protocol.md` 6.1: the leader's and the
    /// followers' writes overlap), rather than holding the Prepares until its group commit
    /// is durable. Only with view change: a restarted leader then never leads its old view
    /// again (section 8), so an op it sent and lost is never given a second entry. A
    /// fixed-view leader resumes its view after a restart and must never have sent an op it
    /// could lose (section 0, "Durable before send").
    pub fn sends_prepares_before_durable(&self) -> bool {
        self.config.view_change
    }

    /// Leader: whether one more op may be sealed (the pipeline has room).
    pub fn can_seal(&self) -> bool {
        let committed = self.commit_max.max(self.commit_min).min(self.op_head);
        self.is_ready_leader() && self.op_head - committed < self.pipeline_room()
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
        self.now_us = now_us;
        self.recovering_check();
        if self.install.is_some() {
            self.install_progress(now_us, actions);
            return;
        }
        if self.status != Status::Normal {
            return;
        }
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
        // PrepareOk(v, n) promises that the voting log has log_view = v and holds n (P2); a
        // recovering replica's journal no longer holds everything it promised (D2).
        if self.status != Status::Normal || self.log_view != self.view || self.recovering.is_some()
        {
            return;
        }
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
    /// latency sample taken (µs from the op's staging here, when its Prepare left, to this
    /// ack), if any. With view change the ack may come before this replica's own write of
    /// `op` is durable; it counts, and `commit_advance` waits for the leader's own copy.
    pub fn on_prepare_ok(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        op: u64,
        checksum: JournalChecksum,
        commit_min: u64,
    ) -> Option<u64> {
        if !self.is_leader()
            || self.status != Status::Normal
            || view != self.view
            || from == self.config.replica
        {
            self.counters.acks_ignored += 1;
            return None;
        }
        let slot = self.pipeline[self.slot_index(op)];
        let known = if op == 0 {
            checksum == crate::journal::JOURNAL_CHAIN_ROOT
        } else {
            op <= self.op_head && slot.op == op && slot.checksum == checksum
        };
        let peer = &mut self.peers[usize::from(from)];
        peer.commit_min = peer.commit_min.max(commit_min);
        // PrepareOk(v) is sent only with log_view = v.
        peer.log_view = view;
        if !known {
            // An op older than the pipeline window (a follower catching up) cannot move the
            // commit point; anything else would be a bug or a foreign log.
            self.counters.acks_ignored += 1;
            peer.op_durable = peer.op_durable.max(op.min(self.op_durable));
            return None;
        }
        let mut sample = None;
        let sent_us = if self.config.view_change {
            slot.staged_us
        } else {
            slot.durable_us
        };
        let peer = &mut self.peers[usize::from(from)];
        if op > peer.ack_op && sent_us > 0 {
            let latency_us = now_us.saturating_sub(sent_us);
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
        if self.status != Status::Normal || self.log_view != self.view {
            return;
        }
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
    /// the leader's `commit`. The runtime has verified the entry's checksums. A repair
    /// carries `log_view`, the view of the log the sender read the entry from (its
    /// `log_view` then); a leader's Prepare is of its view's log (`log_view == view`).
    #[allow(clippy::too_many_arguments)]
    pub fn on_prepare(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        op: u64,
        commit: u64,
        repair: bool,
        log_view: u64,
        actions: &mut Vec<Action>,
    ) -> PrepareDisposition {
        self.now_us = now_us;
        if !self.view_current(from, view, repair, actions) {
            return PrepareDisposition::Ignore;
        }
        if self.is_leader() && self.install.is_none() && self.recovering.is_none() {
            return PrepareDisposition::Ignore;
        }
        if !repair && from != self.leader() {
            return PrepareDisposition::Ignore;
        }
        let repair_log_view = self.repair_log_view();
        let leader = self.leader();
        let peer = &mut self.peers[usize::from(from)];
        if from == leader && !repair {
            // A normal leader's log is its view's log.
            peer.log_view = view;
        }
        // Only the leader, or a peer holding the log being followed, may extend this log:
        // an entry of an abandoned view can chain to the same head and still differ. A
        // repair says which log it was read from: what its sender's Pings said since may
        // describe a log it installed after it sent this (simulator seed 394).
        let source_log_view = if repair { log_view } else { peer.log_view };
        if source_log_view != repair_log_view {
            return PrepareDisposition::Ignore;
        }
        peer.op_durable = peer.op_durable.max(op);
        if from == leader {
            self.commit_learned(commit);
            if !repair {
                self.leader_heard(now_us);
            }
        }
        let op_known = self.install.map_or(op, |install| op.min(install.op_head));
        self.op_known_max = self.op_known_max.max(op_known);
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
        self.now_us = now_us;
        if !self.view_current(from, view, false, actions)
            || from != self.leader()
            || self.is_leader()
        {
            return;
        }
        self.leader_heard(now_us);
        self.commit_learned(commit);
        let peer = &mut self.peers[usize::from(from)];
        peer.log_view = view;
        peer.op_durable = peer.op_durable.max(op_head);
        if self.install.is_some() {
            return;
        }
        self.op_known_max = self.op_known_max.max(op_head);
        if self.op_durable > commit {
            // The leader has not committed what this replica holds: its acknowledgement may
            // have been lost, and nothing else would send it again while the group is idle.
            self.acknowledge(actions);
        }
        self.repair_schedule(now_us, actions);
    }

    /// A `Ping` from `from`: answer it and note its progress.
    pub fn on_ping(
        &mut self,
        from: u8,
        time_us: u64,
        op_durable: u64,
        commit_min: u64,
        log_view: u64,
        actions: &mut Vec<Action>,
    ) {
        self.peer_progress(from, op_durable, commit_min, log_view);
        push(
            actions,
            Action::Pong {
                to: from,
                time_us,
                op_durable: self.op_durable,
                commit_min: self.commit_min,
                log_view: self.log_view,
            },
        );
    }

    /// A `Pong` from `from` (in `view`) answering our ping sent at `time_us`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_pong(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        time_us: u64,
        op_durable: u64,
        commit_min: u64,
        log_view: u64,
        actions: &mut Vec<Action>,
    ) {
        if time_us <= now_us {
            self.peers[usize::from(from)]
                .latency
                .sample(now_us - time_us);
        }
        if let Some(replaced) = self
            .recovering
            .as_mut()
            .and_then(|recovering| recovering.replaced.as_mut())
            && time_us >= replaced.started_us
            && from != self.config.replica
            && from < self.config.replica_count
        {
            // It answers a Ping of this start, sent over a connection that replaced any
            // of the lost incarnation's: whatever that incarnation's votes did, the
            // sender had seen by then.
            replaced.heard |= 1 << from;
            replaced.view_floor = replaced.view_floor.max(view);
        }
        self.peer_progress(from, op_durable, commit_min, log_view);
        if !self.is_leader() || self.recovering.is_some() {
            self.repair_schedule(now_us, actions);
        }
    }

    fn peer_progress(&mut self, from: u8, op_durable: u64, commit_min: u64, log_view: u64) {
        let peer = &mut self.peers[usize::from(from)];
        if peer.log_view == log_view {
            peer.op_durable = peer.op_durable.max(op_durable);
        } else {
            // Another log (it truncated, or installed a view): what it had before says
            // nothing about what it holds now.
            peer.log_view = log_view;
            peer.op_durable = op_durable;
        }
        peer.commit_min = peer.commit_min.max(commit_min);
        // A peer whose voting log is the current view's holds a prefix of that log (P4), so
        // its head exists in the log this replica follows, and it may serve it.
        if log_view == self.view && self.log_view == self.view && self.install.is_none() {
            self.op_known_max = self.op_known_max.max(op_durable);
        }
        if let Some(recovering) = self.recovering.as_mut()
            && log_view == self.log_view
        {
            recovering.heard |= 1 << from;
            recovering.heard_op_max = recovering.heard_op_max.max(op_durable);
            self.recovering_check();
        }
    }

    /// The view whose log repairs must come from: the current view's, or, while a new
    /// leader installs the selected log, that log's view.
    fn repair_log_view(&self) -> u64 {
        self.install
            .map_or(self.view, |install| install.source_log_view)
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

    /// `from` no longer retains `op_min` (asked for by this replica): its journal starts at
    /// `op_retained_min` and its latest checkpoint is `op_checkpoint`. A follower whose
    /// next op is below what the peer retains and whose head is below that checkpoint
    /// syncs to it ([`Action::StateSync`]); the checkpoint is committed (peers checkpoint
    /// applied ops only), so installing it never contradicts any later log. Otherwise the
    /// repair is rerouted.
    pub fn on_not_retained(
        &mut self,
        from: u8,
        op_min: u64,
        op_retained_min: u64,
        op_checkpoint: u64,
        actions: &mut Vec<Action>,
    ) {
        if from == self.config.replica || usize::from(from) >= self.peers.len() {
            return;
        }
        if let Some(repair) = self.repair
            && repair.peer == from
        {
            self.peers[usize::from(from)].repairs_inflight = 0;
            self.repair = None;
        }
        let next = self.op_head + 1;
        // While a log is installed, only a checkpoint within its known committed prefix:
        // committed ops are the same in every log, so the checkpoint is a prefix of the
        // log being installed (a replaced replica rebuilds this way, docs/protocol.md 8).
        // That holds for the new leader too: the log its DoViewChange quorum selected
        // may need ops its holders no longer keep. A leader with no install holds its
        // view's whole log and repairs nothing.
        let install_allows = match self.install {
            Some(install) => op_checkpoint <= install.commit_max,
            None => !self.is_leader(),
        };
        if self.sync.is_some()
            || !install_allows
            || op_min != next
            || op_retained_min <= next
            || op_checkpoint <= self.op_head
        {
            return;
        }
        self.sync = Some((from, op_checkpoint));
        self.counters.state_syncs += 1;
        push(
            actions,
            Action::StateSync {
                from,
                checkpoint_op: op_checkpoint,
            },
        );
    }

    /// The state sync to checkpoint `op` (whose entry has `checksum`) is installed: the
    /// journal holds nothing after `op`, and the state machine is at `op`. Repair resumes
    /// from `op + 1`.
    pub fn on_state_synced(
        &mut self,
        now_us: u64,
        op: u64,
        checksum: JournalChecksum,
        actions: &mut Vec<Action>,
    ) {
        assert_eq!(
            self.sync.map(|(_, synced)| synced),
            Some(op),
            "the sync asked for"
        );
        assert!(op > self.op_head, "a sync only moves the log forward");
        self.sync = None;
        self.counters.state_syncs_installed += 1;
        self.op_head = op;
        self.checksum_head = checksum;
        self.op_durable = op;
        self.checksum_durable = checksum;
        self.commit_min = op;
        self.commit_max = self.commit_max.max(op);
        self.op_known_max = self.op_known_max.max(op);
        self.ready = true;
        self.recovering_check();
        for slot in self.pipeline.iter_mut() {
            *slot = Slot::default();
        }
        let index = self.slot_index(op);
        self.pipeline[index] = Slot {
            op,
            checksum,
            staged_us: now_us,
            durable_us: now_us,
        };
        if self.install.is_some() {
            self.install_progress(now_us, actions);
            return;
        }
        self.acknowledge(actions);
        self.repair_schedule(now_us, actions);
    }

    /// The state sync could not be done (the peer went away, its checkpoint moved on, the
    /// snapshot did not verify): repair resumes and may start another.
    pub fn on_state_sync_failed(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        self.sync = None;
        self.repair_schedule(now_us, actions);
    }

    /// The checkpoint op of the state sync in progress, if any.
    pub fn state_sync(&self) -> Option<u64> {
        self.sync.map(|(_, op)| op)
    }

    /// The runtime applied `op`.
    pub fn on_applied(&mut self, op: u64) {
        assert_eq!(op, self.commit_min + 1, "ops apply in order");
        assert!(
            op <= self.apply_limit(),
            "only committed, durable ops apply"
        );
        self.commit_min = op;
        if self.commit_min >= self.op_head {
            // A new leader has applied everything it inherited: it may seal (7.2 step 4).
            self.ready = true;
        }
    }

    /// The runtime's connection to `peer` came up or went down.
    pub fn on_connection(&mut self, peer: u8, connected: bool) {
        if connected
            && !self.peers[usize::from(peer)].connected
            && peer == self.leader()
            && self.config.view_change
        {
            // A fresh connection to the leader: give it a full timeout from now.
            let now_us = self.now_us;
            self.leader_heard(now_us);
        }
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
        self.now_us = now_us;
        self.stall_check(now_us);
        // A recovering leader with view change sends no heartbeats: it cannot lead until it
        // has repaired, and its followers' timeouts move the group to a leader that can.
        let heartbeats = self.recovering.is_none() || !self.config.view_change;
        if self.is_leader()
            && self.status == Status::Normal
            && heartbeats
            && now_us >= self.heartbeat_next_us
        {
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
                        log_view: self.log_view,
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
        if !self.is_leader() || self.install.is_some() || self.recovering.is_some() {
            self.repair_schedule(now_us, actions);
        }
        if self.config.view_change {
            self.rebalance_tick(now_us, actions);
            self.view_change_tick(now_us, actions);
        }
        self.tick_due_us = self.poll_timeout();
    }

    /// Leader rebalancing ([`ReplicaConfig::leader_rebalance_us`]): a ready leader that is
    /// not its group's preferred leader hands the group over once the preferred replica has
    /// looked ready for the configured time. The handoff is an ordinary view change, to the
    /// next view the preferred replica leads; this leader starts it, and a follower that
    /// hears StartViewChange from the leader of its own view joins at once (the view can
    /// commit nothing more), so it costs one view change, with no leader timeout.
    fn rebalance_tick(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let preferred = self.config.leader_of(0);
        if self.config.leader_rebalance_us == 0
            || preferred == self.config.replica
            || !self.is_ready_leader()
        {
            self.rebalance_since_us = None;
            return;
        }
        let peer = &self.peers[usize::from(preferred)];
        // Connected, in this view's log, acknowledging and applying close behind the commit
        // point: its view change vote carries a current log, and as the new leader it has
        // little to repair or apply before it may seal.
        let ready = peer.connected
            && peer.log_view == self.view
            && peer.ack_op + self.config.pipeline_prepares_max >= self.commit_max
            && peer.commit_min + self.config.pipeline_prepares_max >= self.commit_max;
        if !ready {
            self.rebalance_since_us = None;
            return;
        }
        let since_us = *self.rebalance_since_us.get_or_insert(now_us);
        if now_us.saturating_sub(since_us) < self.config.leader_rebalance_us {
            return;
        }
        self.rebalance_since_us = None;
        let mut view = self.view + 1;
        while self.config.leader_of(view) != preferred {
            view += 1;
        }
        self.counters.leader_handoffs += 1;
        self.view_change_enter(now_us, view, actions);
    }

    /// Whether this replica did not run for a while before this tick; if so, a follower
    /// gives the leader's messages that waited meanwhile time to be read before it
    /// suspects the leader ([`STALL_GRACE_HEARTBEATS`]).
    fn stall_check(&mut self, now_us: u64) {
        let late_us = now_us.saturating_sub(self.tick_due_us);
        if late_us <= self.config.leader_timeout_us_min / 2 {
            return;
        }
        self.counters.stalls += 1;
        let silent_us = now_us.saturating_sub(self.leader_heard_us);
        if self.status == Status::Normal && !self.is_leader() && silent_us < STALL_DEFER_US_MAX {
            let grace_us = STALL_GRACE_HEARTBEATS * self.config.heartbeat_interval_us;
            self.leader_deadline_us = self.leader_deadline_us.max(now_us + grace_us);
            // Nor does it grant another's pre-vote on that silence.
            self.stall_heard_us = now_us;
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
        if self.config.view_change {
            if self.view_abdicated == Some(self.view) {
                next = next.min(self.now_us);
            }
            if let Some(pre_vote) = self.pre_vote {
                next = next.min(pre_vote.deadline_us);
            }
            match self.status {
                Status::Normal if !self.is_leader() => next = next.min(self.leader_deadline_us),
                Status::Normal => {}
                Status::ViewChange => {
                    next = next
                        .min(self.view_change_deadline_us)
                        .min(self.view_change_resend_us);
                }
            }
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
        if (self.is_leader() && self.install.is_none() && self.recovering.is_none())
            || self.op_head >= self.op_known_max
            || self.sync.is_some()
        {
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
        let mut op_max = self
            .op_known_max
            .min(self.op_head + self.config.repair_ops_max);
        if self.recovering.is_some() {
            // The promise may lie above what any peer holds (ops this replica alone had):
            // ask for what the best-placed peer has.
            let held = self.repair_held_max();
            if held < op_min {
                return;
            }
            op_max = op_max.min(held);
        }
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

    /// The highest op a connected peer that may serve repairs is known to hold.
    fn repair_held_max(&self) -> u64 {
        self.others()
            .map(|peer| &self.peers[usize::from(peer)])
            .filter(|state| state.connected && state.log_view == self.repair_log_view())
            .map(|state| state.op_durable)
            .max()
            .unwrap_or(0)
    }

    /// The routing rule (`docs/protocol.md` 6.5): among connected peers known to hold
    /// `op_max`, the lowest latency score; one request in `routing_explore_one_in` goes to
    /// a random eligible peer so that estimates of peers not chosen stay fresh.
    fn repair_route(&mut self, op_max: u64) -> Option<u8> {
        let mut eligible = [0u8; REPLICA_COUNT_MAX];
        let mut count = 0;
        for peer in self.others() {
            let state = &self.peers[usize::from(peer)];
            if state.connected
                && state.op_durable >= op_max
                && state.log_view == self.repair_log_view()
            {
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

    // ---------------------------------------------------------------------------------
    // View change (docs/protocol.md section 7). Active only with `config.view_change`.
    // ---------------------------------------------------------------------------------

    fn random_between(&mut self, min: u64, max: u64) -> u64 {
        min + self.random() % (max - min + 1)
    }

    fn leader_timeout_us(&mut self) -> u64 {
        self.random_between(
            self.config.leader_timeout_us_min,
            self.config.leader_timeout_us_max,
        )
    }

    fn view_change_timeout_us(&mut self) -> u64 {
        self.random_between(
            self.config.view_change_timeout_us_min,
            self.config.view_change_timeout_us_max,
        )
    }

    fn leader_heard(&mut self, now_us: u64) {
        self.leader_heard_us = now_us;
        self.leader_deadline_us = now_us + self.leader_timeout_us();
    }

    /// Whether a message of `view` from `from` belongs to the view this replica is normal
    /// in. A newer view (or its own view while it is still changing views) means it missed
    /// the StartView: it asks the view's leader for it, at most once per resend interval.
    fn view_current(
        &mut self,
        from: u8,
        view: u64,
        repair: bool,
        actions: &mut Vec<Action>,
    ) -> bool {
        self.view_seen_max = self.view_seen_max.max(view);
        if !self.config.view_change {
            return view == self.view;
        }
        if view < self.view {
            return false;
        }
        let behind =
            view > self.view || (self.status == Status::ViewChange && self.install.is_none());
        if !behind {
            return true;
        }
        if !repair
            && from == self.config.leader_of(view)
            && from != self.config.replica
            && self.now_us >= self.request_start_view_us
        {
            self.request_start_view_us = self.now_us + self.config.view_change_resend_interval_us;
            push(actions, Action::RequestStartView { to: from, view });
        }
        false
    }

    fn view_change_tick(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let target = (self.view + 1).max(self.view_seen_max);
        if self.view_abdicated == Some(self.view) {
            // No pre-vote: whatever the others answer, this replica must not lead its old
            // view again. Joining the next view is safe; its leader is another replica.
            self.view_change_enter(now_us, target, actions);
            return;
        }
        if let Some(pre_vote) = self.pre_vote
            && now_us >= pre_vote.deadline_us
        {
            self.pre_vote_start(now_us, target, actions);
        }
        match self.status {
            Status::Normal => {
                if !self.is_leader() && now_us >= self.leader_deadline_us && self.pre_vote.is_none()
                {
                    self.pre_vote_start(now_us, target, actions);
                }
            }
            Status::ViewChange => {
                if now_us >= self.view_change_deadline_us {
                    self.view_change_deadline_us = now_us + self.view_change_timeout_us();
                    if self.pre_vote.is_none() {
                        self.pre_vote_start(now_us, target, actions);
                    }
                }
                if now_us >= self.view_change_resend_us {
                    self.view_change_resend_us =
                        now_us + self.config.view_change_resend_interval_us;
                    for peer in self.others() {
                        push(
                            actions,
                            Action::StartViewChange {
                                to: peer,
                                view: self.view,
                            },
                        );
                    }
                    if self.dvc_sent && self.config.leader_of(self.view) != self.config.replica {
                        self.do_view_change_send(actions);
                    }
                }
            }
        }
    }

    fn pre_vote_start(&mut self, now_us: u64, view_target: u64, actions: &mut Vec<Action>) {
        let deadline_us = now_us + self.view_change_timeout_us();
        self.pre_vote = Some(PreVoteState {
            view_target,
            granted: 0,
            deadline_us,
        });
        if self.config.quorum() == 1 {
            self.pre_vote = None;
            self.view_change_enter(now_us, view_target, actions);
            return;
        }
        for peer in self.others() {
            push(
                actions,
                Action::PreVote {
                    to: peer,
                    view_target,
                },
            );
        }
    }

    /// Whether this replica would join `view_target` (Raft's pre-vote): only a higher view,
    /// and never while it is a normal leader or has heard its leader recently.
    fn pre_vote_grantable(&self, now_us: u64, view_target: u64) -> bool {
        if view_target < self.view || (view_target == self.view && self.status == Status::Normal) {
            return false;
        }
        if self.status == Status::Normal {
            if self.is_leader() {
                // A recovering leader cannot lead: it lets the group move on.
                return self.recovering.is_some() && view_target > self.view;
            }
            // A stall's end counts as hearing the leader: this replica could not read what
            // its leader sent while it did not run (`stall_check`).
            let heard_us = self.leader_heard_us.max(self.stall_heard_us);
            if now_us.saturating_sub(heard_us) < self.config.leader_timeout_us_min {
                return false;
            }
        }
        true
    }

    /// A pre-vote request. Grants change no state.
    pub fn on_pre_vote(
        &mut self,
        now_us: u64,
        from: u8,
        view_target: u64,
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        let granted = self.config.view_change && self.pre_vote_grantable(now_us, view_target);
        push(
            actions,
            Action::PreVoteReply {
                to: from,
                view_target,
                granted,
            },
        );
    }

    /// An answer to this replica's pre-vote.
    pub fn on_pre_vote_reply(
        &mut self,
        now_us: u64,
        from: u8,
        view_target: u64,
        granted: bool,
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        let Some(mut pre_vote) = self.pre_vote else {
            return;
        };
        if !granted || pre_vote.view_target != view_target || from == self.config.replica {
            return;
        }
        pre_vote.granted |= 1 << from;
        self.pre_vote = Some(pre_vote);
        if pre_vote.granted.count_ones() as usize + 1 >= self.config.quorum() {
            self.pre_vote = None;
            if view_target > self.view || self.status == Status::ViewChange {
                self.view_change_enter(now_us, view_target.max(self.view), actions);
            }
        }
    }

    /// Leaves the current view for `view` (7.2 step 1): persist, then StartViewChange.
    fn view_change_enter(&mut self, now_us: u64, view: u64, actions: &mut Vec<Action>) {
        assert!(view >= self.view);
        assert_ne!(
            Some(view),
            self.view_abdicated,
            "a restarted leader leaves its view"
        );
        self.view = view;
        self.view_seen_max = self.view_seen_max.max(view);
        self.status = Status::ViewChange;
        self.svc_from = 0;
        self.dvc_sent = false;
        for dvc in self.dvc.iter_mut() {
            dvc.present = false;
        }
        self.install = None;
        self.ready = false;
        self.pre_vote = None;
        self.repair = None;
        for peer in self.peers.iter_mut() {
            peer.repairs_inflight = 0;
        }
        self.view_change_deadline_us = now_us + self.view_change_timeout_us();
        self.view_change_resend_us = now_us + self.config.view_change_resend_interval_us;
        push(
            actions,
            Action::Persist {
                view,
                log_view: self.log_view,
                commit_max: self.commit_max,
            },
        );
        for peer in self.others() {
            push(actions, Action::StartViewChange { to: peer, view });
        }
        self.do_view_change_maybe(now_us, actions);
    }

    /// A peer left its view for `view`.
    pub fn on_start_view_change(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        if !self.config.view_change || from == self.config.replica {
            return;
        }
        self.view_seen_max = self.view_seen_max.max(view);
        if view > self.view {
            // Join if this replica would grant a pre-vote for it, or once f + 1 replicas
            // left for it (then a majority can commit nothing more in the old view). A
            // single replica thawed after a pause must not pull a healthy leader out of
            // its view (7.2).
            if self.svc_future.0 != view {
                self.svc_future = (view, 0);
                self.svc_future_since_us = now_us;
            }
            self.svc_future.1 |= 1 << from;
            let f = usize::from(self.config.replica_count) - self.config.quorum();
            // A replica that reached a higher view alone stays there (it may not come back
            // to a lower view it left) until the group reaches it: a normal leader that
            // keeps hearing of that view for a while moves the group up, so the replica is
            // not lost for good. Changing views is always safe; this costs one view change.
            let stranded = self.is_leader()
                && self.status == Status::Normal
                && now_us.saturating_sub(self.svc_future_since_us) >= STRANDED_VIEW_JOIN_US;
            // The leader of this replica's view left it (it restarted, section 8): nothing
            // can commit in the view any more, so waiting for a leader timeout gains nothing.
            let leader_left = from == self.leader();
            if self.pre_vote_grantable(now_us, view)
                || self.svc_future.1.count_ones() as usize > f
                || stranded
                || leader_left
            {
                let joined = self.svc_future.1;
                self.view_change_enter(now_us, view, actions);
                self.svc_from |= joined;
            }
        }
        if view == self.view && self.status == Status::ViewChange {
            self.svc_from |= 1 << from;
            self.do_view_change_maybe(now_us, actions);
        }
    }

    /// With StartViewChange from `q − 1` others, the voting log goes to the new leader.
    fn do_view_change_maybe(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        // A recovering replica does not vote: its log lacks entries it may have promised.
        if self.status != Status::ViewChange
            || self.dvc_sent
            || self.recovering.is_some()
            || self.view_abdicated == Some(self.view)
            || (self.svc_from.count_ones() as usize) + 1 < self.config.quorum()
        {
            return;
        }
        self.dvc_sent = true;
        if self.config.leader_of(self.view) == self.config.replica {
            let headers_op_min = self.headers_op_min(self.op_durable);
            let me = usize::from(self.config.replica);
            let count = (self.op_durable + 1 - headers_op_min) as usize;
            for index in 0..count {
                let op = headers_op_min + index as u64;
                self.dvc[me].checksums[index] = self.checksum_at(op).expect("headers are known");
            }
            let dvc = &mut self.dvc[me];
            dvc.present = true;
            dvc.log_view = self.log_view;
            dvc.op_durable = self.op_durable;
            dvc.commit_max = self.commit_max;
            dvc.headers_op_min = headers_op_min;
            self.view_select_maybe(now_us, actions);
        } else {
            self.do_view_change_send(actions);
        }
    }

    fn do_view_change_send(&mut self, actions: &mut Vec<Action>) {
        push(
            actions,
            Action::DoViewChange {
                to: self.config.leader_of(self.view),
                view: self.view,
                log_view: self.log_view,
                op_durable: self.op_durable,
                commit_max: self.commit_max,
                headers_op_min: self.headers_op_min(self.op_durable),
            },
        );
    }

    /// The first op of the header suffix ending at `op_last`: up to
    /// `view_change_headers_max` ops whose checksums this replica still knows.
    fn headers_op_min(&self, op_last: u64) -> u64 {
        let mut op_min = op_last + 1;
        let headers_max = self.config.view_change_headers_max();
        while op_min > 1
            && op_last + 1 - op_min < headers_max
            && self.checksum_at(op_min - 1).is_some()
        {
            op_min -= 1;
        }
        // A log described by no checksum at all cannot be compared: its receivers would
        // cut theirs to their commit number (`match_point`).
        debug_assert!(
            op_last == 0 || op_min <= op_last,
            "replica {} does not know the checksum of op {op_last} (head {})",
            self.config.replica,
            self.op_head
        );
        op_min
    }

    /// New leader: a DoViewChange. `checksums` are those of ops
    /// `headers_op_min..=op_durable`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_do_view_change(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        log_view: u64,
        op_durable: u64,
        commit_max: u64,
        headers_op_min: u64,
        checksums: &[JournalChecksum],
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        if !self.config.view_change || from == self.config.replica {
            return;
        }
        let count = (op_durable + 1).saturating_sub(headers_op_min) as usize;
        if checksums.len() != count
            || count > self.expected.len()
            || headers_op_min == 0
            || log_view > view
        {
            return;
        }
        if view > self.view {
            self.view_change_enter(now_us, view, actions);
        }
        if view != self.view
            || self.status != Status::ViewChange
            || self.config.leader_of(view) != self.config.replica
            || self.install.is_some()
        {
            return;
        }
        let dvc = &mut self.dvc[usize::from(from)];
        dvc.present = true;
        dvc.log_view = log_view;
        dvc.op_durable = op_durable;
        dvc.commit_max = commit_max;
        dvc.headers_op_min = headers_op_min;
        dvc.checksums[..count].copy_from_slice(checksums);
        // Its DoViewChange implies it left the old view.
        self.svc_from |= 1 << from;
        self.do_view_change_maybe(now_us, actions);
        self.view_select_maybe(now_us, actions);
    }

    /// With DoViewChange from a quorum (itself included), the new leader selects the log
    /// with the highest `(log_view, op_durable)` and installs it (7.3).
    fn view_select_maybe(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.install.is_some() || !self.dvc[usize::from(self.config.replica)].present {
            return;
        }
        let present = self.dvc.iter().filter(|dvc| dvc.present).count();
        if present < self.config.quorum() {
            return;
        }
        let me = self.config.replica;
        let best = (0..self.config.replica_count)
            .filter(|replica| self.dvc[usize::from(*replica)].present)
            .max_by_key(|replica| {
                let dvc = &self.dvc[usize::from(*replica)];
                (dvc.log_view, dvc.op_durable, *replica == me)
            })
            .expect("a quorum is present");
        let commit_max = self
            .dvc
            .iter()
            .filter(|dvc| dvc.present)
            .map(|dvc| dvc.commit_max)
            .max()
            .unwrap_or(0)
            .max(self.commit_max);
        let selected = self.dvc[usize::from(best)].clone();
        assert!(
            commit_max <= selected.op_durable.max(self.commit_min),
            "a committed op is missing from the selected log"
        );
        for replica in 0..self.config.replica_count {
            if replica == me {
                continue;
            }
            let dvc = &self.dvc[usize::from(replica)];
            // Only replicas holding the selected log may serve it (repair_log_view).
            let peer = &mut self.peers[usize::from(replica)];
            if dvc.present {
                peer.op_durable = dvc.op_durable;
                peer.log_view = dvc.log_view;
            } else {
                peer.op_durable = 0;
                peer.log_view = u64::MAX;
            }
        }
        self.install_begin(
            now_us,
            selected.op_durable,
            commit_max,
            selected.headers_op_min,
            &selected.checksums,
            selected.log_view,
            actions,
        );
    }

    /// Starts installing the log whose head is `op_head` and whose last checksums are
    /// `checksums` from `headers_op_min`: truncate the divergent suffix, repair the rest.
    #[allow(clippy::too_many_arguments)]
    fn install_begin(
        &mut self,
        now_us: u64,
        op_head: u64,
        commit_max: u64,
        headers_op_min: u64,
        checksums: &[JournalChecksum],
        source_log_view: u64,
        actions: &mut Vec<Action>,
    ) {
        let count = (op_head + 1).saturating_sub(headers_op_min) as usize;
        self.expected[..count].copy_from_slice(&checksums[..count]);
        self.install = Some(Install {
            op_head,
            commit_max,
            expected_op_min: headers_op_min,
            source_log_view,
        });
        let match_op = self.match_point(op_head);
        self.truncate_above(match_op, actions);
        self.op_known_max = op_head;
        self.repair = None;
        self.install_progress(now_us, actions);
    }

    /// Where this replica's log is cut when it installs a log ending at `op_head`: the
    /// highest op at which the two agree (equal checksums at `m` mean equal logs up to `m`,
    /// through the hash chain), at least `commit_min`, whose ops are committed and so in
    /// every later log.
    ///
    /// The new log's checksums cover only its last ops (`expected`, at most
    /// `view_change_headers_max`). Below them this replica's entries are kept for now, not
    /// cut: they may be committed entries it acknowledged (a replica that learned of fewer
    /// commits than were made, or is still applying a long repair), and cutting those
    /// would leave a committed op on fewer replicas than the quorum that committed it. They
    /// are checked as the install goes on: every entry it stages above them must chain
    /// onto them, up to the first expected checksum; an entry that does not chain is
    /// reported ([`Replica::on_chain_mismatch`]) and the head is cut one op at a time.
    /// With no checksums at all there is nothing to check against, and the log is cut to
    /// `commit_min`.
    fn match_point(&self, op_head: u64) -> u64 {
        let Some(install) = self
            .install
            .filter(|install| install.expected_op_min <= op_head)
        else {
            return self.commit_min;
        };
        let mut op = self.op_head.min(op_head);
        while op > self.commit_min {
            if op < install.expected_op_min {
                return op;
            }
            match (self.checksum_at(op), self.expected_checksum(op)) {
                (Some(mine), Some(theirs)) if mine == theirs => return op,
                _ => op -= 1,
            }
        }
        self.commit_min
    }

    /// The leader of this view says ops up to `commit` are committed. While a log is being
    /// installed the news waits in the install and takes effect when it is done: until then
    /// this replica's journal may hold entries kept below the new log's checksums and not
    /// yet checked ([`Replica::match_point`]), and a commit number persisted meanwhile
    /// would let a restart replay them as committed.
    fn commit_learned(&mut self, commit: u64) {
        match self.install.as_mut() {
            Some(install) => install.commit_max = install.commit_max.max(commit),
            None => self.commit_max = self.commit_max.max(commit),
        }
    }

    /// Cuts the log above `op` (never below `commit_min`: applied ops are committed).
    fn truncate_above(&mut self, op: u64, actions: &mut Vec<Action>) {
        assert!(
            op >= self.commit_min,
            "applied ops are committed and never truncated"
        );
        if op < self.op_head {
            push(actions, Action::Truncate { op });
            self.checksum_head = self.checksum_at(op).unwrap_or(0);
            self.op_head = op;
            if self.op_durable > op {
                self.op_durable = op;
                self.checksum_durable = self.checksum_head;
            }
        }
    }

    /// While a log is installed: the journal refused `op`, the entry after this replica's
    /// head, because it does not chain onto the head. The entry comes from the log being
    /// installed (only its holders' entries get this far, and those in its checksum range
    /// matched it), so the head is not that log's: it is an entry kept below the new log's
    /// checksums (when the install began) that turned out to belong to an abandoned view,
    /// and never committed. It is cut, and the op before it checked the same way.
    pub fn on_chain_mismatch(&mut self, now_us: u64, op: u64, actions: &mut Vec<Action>) {
        self.now_us = now_us;
        if self.install.is_none() || op != self.op_head + 1 || self.op_head <= self.commit_min {
            return;
        }
        self.counters.chain_mismatches += 1;
        self.truncate_above(self.op_head - 1, actions);
        self.repair_schedule(now_us, actions);
    }

    /// Install: once the log is durable up to its head, persist `log_view = view` (D3);
    /// a new leader then becomes normal and sends StartView, a follower acknowledges.
    fn install_progress(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let Some(install) = self.install else {
            return;
        };
        if self.op_durable < install.op_head {
            self.op_known_max = install.op_head;
            self.repair_schedule(now_us, actions);
            return;
        }
        // A follower may already hold the new leader's next Prepares beyond the head it
        // installed (they come from the leader of this view, so they are its log).
        debug_assert!(self.op_durable >= install.op_head);
        self.install = None;
        self.log_view = self.view;
        // A newer view's log, installed whole, holds every committed op (7.5): what this
        // replica lost and did not get back was never committed (8, case b).
        if self.recovering.is_some() {
            self.recovering_end();
        }
        self.commit_max = self.commit_max.max(install.commit_max);
        push(
            actions,
            Action::Persist {
                view: self.view,
                log_view: self.log_view,
                commit_max: self.commit_max,
            },
        );
        if self.config.leader_of(self.view) == self.config.replica {
            self.status = Status::Normal;
            self.ready = self.commit_min >= self.op_head;
            for peer in self.peers.iter_mut() {
                // Only acknowledgements sent in this view count (6.3).
                peer.ack_op = 0;
            }
            for op in self.commit_max + 1..=self.op_head {
                let index = self.slot_index(op);
                if self.pipeline[index].op == op && self.pipeline[index].durable_us == 0 {
                    self.pipeline[index].durable_us = now_us;
                }
            }
            let headers_op_min = self.headers_op_min(self.op_head);
            for peer in self.others() {
                push(
                    actions,
                    Action::StartView {
                        to: peer,
                        view: self.view,
                        op_head: self.op_head,
                        commit_max: self.commit_max,
                        headers_op_min,
                    },
                );
                self.peers[usize::from(peer)].sent_us = now_us;
            }
            self.heartbeat_next_us = now_us + self.config.heartbeat_interval_us;
            self.commit_advance();
        } else {
            self.acknowledge(actions);
        }
    }

    /// Follower: the new leader's StartView. Installs its log (7.4): truncate what diverges,
    /// repair the rest, then acknowledge.
    #[allow(clippy::too_many_arguments)]
    pub fn on_start_view(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        op_head: u64,
        commit_max: u64,
        headers_op_min: u64,
        checksums: &[JournalChecksum],
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        if !self.config.view_change
            || view < self.view
            || from != self.config.leader_of(view)
            || from == self.config.replica
        {
            return;
        }
        let count = (op_head + 1).saturating_sub(headers_op_min) as usize;
        if checksums.len() != count || count > self.expected.len() || headers_op_min == 0 {
            return;
        }
        self.view_seen_max = self.view_seen_max.max(view);
        if self.replacing()
            && self
                .replacing_view_floor()
                .is_none_or(|view_floor| view < view_floor)
        {
            // A replaced replica installs only a view at or above every view its lost
            // incarnation may have voted in (`replacing_start`); its view's leader is asked
            // again once the floor is known (`view_current`).
            return;
        }
        let installed = view == self.view
            && self.status == Status::Normal
            && (self.log_view == view || self.install.is_some());
        self.leader_heard(now_us);
        if installed {
            self.commit_learned(commit_max);
            return;
        }
        self.view = view;
        self.status = Status::Normal;
        self.ready = false;
        self.pre_vote = None;
        self.svc_from = 0;
        self.dvc_sent = false;
        for peer in self.others() {
            let state = &mut self.peers[usize::from(peer)];
            (state.op_durable, state.log_view) = if peer == from {
                (op_head, view)
            } else {
                (0, u64::MAX)
            };
        }
        push(
            actions,
            Action::Persist {
                view,
                log_view: self.log_view,
                commit_max: self.commit_max,
            },
        );
        self.install_begin(
            now_us,
            op_head,
            commit_max,
            headers_op_min,
            checksums,
            view,
            actions,
        );
    }

    /// A replica that missed this view's StartView asks for it.
    pub fn on_request_start_view(
        &mut self,
        now_us: u64,
        from: u8,
        view: u64,
        actions: &mut Vec<Action>,
    ) {
        self.now_us = now_us;
        if !self.config.view_change
            || view != self.view
            || !self.is_leader()
            || self.status != Status::Normal
            || self.recovering.is_some()
            || from == self.config.replica
        {
            return;
        }
        // Only what is durable here: a staged op this leader may still lose (a crash before
        // its fsync, then a restart that resumes the view) must not become the requester's
        // expected checksum, or the op prepared in its place is refused there forever
        // (simulator seed 50619).
        push(
            actions,
            Action::StartView {
                to: from,
                view: self.view,
                op_head: self.op_durable,
                commit_max: self.commit_max.min(self.op_durable),
                headers_op_min: self.headers_op_min(self.op_durable),
            },
        );
    }

    /// The driver executed a `Truncate`; `checksum` is the journal's new chain head.
    ///
    /// A truncation above the head is one the core has since cut below (a second StartView
    /// while the first truncation waited behind a superblock write): the journal runs the
    /// later, lower one next, and this one changes nothing here.
    pub fn on_truncated(&mut self, op: u64, checksum: JournalChecksum) {
        if op > self.op_head {
            return;
        }
        assert_eq!(op, self.op_head, "truncated where the core said");
        self.checksum_head = checksum;
        if self.op_durable == op {
            self.checksum_durable = checksum;
        }
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

    /// Two truncations queued behind a superblock write, the second lower (two StartViews
    /// in a row): when the first runs, the core's head is already the second's, and the
    /// first changes nothing (it asserted, and stopped the shard).
    #[test]
    fn a_truncation_the_core_has_since_cut_below_changes_nothing() {
        let mut config = ReplicaConfig::new(0, 1, 3, 7).unwrap();
        config.view_change = true;
        let views = Persisted {
            view: 2,
            log_view: 2,
        };
        let mut replica = Replica::restart(config, views, 5, 0x55, 0, &[(5, 0x55)], 0).unwrap();
        replica.on_truncated(8, 0x88);
        assert_eq!((replica.op_head(), replica.checksum_head()), (5, 0x55));
        replica.on_truncated(5, 0x56);
        assert_eq!(replica.checksum_head(), 0x56);
    }

    fn actions() -> Vec<Action> {
        Vec::with_capacity(ACTIONS_MAX)
    }

    /// Replica 1 of 3 with view change, past its start-up grace, having just heard its
    /// leader (replica 0) at the returned time.
    fn follower_hearing_its_leader() -> (Replica, u64) {
        let mut config = ReplicaConfig::new(0, 1, 3, 7).unwrap();
        config.view_change = true;
        let mut follower = Replica::new(config, 0, 0, 0).unwrap();
        let mut now_us = 0;
        let mut out = actions();
        // Regular ticks with the leader's heartbeats, as a driver runs them.
        while now_us < 3_000_000 {
            now_us += 20_000;
            follower.on_commit(now_us, 0, 0, 0, 0, &mut out);
            follower.tick(now_us, &mut out);
            out.clear();
        }
        assert_eq!(follower.counters().stalls, 0);
        (follower, now_us)
    }

    /// Ticks `follower` every `step_us` from `now_us` until `until_us`, hearing nothing;
    /// returns when it first sent a pre-vote, if it did.
    fn first_pre_vote(
        follower: &mut Replica,
        now_us: u64,
        step_us: u64,
        until_us: u64,
    ) -> Option<u64> {
        let mut out = actions();
        let mut now_us = now_us;
        while now_us < until_us {
            now_us += step_us;
            follower.tick(now_us, &mut out);
            if out
                .iter()
                .any(|action| matches!(action, Action::PreVote { .. }))
            {
                return Some(now_us);
            }
            out.clear();
        }
        None
    }

    #[test]
    fn a_follower_that_hears_nothing_while_running_suspects_its_leader_in_a_timeout() {
        let (mut follower, heard_us) = follower_hearing_its_leader();
        let config = *follower.config();
        let at = first_pre_vote(&mut follower, heard_us, 10_000, heard_us + 1_000_000)
            .expect("a silent leader is suspected");
        let silence_us = at - heard_us;
        assert!(
            silence_us >= config.leader_timeout_us_min
                && silence_us <= config.leader_timeout_us_max + 10_000,
            "{silence_us}"
        );
        assert_eq!(follower.counters().stalls, 0);
    }

    #[test]
    fn a_follower_that_did_not_run_reads_what_waited_before_it_suspects_its_leader() {
        let (mut stalled, heard_us) = follower_hearing_its_leader();
        let (mut silent, _) = follower_hearing_its_leader();
        // Descheduled for a second: its next tick comes far past the deadline it asked for,
        // before the leader's messages that waited in its socket are read.
        let resumed_us = heard_us + 1_000_000;
        let mut out = actions();
        stalled.tick(resumed_us, &mut out);
        assert_eq!(stalled.counters().stalls, 1);
        assert!(
            !out.iter()
                .any(|action| matches!(action, Action::PreVote { .. })),
            "suspected its leader on silence it could not have heard: {out:?}"
        );
        // The waiting messages are read: nothing more happens while the leader sends.
        out.clear();
        stalled.on_commit(resumed_us + 1_000, 0, 0, 0, 0, &mut out);
        let mut now_us = resumed_us + 1_000;
        while now_us < resumed_us + 200_000 {
            now_us += 20_000;
            stalled.tick(now_us, &mut out);
            stalled.on_commit(now_us, 0, 0, 0, 0, &mut out);
        }
        assert!(
            !out.iter()
                .any(|action| matches!(action, Action::PreVote { .. }))
        );
        assert_eq!(stalled.counters().stalls, 1);
        // If nothing waited (the leader is gone), it suspects the leader right after the
        // grace, not a whole leader timeout later.
        out.clear();
        silent.tick(resumed_us, &mut out);
        assert!(
            !out.iter()
                .any(|action| matches!(action, Action::PreVote { .. }))
        );
        let grace_us = STALL_GRACE_HEARTBEATS * silent.config().heartbeat_interval_us;
        let at = first_pre_vote(&mut silent, resumed_us, 5_000, resumed_us + 1_000_000)
            .expect("a silent leader is suspected after the grace");
        assert!(
            at - resumed_us >= grace_us && at - resumed_us <= grace_us + 5_000,
            "{}",
            at - resumed_us
        );
    }

    #[test]
    fn a_follower_that_did_not_run_grants_no_pre_vote_on_that_silence() {
        let (mut stalled, heard_us) = follower_hearing_its_leader();
        let resumed_us = heard_us + 1_000_000;
        let mut out = actions();
        stalled.tick(resumed_us, &mut out);
        assert_eq!(stalled.counters().stalls, 1);
        let granted = |replica: &mut Replica, now_us: u64| {
            let mut out = actions();
            replica.on_pre_vote(now_us, 2, 1, &mut out);
            out.iter()
                .any(|action| matches!(action, Action::PreVoteReply { granted: true, .. }))
        };
        // A peer cut off from the leader asks right after the stall: refused, as the
        // leader's messages may be waiting unread.
        assert!(!granted(&mut stalled, resumed_us + 1_000));
        // Silent for a whole leader timeout after the stall: granted.
        let timeout_us = stalled.config().leader_timeout_us_min;
        assert!(granted(&mut stalled, resumed_us + timeout_us));
    }

    #[test]
    fn a_follower_that_keeps_stalling_still_suspects_a_dead_leader() {
        let (mut follower, heard_us) = follower_hearing_its_leader();
        // Every tick half a second late: each is a stall, and the leader is never heard.
        let at = first_pre_vote(
            &mut follower,
            heard_us,
            500_000,
            heard_us + 2 * STALL_DEFER_US_MAX,
        )
        .expect("a dead leader is suspected despite the stalls");
        assert!(follower.counters().stalls >= 2);
        assert!(
            at - heard_us <= STALL_DEFER_US_MAX + 500_000,
            "suspected only after {} µs",
            at - heard_us
        );
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
        // It counts once the leader's own copy is durable (with view change the Prepare
        // leaves before the leader's write, so a follower may well be faster).
        leader.on_durable(30, 2, &mut out);
        assert_eq!(leader.commit_max(), 1, "op 1: the follower and the leader");
        leader.on_prepare_ok(40, 1, 0, 2, 222, 0);
        assert_eq!(leader.commit_max(), 2);
        assert_eq!(leader.apply_limit(), 2);
        // Fixed view: a Prepare leaves once durable here, so the sample starts there.
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
            follower.on_prepare(0, 0, 0, 1, 0, false, 0, &mut out),
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
            follower.on_prepare(0, 0, 1, 1, 0, false, 1, &mut out),
            PrepareDisposition::Ignore
        );
        assert_eq!(
            follower.on_prepare(0, 2, 0, 1, 0, false, 0, &mut out),
            PrepareDisposition::Ignore
        );
        follower.on_commit(0, 2, 0, 5, 5, &mut out);
        assert_eq!(follower.commit_max(), 0);
    }

    /// A repair is judged by the log it says it was read from, not by what its sender's
    /// latest Ping said: a Ping sent after an old repair can overtake it in the driver.
    #[test]
    fn a_repair_from_another_log_is_refused_whatever_its_senders_pings_said() {
        let mut config = ReplicaConfig::new(0, 2, 3, 7).unwrap();
        config.view_change = true;
        config.view = 1;
        // Replica 2 in view 1 (led by replica 1), its log that view's.
        let mut follower = Replica::new(config, 0, 0, 0).unwrap();
        let mut out = actions();
        // Replica 0 reports it holds view 1's log.
        follower.on_ping(0, 10, 0, 0, 1, &mut out);
        out.clear();
        assert_eq!(
            follower.on_prepare(20, 0, 1, 1, 0, true, 0, &mut out),
            PrepareDisposition::Ignore,
            "read from view 0's log"
        );
        assert_eq!(
            follower.on_prepare(20, 0, 1, 1, 0, true, 1, &mut out),
            PrepareDisposition::Append
        );
    }

    #[test]
    fn gap_asks_the_fastest_connected_peer_and_retries_on_timeout() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_connection(2, true);
        // Peer 2 answers pings fast, the leader slowly.
        follower.on_pong(1_000, 0, 0, 0, 0, 0, 0, &mut out);
        assert!(out.is_empty(), "nothing known to be missing yet");
        // Peer 2 answers pings fast and reports op 50 durable (a prefix of the leader's log).
        let now = 2_000;
        follower.on_pong(now, 2, 0, now - 100, 50, 0, 0, &mut out);
        let Some(Action::RequestPrepare { to, op_min, op_max }) = out.pop() else {
            panic!("expected a repair request, got {out:?}");
        };
        assert_eq!((to, op_min, op_max), (2, 1, 50));
        let now = now + 1;
        // A second gap while one is outstanding asks nothing more.
        assert_eq!(
            follower.on_prepare(now, 0, 0, 41, 30, false, 0, &mut out),
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

    /// Recovering (`docs/protocol.md` 8): a follower whose journal lost ops it may have
    /// acknowledged sends no PrepareOk (even when a heartbeat asks for one) until it holds
    /// its promise again; it repairs from peers meanwhile.
    #[test]
    fn a_recovering_follower_acknowledges_nothing_until_it_holds_its_promise() {
        let config = ReplicaConfig::new(0, 1, 3, 7).unwrap();
        let mut follower = Replica::new(config, 4, 0x44, 0).unwrap();
        follower.recovering_start(10);
        assert_eq!(follower.recovering(), Some(10));
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_commit(1_000, 0, 0, 4, 12, &mut out);
        assert!(
            !out.iter().any(|a| matches!(a, Action::PrepareOk { .. })),
            "{out:?}"
        );
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::RequestPrepare {
                    to: 0,
                    op_min: 5,
                    ..
                }
            )),
            "{out:?}"
        );
        out.clear();
        for op in 5..=9 {
            assert_eq!(
                follower.on_prepare(2_000, 0, 0, op, 4, true, 0, &mut out),
                PrepareDisposition::Append
            );
            follower.on_staged(2_000, op, u128::from(op));
        }
        follower.on_durable(2_000, 9, &mut out);
        assert!(!out.iter().any(|a| matches!(a, Action::PrepareOk { .. })));
        assert_eq!(follower.recovering(), Some(10));
        follower.on_prepare(3_000, 0, 0, 10, 4, true, 0, &mut out);
        follower.on_staged(3_000, 10, 10);
        follower.on_durable(3_000, 10, &mut out);
        assert_eq!(follower.recovering(), None);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::PrepareOk { op: 10, .. })),
            "{out:?}"
        );
    }

    /// A fixed-view leader that lost ops repairs from its followers and does not lead
    /// meanwhile; once every follower reported a head it has reached, what it lost above
    /// that was held by no one else (never committed), and it leads again.
    #[test]
    fn a_recovering_fixed_view_leader_repairs_from_followers_then_leads() {
        let config = ReplicaConfig::new(0, 0, 3, 7).unwrap();
        let mut leader = Replica::new(config, 3, 0x33, 0).unwrap();
        leader.recovering_start(8);
        assert!(!leader.is_ready_leader() && !leader.can_seal());
        let mut out = actions();
        leader.on_connection(1, true);
        leader.on_connection(2, true);
        leader.on_pong(1_000, 1, 0, 900, 6, 3, 0, &mut out);
        let Some(Action::RequestPrepare { to, op_min, op_max }) = out.pop() else {
            panic!("expected a repair request, got {out:?}");
        };
        assert_eq!((to, op_min, op_max), (1, 4, 6));
        for op in 4..=6 {
            assert_eq!(
                leader.on_prepare(2_000, 1, 0, op, 0, true, 0, &mut out),
                PrepareDisposition::Append
            );
            leader.on_staged(2_000, op, u128::from(op));
        }
        leader.on_durable(2_000, 6, &mut out);
        assert_eq!(
            leader.recovering(),
            Some(8),
            "replica 2 has not reported yet"
        );
        leader.on_pong(3_000, 2, 0, 2_900, 5, 3, 0, &mut out);
        assert_eq!(leader.recovering(), None);
        assert!(
            !leader.is_ready_leader(),
            "it applies what it repaired first"
        );
        for op in 4..=6 {
            leader.commit_max = op;
            leader.on_applied(op);
        }
        assert!(leader.is_ready_leader());
    }

    /// Replica 1 of 3 with view change, formatted with `--replace` (an empty journal) and
    /// started at `now_us`, and its configuration.
    fn replaced_follower(now_us: u64) -> (Replica, ReplicaConfig) {
        let mut config = ReplicaConfig::new(0, 1, 3, 7).unwrap();
        config.view_change = true;
        let mut replica =
            Replica::restart(config, Persisted::default(), 0, 0, 0, &[], now_us).unwrap();
        replica.replacing_start(now_us);
        (replica, config)
    }

    /// The floor is the highest view `f + 1` others reported in Pongs to this start's Pings;
    /// a StartView below it is not installed, one at or above it is.
    #[test]
    fn a_replaced_replica_installs_no_view_below_its_floor() {
        let (mut replica, config) = replaced_follower(1_000);
        let mut out = actions();
        assert!(replica.replacing());
        assert_eq!(replica.status(), Status::ViewChange);
        // A Pong answering a Ping of an earlier start does not count.
        replica.on_pong(2_000, 0, 9, 500, 0, 0, 0, &mut out);
        replica.on_pong(2_000, 2, 4, 1_500, 0, 0, 0, &mut out);
        assert_eq!(replica.replacing_view_floor(), None);
        replica.on_pong(2_100, 0, 5, 1_600, 0, 0, 0, &mut out);
        assert_eq!(replica.replacing_view_floor(), Some(5));
        // A view below 5 is too old a source: the lost incarnation may have voted in 5.
        let old = (1..5)
            .rev()
            .find(|view| config.leader_of(*view) != 1)
            .unwrap();
        replica.on_start_view(3_000, config.leader_of(old), old, 0, 0, 1, &[], &mut out);
        assert!(replica.replacing());
        assert_eq!(replica.view(), 0);
        let view = (5..).find(|view| config.leader_of(*view) != 1).unwrap();
        replica.on_start_view(3_000, config.leader_of(view), view, 0, 0, 1, &[], &mut out);
        assert!(!replica.replacing());
        assert_eq!((replica.view(), replica.log_view()), (view, view));
        assert_eq!(replica.status(), Status::Normal);
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
                0,
                10_000 - 100 * u64::from(peer + 1),
                100,
                0,
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
                follower.on_prepare(10, 0, 0, op, 3, true, 0, &mut out),
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
    fn a_follower_behind_what_peers_retain_syncs_to_a_checkpoint_and_repairs_after_it() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_connection(2, true);
        follower.on_commit(0, 0, 0, 500, 500, &mut out);
        let Some(Action::RequestPrepare { to, op_min, .. }) = out.pop() else {
            panic!("repair expected");
        };
        assert_eq!(op_min, 1);
        // Answers for another op, from a checkpoint not above the head, or about ops the
        // peer still has start nothing.
        follower.on_not_retained(to, 2, 100, 300, &mut out);
        follower.on_not_retained(to, 1, 1, 300, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(follower.state_sync(), None);
        follower.on_not_retained(2, 1, 257, 256, &mut out);
        assert_eq!(
            out.pop(),
            Some(Action::StateSync {
                from: 2,
                checkpoint_op: 256
            })
        );
        assert_eq!(follower.state_sync(), Some(256));
        assert_eq!(follower.counters().state_syncs, 1);
        // No repair while the sync runs; a second NotRetained starts nothing.
        follower.tick(10_000_000, &mut out);
        follower.on_not_retained(0, 1, 257, 256, &mut out);
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::RequestPrepare { .. } | Action::StateSync { .. })),
            "{out:?}"
        );
        out.clear();
        follower.on_state_synced(10_000_001, 256, 0xC0FFEE, &mut out);
        assert_eq!(follower.state_sync(), None);
        assert_eq!(follower.apply_limit(), 256);
        assert!(out.contains(&Action::PrepareOk {
            to: 0,
            op: 256,
            checksum: 0xC0FFEE,
            commit_min: 256
        }));
        let repair = out.iter().find_map(|a| match a {
            Action::RequestPrepare { op_min, .. } => Some(*op_min),
            _ => None,
        });
        assert_eq!(repair, Some(257), "repair resumes after the checkpoint");
        // The next entry must chain to the checkpoint's checksum.
        assert_eq!(
            follower.on_prepare(10_000_002, 0, 0, 257, 500, true, 0, &mut out),
            PrepareDisposition::Append
        );
    }

    /// A replaced replica installing a log whose early ops its peers no longer retain syncs
    /// to a checkpoint within the log's known committed prefix (never above it), repairs
    /// the rest, and leaves replacing when the install completes.
    #[test]
    fn a_replaced_replica_syncs_to_a_checkpoint_while_it_installs() {
        let (mut replica, config) = replaced_follower(0);
        let mut out = actions();
        let view = (2..).find(|view| config.leader_of(*view) != 1).unwrap();
        let leader = config.leader_of(view);
        for peer in [0, 2] {
            replica.on_connection(peer, true);
            replica.on_pong(1_000, peer, view, 500, 300, 290, view, &mut out);
        }
        assert_eq!(replica.replacing_view_floor(), Some(view));
        out.clear();
        replica.on_start_view(2_000, leader, view, 300, 290, 300, &[0xABC], &mut out);
        let Some(Action::RequestPrepare { to, op_min: 1, .. }) = out.pop() else {
            panic!("repair from op 1 expected: {out:?}");
        };
        assert_eq!(to, leader);
        // A checkpoint above what the log being installed is known to have committed may
        // not be a prefix of it.
        replica.on_not_retained(leader, 1, 296, 295, &mut out);
        assert_eq!(replica.state_sync(), None);
        replica.on_not_retained(leader, 1, 257, 256, &mut out);
        assert_eq!(replica.state_sync(), Some(256));
        out.clear();
        replica.on_state_synced(3_000, 256, 0xC0FFEE, &mut out);
        assert!(replica.replacing(), "the install goes on");
        let repair = out.iter().find_map(|a| match a {
            Action::RequestPrepare { op_min, .. } => Some(*op_min),
            _ => None,
        });
        assert_eq!(repair, Some(257), "repair resumes after the checkpoint");
        for op in 257..=300 {
            assert_eq!(
                replica.on_prepare(4_000, leader, view, op, 290, true, view, &mut out),
                PrepareDisposition::Append
            );
            let checksum = if op == 300 { 0xABC } else { u128::from(op) };
            replica.on_staged(4_000, op, checksum);
        }
        out.clear();
        replica.on_durable(4_000, 300, &mut out);
        assert!(!replica.replacing());
        assert_eq!(
            (replica.log_view(), replica.status()),
            (view, Status::Normal)
        );
        assert!(out.contains(&Action::PrepareOk {
            to: leader,
            op: 300,
            checksum: 0xABC,
            commit_min: 256
        }));
    }

    #[test]
    fn a_failed_state_sync_lets_repair_try_again() {
        let mut follower = replica(0, 1, 3);
        let mut out = actions();
        follower.on_connection(0, true);
        follower.on_commit(0, 0, 0, 50, 50, &mut out);
        out.clear();
        follower.on_not_retained(0, 1, 33, 32, &mut out);
        assert_eq!(follower.state_sync(), Some(32));
        out.clear();
        follower.on_state_sync_failed(1, &mut out);
        assert_eq!(follower.state_sync(), None);
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::RequestPrepare { op_min: 1, .. })),
            "{out:?}"
        );
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

/// A tiny deterministic cluster for view-change tests: instant disks, a FIFO network that
/// can cut replicas off, and the driver rules of `shards::replication` (durable before a
/// Prepare is sent; entries appended only when they chain and match `expected_checksum`).
#[cfg(test)]
mod cluster_tests {
    use super::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Message {
        Prepare {
            view: u64,
            op: u64,
            commit: u64,
            checksum: u128,
            previous: u128,
            repair: bool,
            log_view: u64,
        },
        PrepareOk {
            view: u64,
            op: u64,
            checksum: u128,
            commit_min: u64,
        },
        Commit {
            view: u64,
            commit: u64,
            op_head: u64,
        },
        Ping {
            time_us: u64,
            op_durable: u64,
            commit_min: u64,
            log_view: u64,
        },
        Pong {
            view: u64,
            time_us: u64,
            op_durable: u64,
            commit_min: u64,
            log_view: u64,
        },
        RequestPrepare {
            op_min: u64,
            op_max: u64,
        },
        PreVote {
            view_target: u64,
        },
        PreVoteReply {
            view_target: u64,
            granted: bool,
        },
        StartViewChange {
            view: u64,
        },
        DoViewChange {
            view: u64,
            log_view: u64,
            op_durable: u64,
            commit_max: u64,
            op_min: u64,
            checksums: Vec<u128>,
        },
        StartView {
            view: u64,
            op_head: u64,
            commit_max: u64,
            op_min: u64,
            checksums: Vec<u128>,
        },
        RequestStartView {
            view: u64,
        },
    }

    struct Node {
        replica: Replica,
        /// (checksum, previous) of ops 1..; everything here is durable (instant disk).
        log: Vec<(u128, u128)>,
        persisted: Persisted,
        applied: Vec<u128>,
        up: bool,
    }

    struct Cluster {
        nodes: Vec<Node>,
        network: VecDeque<(u8, u8, Message)>,
        now_us: u64,
        /// Links cut: (from, to).
        cut: Vec<(u8, u8)>,
    }

    fn entry_checksum(previous: u128, op: u64, payload: u64) -> u128 {
        crate::journal::journal_checksum(
            &[
                previous.to_le_bytes().as_slice(),
                &op.to_le_bytes(),
                &payload.to_le_bytes(),
            ]
            .concat(),
        )
    }

    impl Cluster {
        fn new(count: u8) -> Self {
            let nodes = (0..count)
                .map(|replica| {
                    let mut config =
                        ReplicaConfig::new(0, replica, count, 11 + u64::from(replica)).unwrap();
                    config.view_change = true;
                    Node {
                        replica: Replica::new(config, 0, 0, 0).unwrap(),
                        log: Vec::new(),
                        persisted: Persisted::default(),
                        applied: Vec::new(),
                        up: true,
                    }
                })
                .collect();
            Self {
                nodes,
                network: VecDeque::new(),
                now_us: 0,
                cut: Vec::new(),
            }
        }

        fn execute(&mut self, node: u8, actions: Vec<Action>) {
            for action in actions {
                let n = usize::from(node);
                let sender_view = self.nodes[n].replica.view();
                let send = |to: u8, message: Message, network: &mut VecDeque<(u8, u8, Message)>| {
                    network.push_back((node, to, message));
                };
                match action {
                    Action::PrepareOk {
                        to,
                        op,
                        checksum,
                        commit_min,
                    } => {
                        let view = self.nodes[n].replica.view();
                        send(
                            to,
                            Message::PrepareOk {
                                view,
                                op,
                                checksum,
                                commit_min,
                            },
                            &mut self.network,
                        );
                    }
                    Action::Commit {
                        to,
                        commit,
                        op_head,
                    } => {
                        let view = self.nodes[n].replica.view();
                        send(
                            to,
                            Message::Commit {
                                view,
                                commit,
                                op_head,
                            },
                            &mut self.network,
                        );
                    }
                    Action::Ping {
                        to,
                        time_us,
                        op_durable,
                        commit_min,
                        log_view,
                    } => send(
                        to,
                        Message::Ping {
                            time_us,
                            op_durable,
                            commit_min,
                            log_view,
                        },
                        &mut self.network,
                    ),
                    Action::Pong {
                        to,
                        time_us,
                        op_durable,
                        commit_min,
                        log_view,
                    } => send(
                        to,
                        Message::Pong {
                            view: sender_view,
                            time_us,
                            op_durable,
                            commit_min,
                            log_view,
                        },
                        &mut self.network,
                    ),
                    Action::RequestPrepare { to, op_min, op_max } => send(
                        to,
                        Message::RequestPrepare { op_min, op_max },
                        &mut self.network,
                    ),
                    Action::ServeRepair { to, op_min, op_max } => {
                        let view = self.nodes[n].replica.view();
                        let log_view = self.nodes[n].replica.log_view();
                        let commit = self.nodes[n].replica.commit_max();
                        for op in op_min..=op_max.min(self.nodes[n].log.len() as u64) {
                            let (checksum, previous) = self.nodes[n].log[op as usize - 1];
                            send(
                                to,
                                Message::Prepare {
                                    view,
                                    op,
                                    commit,
                                    checksum,
                                    previous,
                                    repair: true,
                                    log_view,
                                },
                                &mut self.network,
                            );
                        }
                    }
                    Action::StateSync { .. } => {
                        unreachable!("these journals retain every op: no NotRetained")
                    }
                    Action::Persist { view, log_view, .. } => {
                        if std::env::var("TRACE").is_ok() {
                            eprintln!(
                                "t={} replica {node} persist view {view} log_view {log_view} (log {})",
                                self.now_us,
                                self.nodes[n].log.len()
                            );
                        }
                        self.nodes[n].persisted = Persisted { view, log_view };
                    }
                    Action::Truncate { op } => {
                        if std::env::var("TRACE").is_ok() {
                            eprintln!(
                                "t={} replica {node} truncate to {op} (log {})",
                                self.now_us,
                                self.nodes[n].log.len()
                            );
                        }
                        let node = &mut self.nodes[n];
                        assert!(
                            op as usize >= node.applied.len(),
                            "applied ops are never truncated"
                        );
                        node.log.truncate(op as usize);
                        let head = node.log.last().map_or(0, |e| e.0);
                        node.replica.on_truncated(op, head);
                    }
                    Action::PreVote { to, view_target } => {
                        send(to, Message::PreVote { view_target }, &mut self.network)
                    }
                    Action::PreVoteReply {
                        to,
                        view_target,
                        granted,
                    } => send(
                        to,
                        Message::PreVoteReply {
                            view_target,
                            granted,
                        },
                        &mut self.network,
                    ),
                    Action::StartViewChange { to, view } => {
                        send(to, Message::StartViewChange { view }, &mut self.network)
                    }
                    Action::DoViewChange {
                        to,
                        view,
                        log_view,
                        op_durable,
                        commit_max,
                        headers_op_min,
                    } => {
                        let replica = &self.nodes[n].replica;
                        let checksums = (headers_op_min..=op_durable)
                            .map(|op| replica.checksum_at(op).unwrap())
                            .collect();
                        send(
                            to,
                            Message::DoViewChange {
                                view,
                                log_view,
                                op_durable,
                                commit_max,
                                op_min: headers_op_min,
                                checksums,
                            },
                            &mut self.network,
                        );
                    }
                    Action::StartView {
                        to,
                        view,
                        op_head,
                        commit_max,
                        headers_op_min,
                    } => {
                        let replica = &self.nodes[n].replica;
                        let checksums = (headers_op_min..=op_head)
                            .map(|op| replica.checksum_at(op).unwrap())
                            .collect();
                        send(
                            to,
                            Message::StartView {
                                view,
                                op_head,
                                commit_max,
                                op_min: headers_op_min,
                                checksums,
                            },
                            &mut self.network,
                        );
                    }
                    Action::RequestStartView { to, view } => {
                        send(to, Message::RequestStartView { view }, &mut self.network)
                    }
                }
            }
            self.apply(node);
        }

        fn apply(&mut self, node: u8) {
            let node = &mut self.nodes[usize::from(node)];
            while node.replica.commit_min() < node.replica.apply_limit() {
                let op = node.replica.commit_min() + 1;
                node.applied.push(node.log[op as usize - 1].0);
                node.replica.on_applied(op);
            }
        }

        /// The leader seals one op (durable at once), then sends it to every follower.
        fn seal(&mut self, leader: u8, payload: u64) -> bool {
            let n = usize::from(leader);
            if !self.nodes[n].up || !self.nodes[n].replica.can_seal() {
                return false;
            }
            let mut actions = Vec::with_capacity(ACTIONS_MAX);
            let node = &mut self.nodes[n];
            let op = node.log.len() as u64 + 1;
            let previous = node.log.last().map_or(0, |e| e.0);
            let checksum = entry_checksum(previous, op, payload);
            node.log.push((checksum, previous));
            node.replica.on_staged(self.now_us, op, checksum);
            node.replica.on_durable(self.now_us, op, &mut actions);
            let view = node.replica.view();
            let commit = node.replica.commit_max();
            for peer in node.replica.others() {
                node.replica.note_sent(peer, self.now_us);
                self.network.push_back((
                    leader,
                    peer,
                    Message::Prepare {
                        view,
                        op,
                        commit,
                        checksum,
                        previous,
                        repair: false,
                        log_view: view,
                    },
                ));
            }
            self.execute(leader, actions);
            true
        }

        fn deliver(&mut self, from: u8, to: u8, message: Message) {
            let now = self.now_us;
            let n = usize::from(to);
            let mut actions = Vec::with_capacity(ACTIONS_MAX);
            let node = &mut self.nodes[n];
            let r = &mut node.replica;
            match message {
                Message::Prepare {
                    view,
                    op,
                    commit,
                    checksum,
                    previous,
                    repair,
                    log_view,
                } => {
                    if r.on_prepare(now, from, view, op, commit, repair, log_view, &mut actions)
                        == PrepareDisposition::Append
                    {
                        let head = node.log.last().map_or(0, |e| e.0);
                        let expected_ok = r.expected_checksum(op).is_none_or(|c| c == checksum);
                        if previous == head && expected_ok {
                            if std::env::var("TRACE").is_ok() {
                                eprintln!(
                                    "t={now} replica {to} append {op} from {from} (view {view} repair {repair})"
                                );
                            }
                            node.log.push((checksum, previous));
                            r.on_staged(now, op, checksum);
                            r.on_durable(now, op, &mut actions);
                        }
                    }
                }
                Message::PrepareOk {
                    view,
                    op,
                    checksum,
                    commit_min,
                } => {
                    r.on_prepare_ok(now, from, view, op, checksum, commit_min);
                }
                Message::Commit {
                    view,
                    commit,
                    op_head,
                } => r.on_commit(now, from, view, commit, op_head, &mut actions),
                Message::Ping {
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                } => r.on_ping(
                    from,
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                    &mut actions,
                ),
                Message::Pong {
                    view,
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                } => r.on_pong(
                    now,
                    from,
                    view,
                    time_us,
                    op_durable,
                    commit_min,
                    log_view,
                    &mut actions,
                ),
                Message::RequestPrepare { op_min, op_max } => {
                    r.on_request_prepare(from, op_min, op_max, &mut actions)
                }
                Message::PreVote { view_target } => {
                    r.on_pre_vote(now, from, view_target, &mut actions)
                }
                Message::PreVoteReply {
                    view_target,
                    granted,
                } => r.on_pre_vote_reply(now, from, view_target, granted, &mut actions),
                Message::StartViewChange { view } => {
                    r.on_start_view_change(now, from, view, &mut actions)
                }
                Message::DoViewChange {
                    view,
                    log_view,
                    op_durable,
                    commit_max,
                    op_min,
                    checksums,
                } => {
                    r.on_do_view_change(
                        now,
                        from,
                        view,
                        log_view,
                        op_durable,
                        commit_max,
                        op_min,
                        &checksums,
                        &mut actions,
                    );
                }
                Message::StartView {
                    view,
                    op_head,
                    commit_max,
                    op_min,
                    checksums,
                } => {
                    r.on_start_view(
                        now,
                        from,
                        view,
                        op_head,
                        commit_max,
                        op_min,
                        &checksums,
                        &mut actions,
                    );
                }
                Message::RequestStartView { view } => {
                    r.on_request_start_view(now, from, view, &mut actions)
                }
            }
            self.execute(to, actions);
        }

        /// Delivers everything in flight, then advances time by `step_us` and ticks.
        fn run(&mut self, duration_us: u64, step_us: u64) {
            let end = self.now_us + duration_us;
            while self.now_us < end {
                let mut budget = 100_000;
                while let Some((from, to, message)) = self.network.pop_front() {
                    budget -= 1;
                    if budget < 20 {
                        eprintln!("storm: {from} -> {to}: {message:?}");
                    }
                    if budget == 0 {
                        self.dump();
                        panic!("message storm");
                    }
                    let linked = self.nodes[usize::from(from)].up
                        && self.nodes[usize::from(to)].up
                        && !self.cut.contains(&(from, to));
                    if linked {
                        self.deliver(from, to, message);
                    }
                }
                self.now_us += step_us;
                for node in 0..self.nodes.len() as u8 {
                    if self.nodes[usize::from(node)].up {
                        let mut actions = Vec::with_capacity(ACTIONS_MAX);
                        let now = self.now_us;
                        self.nodes[usize::from(node)]
                            .replica
                            .tick(now, &mut actions);
                        self.execute(node, actions);
                    }
                }
                for node in 0..self.nodes.len() as u8 {
                    for connected in 0..self.nodes.len() as u8 {
                        if connected != node {
                            let up = self.nodes[usize::from(connected)].up
                                && !self.cut.contains(&(node, connected));
                            self.nodes[usize::from(node)]
                                .replica
                                .on_connection(connected, up);
                        }
                    }
                }
            }
        }

        fn leader(&self) -> Option<u8> {
            let view = self
                .nodes
                .iter()
                .filter(|n| n.up)
                .map(|n| n.replica.view())
                .max()?;
            let leader = self.nodes[0].replica.config().leader_of(view);
            let node = &self.nodes[usize::from(leader)];
            (node.up && node.replica.view() == view && node.replica.is_ready_leader())
                .then_some(leader)
        }

        /// Restarts `node` from its log and persisted views, replaying nothing.
        fn restart(&mut self, node: u8) {
            let n = usize::from(node);
            let config = *self.nodes[n].replica.config();
            let log = &self.nodes[n].log;
            let op = log.len() as u64;
            let head = log.last().map_or(0, |e| e.0);
            let recent: Vec<(u64, u128)> = log
                .iter()
                .enumerate()
                .map(|(i, e)| (i as u64 + 1, e.0))
                .collect();
            let applied = self.nodes[n].applied.len() as u64;
            self.nodes[n].replica = Replica::restart(
                config,
                self.nodes[n].persisted,
                op,
                head,
                applied,
                &recent,
                self.now_us,
            )
            .unwrap();
            self.nodes[n].up = true;
        }

        /// `node` lost its disk and is formatted again to replace itself: it starts from
        /// nothing, replacing (`percore format --replace`).
        fn replace(&mut self, node: u8) {
            let n = usize::from(node);
            self.nodes[n].log.clear();
            self.nodes[n].applied.clear();
            self.nodes[n].persisted = Persisted::default();
            self.restart(node);
            let now = self.now_us;
            self.nodes[n].replica.replacing_start(now);
        }

        fn dump(&self) {
            for (index, node) in self.nodes.iter().enumerate() {
                let r = &node.replica;
                eprintln!(
                    "replica {index}: up {} view {} log_view {} status {:?} head {} durable {} commit_max {} commit_min {} ready {} install {:?} log {} applied {} acks {:?}",
                    node.up,
                    r.view,
                    r.log_view,
                    r.status,
                    r.op_head,
                    r.op_durable,
                    r.commit_max,
                    r.commit_min,
                    r.ready,
                    r.install,
                    node.log.len(),
                    node.applied.len(),
                    r.peers
                        .iter()
                        .take(self.nodes.len())
                        .map(|p| p.ack_op)
                        .collect::<Vec<_>>()
                );
            }
        }

        /// Agreement: every two replicas applied the same checksum at every op both applied,
        /// and each log is chained.
        fn check(&self) {
            for a in &self.nodes {
                for b in &self.nodes {
                    let common = a.applied.len().min(b.applied.len());
                    assert_eq!(
                        a.applied[..common],
                        b.applied[..common],
                        "applied logs diverge"
                    );
                }
                for window in a.log.windows(2) {
                    assert_eq!(window[1].1, window[0].0, "log is not a chain");
                }
            }
        }
    }

    #[test]
    fn a_crashed_leader_is_replaced_and_committed_ops_survive() {
        let mut cluster = Cluster::new(3);
        cluster.run(10_000, 1_000);
        for payload in 0..20 {
            assert!(cluster.seal(0, payload));
            cluster.run(2_000, 1_000);
        }
        let committed = cluster.nodes[0].replica.commit_max();
        assert_eq!(committed, 20);
        cluster.nodes[0].up = false;
        cluster.run(2_000_000, 5_000);
        let leader = cluster.leader().expect("a new leader within 2 s");
        assert_ne!(leader, 0);
        assert_eq!(
            cluster.nodes[usize::from(leader)].replica.view() % 3,
            u64::from(leader)
        );
        for payload in 100..110 {
            assert!(cluster.seal(leader, payload));
            cluster.run(2_000, 1_000);
        }
        cluster.run(100_000, 5_000);
        assert_eq!(cluster.nodes[usize::from(leader)].replica.commit_max(), 30);
        cluster.check();
        // The old leader restarts, learns the new view and catches up.
        cluster.restart(0);
        cluster.run(2_000_000, 5_000);
        cluster.check();
        assert_eq!(cluster.nodes[0].log.len(), 30);
        assert_eq!(cluster.nodes[0].applied.len(), 30);
        assert_eq!(
            cluster.nodes[0].replica.view(),
            cluster.nodes[usize::from(leader)].replica.view()
        );
    }

    /// A replica that lost its disk rebuilds only after it heard the view of `f + 1` others:
    /// with one of them down it acknowledges nothing (so the group cannot commit with it),
    /// and once both answer it installs the current log whole and acknowledges again.
    #[test]
    fn a_replaced_replica_waits_for_f_plus_one_views_then_rebuilds_from_the_leader() {
        let mut cluster = Cluster::new(3);
        cluster.run(10_000, 1_000);
        for payload in 0..10 {
            assert!(cluster.seal(0, payload));
            cluster.run(2_000, 1_000);
        }
        assert_eq!(cluster.nodes[0].replica.commit_max(), 10);
        cluster.nodes[1].up = false;
        cluster.nodes[2].up = false;
        cluster.replace(1);
        cluster.run(1_000_000, 5_000);
        let replaced = &cluster.nodes[1].replica;
        assert!(replaced.replacing());
        assert_eq!(replaced.replacing_view_floor(), None, "replica 2 is down");
        assert!(cluster.nodes[1].log.is_empty(), "nothing installed");
        assert!(cluster.seal(0, 10), "replica 0 still leads view 0");
        cluster.run(200_000, 5_000);
        assert_eq!(
            cluster.nodes[0].replica.commit_max(),
            10,
            "the replaced replica acknowledges nothing yet"
        );
        cluster.restart(2);
        cluster.run(3_000_000, 5_000);
        let leader = cluster.leader().expect("a leader");
        for payload in 20..25 {
            assert!(cluster.seal(leader, payload));
            cluster.run(2_000, 1_000);
        }
        cluster.run(200_000, 5_000);
        cluster.check();
        let head = cluster.nodes[usize::from(leader)].replica.op_head();
        assert_eq!(
            cluster.nodes[usize::from(leader)].replica.commit_max(),
            head
        );
        let replaced = &cluster.nodes[1].replica;
        assert!(!replaced.replacing());
        assert_eq!(replaced.recovering(), None);
        assert_eq!(cluster.nodes[1].log, cluster.nodes[usize::from(leader)].log);
        assert_eq!(cluster.nodes[1].applied.len() as u64, head);
        assert_eq!(replaced.log_view(), replaced.view());
    }

    /// Leader rebalancing: the group's view-0 leader crashes, replica 1 leads view 1, and once
    /// replica 0 is back, connected and caught up for `leader_rebalance_us`, replica 1 hands
    /// the group back through a view change to view 3, the next view replica 0 leads.
    #[test]
    fn a_returned_preferred_leader_gets_its_group_back() {
        const REBALANCE_US: u64 = 500_000;
        let mut cluster = Cluster::new(3);
        let connect = |cluster: &mut Cluster, node: u8| {
            for peer in 0..3 {
                if peer != node {
                    cluster.nodes[usize::from(node)]
                        .replica
                        .on_connection(peer, true);
                }
            }
        };
        for node in 0..3 {
            cluster.nodes[usize::from(node)]
                .replica
                .config
                .leader_rebalance_us = REBALANCE_US;
            connect(&mut cluster, node);
        }
        cluster.run(10_000, 1_000);
        for payload in 0..10 {
            assert!(cluster.seal(0, payload));
            cluster.run(2_000, 1_000);
        }
        cluster.nodes[0].up = false;
        cluster.run(2_000_000, 5_000);
        assert_eq!(
            cluster.leader(),
            Some(1),
            "view 1 of group 0 is led by replica 1"
        );
        for payload in 10..15 {
            assert!(cluster.seal(1, payload));
            cluster.run(2_000, 1_000);
        }
        cluster.restart(0);
        connect(&mut cluster, 0);
        // Rejoining and catching up take a few hundred ms; the handoff waits the rebalance
        // time after that, so the group is still led by replica 1 well before it.
        cluster.run(300_000, 5_000);
        assert_eq!(cluster.leader(), Some(1), "no handoff before the hold time");
        cluster.run(2_000_000, 5_000);
        assert_eq!(
            cluster.leader(),
            Some(0),
            "the group is back with replica 0"
        );
        assert_eq!(cluster.nodes[0].replica.view(), 3);
        assert_eq!(cluster.nodes[1].replica.counters().leader_handoffs, 1);
        for payload in 15..20 {
            assert!(cluster.seal(0, payload));
            cluster.run(2_000, 1_000);
        }
        cluster.run(100_000, 5_000);
        cluster.check();
        for node in &cluster.nodes {
            assert_eq!(node.replica.commit_max(), 20);
        }
        // The preferred leader does not hand its group to anyone.
        cluster.run(2_000_000, 5_000);
        assert_eq!(cluster.leader(), Some(0));
        assert_eq!(cluster.nodes[0].replica.view(), 3);
    }

    #[test]
    fn a_partitioned_leaders_uncommitted_suffix_is_truncated() {
        let mut cluster = Cluster::new(3);
        cluster.run(10_000, 1_000);
        for payload in 0..5 {
            assert!(cluster.seal(0, payload));
            cluster.run(2_000, 1_000);
        }
        // Cut the leader off: its next ops are durable on it alone, never committed.
        cluster.cut = vec![(0, 1), (0, 2), (1, 0), (2, 0)];
        for payload in 50..53 {
            assert!(cluster.seal(0, payload));
        }
        cluster.run(2_000_000, 5_000);
        assert_eq!(cluster.nodes[0].log.len(), 8);
        assert_eq!(
            cluster.nodes[0].replica.commit_max(),
            5,
            "no quorum for 6..=8"
        );
        let leader = cluster.leader().expect("the majority elects a leader");
        assert_ne!(leader, 0);
        for payload in 200..204 {
            assert!(cluster.seal(leader, payload));
            cluster.run(2_000, 1_000);
        }
        // Heal: the old leader hears the new view, truncates 6..=8 and takes the new log.
        cluster.cut.clear();
        cluster.run(2_000_000, 5_000);
        cluster.check();
        let new_log = &cluster.nodes[usize::from(leader)].log;
        assert_eq!(
            cluster.nodes[0].log, *new_log,
            "the divergent suffix was replaced"
        );
        assert_eq!(cluster.nodes[0].applied.len(), 9);
        assert_eq!(cluster.nodes[0].replica.status(), Status::Normal);
    }

    #[test]
    fn a_partitioned_follower_cannot_raise_the_view() {
        let mut cluster = Cluster::new(3);
        cluster.run(10_000, 1_000);
        assert!(cluster.seal(0, 1));
        // Replica 2 is cut off alone: its pre-votes gather no grants.
        cluster.cut = vec![(2, 0), (2, 1), (0, 2), (1, 2)];
        for payload in 2..40 {
            cluster.seal(0, payload);
            cluster.run(50_000, 5_000);
        }
        assert_eq!(cluster.nodes[0].replica.view(), 0);
        assert_eq!(cluster.nodes[1].replica.view(), 0);
        assert_eq!(
            cluster.nodes[2].replica.view(),
            0,
            "pre-vote keeps it from climbing"
        );
        cluster.cut.clear();
        cluster.run(1_000_000, 5_000);
        assert_eq!(cluster.leader(), Some(0), "the leader was never disturbed");
        assert_eq!(
            cluster.nodes[2].applied.len(),
            cluster.nodes[0].applied.len()
        );
        cluster.check();
    }

    /// Random crashes, restarts, one-way link cuts and heals under load, from a seed; then
    /// everything heals and the cluster must converge. Agreement is checked after every
    /// step; every op ever committed must be applied, with the same checksum, everywhere.
    #[test]
    fn random_faults_never_break_agreement_and_heal() {
        if let Ok(seed) = std::env::var("SEED") {
            random_run(seed.parse().unwrap(), 3);
            return;
        }
        for seed in 0..200u64 {
            random_run(seed, 3);
        }
        for seed in 0..50u64 {
            random_run(1_000 + seed, 5);
        }
    }

    fn random_run(seed: u64, count: u8) {
        let mut cluster = Cluster::new(count);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let f = usize::from(count) / 2;
        let mut committed: Vec<u128> = Vec::new();
        cluster.run(10_000, 1_000);
        for step in 0..300u64 {
            match next() % 10 {
                0 => {
                    let node = (next() % u64::from(count)) as usize;
                    let down = cluster.nodes.iter().filter(|n| !n.up).count();
                    if cluster.nodes[node].up && down < f {
                        cluster.nodes[node].up = false;
                        cluster.network.retain(|(from, to, _)| {
                            usize::from(*from) != node && usize::from(*to) != node
                        });
                    }
                }
                1 => {
                    let node = (next() % u64::from(count)) as u8;
                    if !cluster.nodes[usize::from(node)].up {
                        cluster.restart(node);
                    }
                }
                2 => {
                    let from = (next() % u64::from(count)) as u8;
                    let to = (next() % u64::from(count)) as u8;
                    if from != to && cluster.cut.len() < 2 {
                        cluster.cut.push((from, to));
                    }
                }
                3 => cluster.cut.clear(),
                _ => {
                    if let Some(leader) = cluster.leader() {
                        cluster.seal(leader, seed * 1_000_000 + step);
                    }
                }
            }
            cluster.run(20_000 + next() % 200_000, 5_000);
            cluster.check();
            for node in &cluster.nodes {
                let common = committed.len().min(node.applied.len());
                assert_eq!(
                    node.applied[..common],
                    committed[..common],
                    "seed {seed}: applied differs from committed"
                );
                if node.applied.len() > committed.len() {
                    committed = node.applied.clone();
                }
            }
        }
        // Faults stop: everyone up, every link healed.
        cluster.cut.clear();
        for node in 0..count {
            if !cluster.nodes[usize::from(node)].up {
                cluster.restart(node);
            }
        }
        cluster.run(3_000_000, 5_000);
        let leader = cluster
            .leader()
            .unwrap_or_else(|| panic!("seed {seed}: no leader after healing"));
        if !cluster.seal(leader, u64::MAX - seed) {
            cluster.dump();
            panic!("seed {seed}: the leader cannot seal");
        }
        cluster.run(1_000_000, 5_000);
        cluster.check();
        let applied = cluster.nodes[usize::from(leader)].applied.clone();
        assert!(
            applied.len() > committed.len(),
            "seed {seed}: the new op did not commit"
        );
        assert_eq!(
            applied[..committed.len()],
            committed[..],
            "seed {seed}: a committed op was lost"
        );
        for (index, node) in cluster.nodes.iter().enumerate() {
            assert_eq!(
                node.applied, applied,
                "seed {seed}: replica {index} did not converge"
            );
        }
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    /// A journal that a state sync started at a checkpoint holds no entry for it: the
    /// runtime's recent checksums lack the head. The core still knows it after staging the
    /// next op, so its StartView and DoViewChange can name it (simulator `--sync on`, seed
    /// 92 with 5 replicas).
    #[test]
    fn a_replica_restarted_at_a_checkpoint_keeps_the_checkpoints_checksum() {
        let mut config = ReplicaConfig::new(0, 1, 3, 5).unwrap();
        config.view_change = true;
        let mut replica =
            Replica::restart(config, Persisted::default(), 64, 0xAB, 64, &[], 0).unwrap();
        replica.on_staged(0, 65, 0xCD);
        assert_eq!(replica.checksum_at(64), Some(0xAB));
        assert_eq!(replica.checksum_at(65), Some(0xCD));
    }

    /// With a pipeline of 1 the ring holds two slots: ops staged past the durable head
    /// overwrite its slot. The durable head is still known (simulator seed 4019 with
    /// `--pipeline 1`: a DoViewChange went out with no checksum at all).
    #[test]
    fn the_durable_head_is_known_after_a_small_pipeline_overwrote_its_slot() {
        let mut config = ReplicaConfig::new(0, 2, 3, 5).unwrap();
        config.view_change = true;
        config.pipeline_prepares_max = 1;
        let recent: Vec<(u64, u128)> = (39..=40u64).map(|op| (op, u128::from(op))).collect();
        let mut replica =
            Replica::restart(config, Persisted::default(), 40, 40, 40, &recent, 0).unwrap();
        for op in 41..=43u64 {
            replica.on_staged(0, op, u128::from(op));
        }
        assert_eq!(replica.op_durable(), 40);
        assert_eq!(replica.checksum_at(40), Some(40));
        assert_eq!(replica.checksum_at(41), None, "overwritten by op 43");
    }

    /// The log a new leader's DoViewChange quorum selected runs far past its own, and the
    /// peer holding it no longer keeps the ops in between: the leader syncs to the peer's
    /// checkpoint (only one within the selected log's known committed prefix), repairs the
    /// rest and starts its view. Once normal it syncs no more.
    #[test]
    fn a_new_leader_behind_what_its_peers_retain_syncs_while_it_installs() {
        let mut config = ReplicaConfig::new(0, 1, 3, 5).unwrap();
        config.view_change = true;
        let recent: Vec<(u64, u128)> = (1..=20u64).map(|op| (op, u128::from(op))).collect();
        let mut leader =
            Replica::restart(config, Persisted::default(), 20, 20, 20, &recent, 0).unwrap();
        let view = (1..).find(|view| config.leader_of(*view) == 1).unwrap();
        let mut out = Vec::with_capacity(ACTIONS_MAX);
        let now_us = 10 * config.leader_timeout_us_max;
        for peer in [0, 2] {
            leader.on_connection(peer, true);
            leader.on_start_view_change(now_us, peer, view, &mut out);
        }
        assert_eq!(leader.status(), Status::ViewChange);
        // Replica 0 holds a log of view `view - 1` up to op 300, committed to 290.
        let headers: Vec<u128> = (297..=300u64).map(u128::from).collect();
        out.clear();
        leader.on_do_view_change(now_us, 0, view, view - 1, 300, 290, 297, &headers, &mut out);
        let repair = out.iter().find_map(|action| match action {
            Action::RequestPrepare { to, op_min, .. } => Some((*to, *op_min)),
            _ => None,
        });
        assert_eq!(repair, Some((0, 21)), "{out:?}");
        // A checkpoint past the selected log's known commit number may not be its prefix.
        leader.on_not_retained(0, 21, 296, 295, &mut out);
        assert_eq!(leader.state_sync(), None);
        out.clear();
        leader.on_not_retained(0, 21, 257, 256, &mut out);
        assert_eq!(leader.state_sync(), Some(256));
        assert!(out.contains(&Action::StateSync {
            from: 0,
            checkpoint_op: 256
        }));
        out.clear();
        leader.on_state_synced(now_us + 1_000, 256, 256, &mut out);
        let repair = out.iter().find_map(|action| match action {
            Action::RequestPrepare { op_min, .. } => Some(*op_min),
            _ => None,
        });
        assert_eq!(repair, Some(257), "repair resumes after the checkpoint");
        assert_eq!(leader.status(), Status::ViewChange);
        for op in 257..=300 {
            assert_eq!(
                leader.on_prepare(now_us + 2_000, 0, view, op, 290, true, view - 1, &mut out),
                PrepareDisposition::Append
            );
            leader.on_staged(now_us + 2_000, op, u128::from(op));
        }
        out.clear();
        leader.on_durable(now_us + 3_000, 300, &mut out);
        assert_eq!(
            (leader.status(), leader.log_view(), leader.commit_min()),
            (Status::Normal, view, 256)
        );
        for peer in [0, 2] {
            assert!(
                out.iter()
                    .any(|action| matches!(action, Action::StartView { to, .. } if *to == peer)),
                "{out:?}"
            );
        }
        // A normal leader holds its view's whole log: nothing to sync.
        out.clear();
        leader.on_not_retained(0, 301, 400, 399, &mut out);
        assert_eq!(leader.state_sync(), None);
    }

    #[test]
    fn a_restarted_leader_installs_the_new_view_keeping_the_common_prefix() {
        let mut config = ReplicaConfig::new(0, 0, 3, 5).unwrap();
        config.view_change = true;
        let checksum =
            |op: u64, fork: u64| u128::from(op) * 1_000 + u128::from(fork * u64::from(op > 60));
        let recent: Vec<(u64, u128)> = (1..=63).map(|op| (op, checksum(op, 1))).collect();
        let mut replica = Replica::restart(
            config,
            Persisted::default(),
            63,
            checksum(63, 1),
            0,
            &recent,
            0,
        )
        .unwrap();
        let mut actions = Vec::with_capacity(ACTIONS_MAX);
        let headers: Vec<u128> = (1..=90).map(|op| checksum(op, 2)).collect();
        replica.on_start_view(1_000, 1, 1, 90, 60, 1, &headers, &mut actions);
        assert!(
            actions.contains(&Action::Truncate { op: 60 }),
            "{actions:?}"
        );
        assert_eq!(replica.op_head(), 60);
    }

    /// Entries below the checksums a StartView carries are kept, not cut: they may be
    /// committed entries this replica acknowledged. What it stages above them must chain
    /// onto them; an entry that does not (`on_chain_mismatch`) cuts the head one op at a
    /// time, never below `commit_min`. Commit numbers heard meanwhile wait for the install.
    #[test]
    fn entries_below_the_start_views_checksums_are_kept_until_the_chain_says_otherwise() {
        let mut config = ReplicaConfig::new(0, 0, 3, 5).unwrap();
        config.view_change = true;
        config.pipeline_prepares_max = 4;
        let checksum =
            |op: u64, fork: u64| u128::from(op) * 1_000 + u128::from(fork * u64::from(op > 60));
        let recent: Vec<(u64, u128)> = (56..=63).map(|op| (op, checksum(op, 1))).collect();
        let mut replica = Replica::restart(
            config,
            Persisted::default(),
            63,
            checksum(63, 1),
            58,
            &recent,
            0,
        )
        .unwrap();
        let commit_before = replica.commit_max();
        let mut actions = Vec::with_capacity(ACTIONS_MAX);
        // The new log's last five checksums: ops 86..=90, all above this replica's head.
        let headers: Vec<u128> = (86..=90).map(|op| checksum(op, 2)).collect();
        replica.on_start_view(1_000, 1, 1, 90, 80, 86, &headers, &mut actions);
        assert!(
            !actions
                .iter()
                .any(|action| matches!(action, Action::Truncate { .. })),
            "{actions:?}"
        );
        assert_eq!(replica.op_head(), 63);
        // The leader's commit number waits until the log is installed.
        actions.clear();
        replica.on_commit(2_000, 1, 1, 85, 90, &mut actions);
        assert_eq!(replica.commit_max(), commit_before);
        // The new log's op 64 does not chain onto this replica's 63, nor its 62 onto 62...
        for head in (60..=63).rev() {
            actions.clear();
            replica.on_chain_mismatch(3_000, head + 1, &mut actions);
            assert!(
                actions.contains(&Action::Truncate { op: head - 1 }),
                "{actions:?}"
            );
            assert_eq!(replica.op_head(), head - 1);
            replica.on_truncated(head - 1, checksum(head - 1, 1));
        }
        // ...a report about any other op changes nothing...
        actions.clear();
        replica.on_chain_mismatch(3_000, 70, &mut actions);
        assert!(actions.is_empty(), "{actions:?}");
        // ...and applied ops are never cut.
        assert_eq!(replica.op_head(), 59);
        replica.on_chain_mismatch(3_000, 60, &mut actions);
        replica.on_truncated(58, checksum(58, 1));
        actions.clear();
        replica.on_chain_mismatch(3_000, 59, &mut actions);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(replica.op_head(), 58);
        // The new log, staged and durable: installed, and the commit number heard arrives.
        for op in 59..=90 {
            replica.on_staged(4_000, op, checksum(op, 2));
        }
        actions.clear();
        replica.on_durable(5_000, 90, &mut actions);
        assert_eq!(replica.log_view(), 1);
        assert_eq!(replica.commit_max(), 85);
    }

    /// With view change a restarted leader never leads its old view again (section 8): it
    /// may have sent Prepares that its crash lost. StartViewChange for the old view cannot
    /// bring it back; its first tick persists the next view and announces it, and a
    /// follower of the old view joins at once (its leader has left).
    #[test]
    fn a_restarted_leader_leaves_its_view_for_good() {
        let mut config = ReplicaConfig::new(0, 0, 3, 5).unwrap();
        config.view_change = true;
        let persisted = Persisted {
            view: 3,
            log_view: 3,
        };
        let mut leader =
            Replica::restart(config, persisted, 10, 0x10, 10, &[(10, 0x10)], 0).unwrap();
        assert_eq!(leader.leader(), 0, "it led view 3");
        assert!(!leader.is_ready_leader());
        assert_eq!(leader.status(), Status::ViewChange);
        let mut actions = Vec::with_capacity(ACTIONS_MAX);
        leader.on_start_view_change(1, 1, 3, &mut actions);
        leader.on_start_view_change(1, 2, 3, &mut actions);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!((leader.view(), leader.status()), (3, Status::ViewChange));
        assert!(leader.poll_timeout() <= 1, "it leaves at its next tick");
        leader.tick(2, &mut actions);
        let persist = Action::Persist {
            view: 4,
            log_view: 3,
            commit_max: 10,
        };
        let persisted_at = actions.iter().position(|a| *a == persist).expect("persist");
        for to in [1, 2] {
            let svc = Action::StartViewChange { to, view: 4 };
            let at = actions.iter().position(|a| *a == svc).expect("announced");
            assert!(
                persisted_at < at,
                "the view is durable before it is announced"
            );
        }
        assert_eq!(leader.view(), 4);
        assert_ne!(leader.leader(), 0);

        let mut config = ReplicaConfig::new(0, 1, 3, 6).unwrap();
        config.view_change = true;
        config.view = 3;
        let mut follower = Replica::new(config, 10, 0x10, 0).unwrap();
        follower.on_commit(5, 0, 3, 10, 10, &mut Vec::new());
        actions.clear();
        follower.on_start_view_change(6, 0, 4, &mut actions);
        assert_eq!(
            (follower.view(), follower.status()),
            (4, Status::ViewChange),
            "it heard its leader 1 µs ago, but that leader left the view"
        );
    }

    /// A leader answers `RequestStartView` with its durable log only: an op it has staged
    /// but may still lose must not reach a follower as an expected checksum.
    #[test]
    fn a_start_view_on_request_describes_only_the_durable_log() {
        let mut config = ReplicaConfig::new(0, 0, 3, 5).unwrap();
        config.view_change = true;
        let mut leader = Replica::new(config, 0, 0, 0).unwrap();
        let mut actions = Vec::with_capacity(ACTIONS_MAX);
        for op in 1..=7 {
            leader.on_staged(0, op, u128::from(op));
        }
        leader.on_durable(0, 6, &mut actions);
        actions.clear();
        leader.on_request_start_view(10, 1, 0, &mut actions);
        let start_view = actions.iter().find_map(|action| match action {
            Action::StartView {
                to: 1,
                op_head,
                headers_op_min,
                ..
            } => Some((*op_head, *headers_op_min)),
            _ => None,
        });
        let (op_head, headers_op_min) = start_view.expect("a StartView for the requester");
        assert_eq!(op_head, 6, "staged op 7 is not durable");
        assert!(headers_op_min <= 6);
    }
}
