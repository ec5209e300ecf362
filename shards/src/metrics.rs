//! Per-shard metrics and the Prometheus text endpoint.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer; it updates counters with
//! relaxed atomics once per batch or per frame, never per transaction on the hot path where
//! a batch total will do. The metrics thread only reads. Nothing here takes a lock, so a
//! scrape can never stall a shard.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs) of the latency histogram buckets; the last bucket is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 22] = [
    10, 20, 50, 100, 200, 300, 500, 700, 1_000, 1_500, 2_000, 3_000, 5_000, 7_000, 10_000, 20_000,
    50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000,
];

/// Upper bounds (µs) of the commit-gap histogram buckets; the last bucket is +Inf. Fine
/// below and around 1 ms (the gap a shard under load should stay under), then coarse up to
/// 1 s; a longer gap is still known exactly from `percore_commit_gap_max_us`.
pub const COMMIT_GAP_BUCKETS_US: [u64; 15] = [
    20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000,
];
const _: () = assert!(bounds_ascend(&COMMIT_GAP_BUCKETS_US));

/// How often each shard's executor runs its lag probe by default (µs, `--executor-probe-us`;
/// 0 turns it off): a timer that records how late it fired ([`ShardMetrics::executor_lag`]).
/// A stall of the executor (a long task turn, a blocking call, the thread descheduled)
/// shows as lag when a wake-up falls due during it: every stall longer than the interval,
/// a shorter one in proportion to its length. Each wake-up costs the shard a timer and a
/// task switch, below the 2-vCPU VM's run-to-run noise even at 1 ms (docs/benchmarks.md,
/// "Executor lag"); 10 ms by default, 1 ms for a soak that looks for every stall over
/// 1 ms.
pub const EXECUTOR_PROBE_INTERVAL_US_DEFAULT: u64 = 10_000;
const _: () = assert!(bounds_ascend(&LATENCY_BUCKETS_US));

/// Whether `bounds` strictly ascend (bucket lookup by binary search needs it).
const fn bounds_ascend(bounds: &[u64]) -> bool {
    let mut index = 1;
    while index < bounds.len() {
        if bounds[index - 1] >= bounds[index] {
            return false;
        }
        index += 1;
    }
    true
}

/// A fixed-bucket latency histogram (µs) written by one shard, read by the scraper.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records `count` observations of `latency_us` each (a batch shares one latency).
    pub fn record(&self, latency_us: u64, count: u64) {
        let index = LATENCY_BUCKETS_US.partition_point(|&bound| bound < latency_us);
        self.buckets[index].fetch_add(count, Ordering::Relaxed);
        self.sum_us
            .fetch_add(latency_us.saturating_mul(count), Ordering::Relaxed);
        self.count.fetch_add(count, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative); the last bucket is +Inf.
    pub fn buckets(&self) -> [u64; LATENCY_BUCKETS_US.len() + 1] {
        std::array::from_fn(|index| self.buckets[index].load(Ordering::Relaxed))
    }

    /// Sum of the values recorded (for [`ShardMetrics::batch_size`], entries sealed).
    pub fn sum(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Observations recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram under `name` with its HELP and TYPE lines.
    fn render(&self, out: &mut String, name: &str, help: &str, shard: u32, unit: Unit) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        self.render_labelled(out, name, &format!("shard=\"{shard}\""), unit);
    }

    /// Appends the histogram's samples under `name` with `labels` (no HELP or TYPE line).
    fn render_labelled(&self, out: &mut String, name: &str, labels: &str, unit: Unit) {
        let mut cumulative = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let bound = LATENCY_BUCKETS_US.get(index).map(|&bound| match unit {
                Unit::Seconds => (bound as f64 / 1e6).to_string(),
                Unit::Count => bound.to_string(),
            });
            let le = bound.as_deref().unwrap_or("+Inf");
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed);
        match unit {
            Unit::Seconds => {
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum as f64 / 1e6);
            }
            Unit::Count => {
                let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            }
        }
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count());
    }
}

/// What a [`LatencyHistogram`] holds: microseconds, exported in seconds, or a count
/// (records per batch), exported as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Seconds,
    Count,
}

impl LatencyHistogram {}

/// Gap accounting of one shard's commit point, sans-IO (the caller passes the time, µs on
/// the shard's clock). A gap opens when the commit point advances while work is still
/// waiting to commit, or when a shard that had nothing waiting seals new work (the runtime
/// passes the start of that batcher turn); it closes at the next advance, which reports its
/// length. An idle shard has no gap open and reports
/// nothing, so a gap always means something waited to commit all along.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitGapClock {
    /// When the open gap began, if one is open.
    open_since_us: Option<u64>,
}

impl CommitGapClock {
    /// Work started waiting to commit at `now_us` (a batch was sealed): opens a gap unless
    /// one is open (then the earlier start stands).
    #[inline]
    pub fn work_waiting(&mut self, now_us: u64) {
        if self.open_since_us.is_none() {
            self.open_since_us = Some(now_us);
        }
    }

    /// The commit point advanced at `now_us`; `still_waiting`: whether work is still waiting
    /// to commit after it. Returns the length (µs) of the gap this advance closed, if one was
    /// open, and opens the next one if work is still waiting.
    #[inline]
    #[must_use]
    pub fn advanced(&mut self, now_us: u64, still_waiting: bool) -> Option<u64> {
        let gap_us = self
            .open_since_us
            .map(|since_us| now_us.saturating_sub(since_us));
        self.open_since_us = still_waiting.then_some(now_us);
        gap_us
    }

    /// Forgets the open gap (this replica stopped leading: its next commit, if it leads
    /// again, must not count the time in between).
    #[inline]
    pub fn forget(&mut self) {
        self.open_since_us = None;
    }

    /// Whether a gap is open.
    pub fn is_open(&self) -> bool {
        self.open_since_us.is_some()
    }
}

/// Names and help texts of a [`GapHistogram`]'s two exported series.
#[derive(Debug, Clone, Copy)]
pub struct GapNames {
    /// The histogram (bounds in µs).
    pub name: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// The gauge of the longest gap since start.
    pub max_name: &'static str,
    /// Its help text.
    pub max_help: &'static str,
}

/// [`ShardMetrics::commit_gap`]'s names.
pub const COMMIT_GAP_NAMES: GapNames = GapNames {
    name: "percore_commit_gap_us",
    help: "Time between successive advances of the commit point while work waited to commit (microseconds).",
    max_name: "percore_commit_gap_max_us",
    max_help: "Longest time between advances of the commit point while work waited, since start (microseconds).",
};

/// [`ShardMetrics::executor_lag`]'s names.
pub const EXECUTOR_LAG_NAMES: GapNames = GapNames {
    name: "percore_executor_lag_us",
    help: "How late the shard's executor ran its probe timer (due every --executor-probe-us, 10 ms by default): time it spent on other work (or descheduled) past the deadline (microseconds).",
    max_name: "percore_executor_lag_max_us",
    max_help: "Longest executor lag since start (microseconds).",
};

/// Gaps of one shard (commit gaps, [`CommitGapClock`]; executor lag) in fixed buckets
/// ([`COMMIT_GAP_BUCKETS_US`]) and the longest one since start. The shard writes, the
/// scraper reads.
#[derive(Debug, Default)]
pub struct GapHistogram {
    buckets: [AtomicU64; COMMIT_GAP_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl GapHistogram {
    /// Records one gap of `gap_us`.
    #[inline]
    pub fn record(&self, gap_us: u64) {
        // One writer: a plain load and store keep the maximum.
        if gap_us > self.max_us.load(Ordering::Relaxed) {
            self.max_us.store(gap_us, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(gap_us, Ordering::Relaxed);
        let index = COMMIT_GAP_BUCKETS_US.partition_point(|&bound| bound < gap_us);
        // Release, paired with the Acquire loads in `render`: a scrape that counts this gap
        // also sees the maximum raised above (it reads the buckets before the maximum), so
        // the maximum it reports bounds every gap it counted.
        self.buckets[index].fetch_add(1, Ordering::Release);
    }

    /// Per-bucket counts (not cumulative); the last bucket is +Inf.
    pub fn buckets(&self) -> [u64; COMMIT_GAP_BUCKETS_US.len() + 1] {
        std::array::from_fn(|index| self.buckets[index].load(Ordering::Acquire))
    }

    /// The longest gap recorded since start (µs).
    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }

    /// Appends the histogram (bounds in µs) and the gauge of its maximum in Prometheus text
    /// format, under `names`.
    fn render(&self, out: &mut String, shard: u32, names: &GapNames) {
        let name = names.name;
        let _ = writeln!(out, "# HELP {name} {}", names.help);
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (index, count) in self.buckets().iter().enumerate() {
            cumulative += count;
            let le = COMMIT_GAP_BUCKETS_US
                .get(index)
                .map_or_else(|| "+Inf".to_string(), u64::to_string);
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let sum_us = self.sum_us.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_sum{{shard=\"{shard}\"}} {sum_us}");
        // The count is the +Inf bucket, as Prometheus requires.
        let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {cumulative}");
        let name = names.max_name;
        let _ = writeln!(out, "# HELP {name} {}", names.max_help);
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", self.max_us());
    }
}

macro_rules! shard_metrics {
    ($( $kind:ident $field:ident : $help:literal ),* $(,)?) => {
        /// Counters and gauges of one shard. Field names are the Prometheus names without the
        /// `percore_` prefix.
        #[derive(Debug, Default)]
        pub struct ShardMetrics {
            /// The shard these metrics describe.
            pub shard: u32,
            $( #[doc = $help] pub $field: AtomicU64, )*
            /// Time from a request's arrival to its reply being ready (µs).
            pub request_latency: LatencyHistogram,
            /// Records per sealed batch.
            pub batch_size: LatencyHistogram,
            /// Time to stage, write and (per policy) fdatasync one group of batches (µs).
            pub journal_commit_latency: LatencyHistogram,
            /// Leader: time from staging an op to its quorum commit (µs).
            pub commit_latency: LatencyHistogram,
            /// Time to apply one committed batch and hand its results to their requests
            /// (µs), on every replica.
            pub apply_latency: LatencyHistogram,
            /// Leader (or unreplicated shard): time between advances of the commit point
            /// while work waited to commit (µs).
            pub commit_gap: GapHistogram,
            /// How late the shard's executor ran its lag probe, a timer due every
            /// [`EXECUTOR_PROBE_INTERVAL_US_DEFAULT`] unless configured otherwise (µs): time
            /// the executor spent on other tasks, or descheduled, past the deadline.
            pub executor_lag: GapHistogram,
            /// Per peer replica: what this replica knows of it.
            pub peers: [PeerMetrics; PEERS_MAX],
        }

        impl ShardMetrics {
            fn render_fields(&self, out: &mut String) {
                $(
                    let name = concat!("percore_", stringify!($field));
                    let _ = writeln!(out, "# HELP {name} {}", $help);
                    let _ = writeln!(out, "# TYPE {name} {}", stringify!($kind));
                    let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", self.shard, self.$field.load(Ordering::Relaxed));
                )*
            }
        }
    };
}

shard_metrics! {
    counter tx_accepted_total: "Records accepted from clients into this shard's ring.",
    counter tx_applied_total: "Client records applied by this shard's state machine.",
    counter internal_applied_total: "Records from other shards' state machines (e.g. credit legs) applied here.",
    counter tx_forwarded_out_total: "Records forwarded to their owning shard over the ring mesh.",
    counter tx_forwarded_in_total: "Records received from other shards over the ring mesh.",
    counter credit_legs_out_total: "Cross-shard credit legs sent to other shards.",
    counter credit_legs_in_total: "Cross-shard credit legs applied here.",
    counter frames_rejected_total: "Client frames rejected with a typed error.",
    counter requests_total: "Client requests answered.",
    counter batches_sealed_total: "Batches sealed by the batcher.",
    counter journal_commits_total: "Group commits (one write and one fdatasync each, per policy).",
    counter journal_spares_prepared_total: "Spare journal segments zero-filled ahead of use and made durable.",
    counter journal_segment_switches_prepared_total: "Journal segment roll-overs onto a spare written ahead.",
    counter journal_segment_switches_unprepared_total: "Journal segment roll-overs that found no spare ready: the segment was created by fallocate, and appends into its unwritten blocks also commit the file system's journal.",
    counter journal_spare_failures_total: "Spare segment preparations that failed (the file was removed; tried again later).",
    counter mesh_messages_sent_total: "Messages pushed into mesh rings to other shards.",
    counter mesh_messages_received_total: "Messages taken from mesh rings and handled.",
    counter mesh_queue_grown_total: "Times this shard's local mesh queue (messages waiting for room in a full ring) grew past the capacity allocated at start: an allocation after start-up; it should stay 0.",
    counter pool_exhausted_total: "Borrows refused because a pool was exhausted (back-pressure).",
    counter session_requests_total: "Client requests submitted whole with a session descriptor (applied once however often retried).",
    counter ring_full_total: "Pushes refused because a ring was full (back-pressure).",
    gauge commit_op: "Highest op number applied by this shard.",
    gauge ring_depth: "Entries waiting in the transaction ring at the last batcher turn.",
    gauge mesh_queued_high_water: "Most messages ever waiting in this shard's local mesh queue for room in a full ring to another shard.",
    gauge batch_entries_target: "Adaptive batch entry target.",
    gauge batch_linger_us: "Adaptive batch linger in microseconds.",
    gauge pool_transactions_in_use: "Transaction slots in use.",
    gauge pool_transactions_high_water: "Most transaction slots ever in use.",
    gauge pool_batches_in_use: "Batch slots in use.",
    gauge pool_batches_high_water: "Most batch slots ever in use.",
    gauge pool_messages_in_use: "Message buffers in use.",
    gauge pool_messages_high_water: "Most message buffers ever in use.",
    gauge connections: "Open client connections.",
    gauge replica_is_leader: "1 if this replica leads the shard's replication group.",
    gauge replication_view: "The view this replica is in (its group's leader is percore_engine::placement::leader_of(shard, view, replicas)).",
    gauge replication_status: "1 normal, 2 changing views, 3 recovering lost journal entries, 4 rebuilding after format --replace.",
    gauge replication_op_head: "Highest op staged in this replica's journal.",
    gauge replication_op_durable: "Highest op durable in this replica's journal.",
    gauge replication_commit_max: "Highest op this replica knows is committed.",
    gauge replication_in_flight_ops: "Leader: ops prepared and not yet committed.",
    counter replication_bytes_sent_total: "Bytes of peer messages sent (headers and entries).",
    counter replication_prepares_sent_total: "Prepare messages sent to followers.",
    counter replication_acks_received_total: "PrepareOk messages received.",
    counter replication_repairs_requested_total: "Repair requests sent (gap or lagging).",
    counter replication_repairs_timed_out_total: "Repair requests that timed out and were re-routed.",
    counter replication_leader_handoffs_total: "Views this replica left as leader to hand its group back to the group's preferred leader (`--leader-rebalance-ms`).",
    counter replication_chain_mismatches_total: "Entries of a log being installed (view change) that did not chain onto this replica's head: each cut one entry kept below the new log's checksums, which belonged to an abandoned view.",
    counter replication_stalls_total: "Replication ticks that came more than half a leader timeout late: this shard did not run meanwhile (a descheduled process, a long executor turn); a follower then counts its leader's silence only from then on.",
    counter replication_repairs_served_total: "Repair requests served from this journal.",
    counter replication_retransmits_total: "Entries sent again as PrepareRepair.",
    counter replication_applied_during_write_total: "Leader: committed ops applied while its next group commit was in flight, instead of after it (requests queued).",
    counter replication_applied_from_journal_total: "Committed ops applied by reading them back from the journal (not queued in memory).",
    counter replication_prepares_dropped_total: "Prepares dropped (gap, full queue, disconnected peer).",
    counter replication_deferred_dropped_total: "Messages to peers dropped because the queue of actions waiting behind a superblock write or truncation was full (as if the network lost them).",
    counter replication_messages_dropped_total: "Peer messages not sent: queue full or peer disconnected.",
    counter replication_forwards_sent_total: "Credit legs forwarded to another replica's group leader.",
    counter replication_forwards_received_total: "Credit legs received from other replicas.",
    counter replication_legs_resent_total: "Unacknowledged credit legs sent again.",
    counter peer_connections_total: "Authenticated peer connections established.",
    counter peer_connections_accepted_key_total: "Peer connections dialed whose peer answered with the key accepted during a key rotation, not this node's cluster key (it stops rising once every node runs on one key).",
    counter peer_auth_failures_total: "Peer connections refused (bad key, unknown peer, bad frame).",
    counter peer_connections_replaced_total: "Inbound peer connections closed because the same peer authenticated a newer one (a frame that arrived on the older one was dropped).",
    counter peer_handshakes_refused_total: "Inbound peer connections closed unheard because the shard already ran its most handshakes at once (HANDSHAKES_PENDING_MAX).",
    counter client_not_leader_total: "Client requests refused because this replica does not lead.",
    counter session_requests_applied_total: "Client requests applied and kept as their session's reply.",
    counter session_requests_replayed_total: "Client requests answered from their session's kept reply, not applied again (a retry).",
    counter session_fallbacks_total: "Client requests their session could not answer, applied again (crash-fault mode: an evicted session or a number older than the kept replies; the ledger's transfer ids answer Exists).",
    counter session_evictions_total: "Client sessions evicted to make room for a new client (crash-fault mode).",
    counter session_requests_refused_total: "Client requests refused unapplied by a session table that refuses replays (BFT mode: a number behind the session's window, or no session free for a new client).",
    counter checkpoints_total: "Checkpoints recorded in the superblock.",
    gauge checkpoint_op: "Op of the latest checkpoint recorded in the superblock.",
    gauge checkpoint_follower_op: "Op the checkpoint follower has applied from the journal.",
    gauge checkpoint_capture_us: "Last checkpoint: snapshot and digest on the follower thread (µs).",
    gauge checkpoint_write_us: "Last checkpoint: snapshot file checksum, write and sync on the follower thread (µs).",
    gauge checkpoint_release_us: "Last checkpoint: removal of the files it released, in steps, on the follower thread (µs).",
    counter checkpoint_write_us_total: "Time the checkpoint follower spent writing snapshot files (paced writes, sync, rename), microseconds, counted as the write goes.",
    counter checkpoint_release_us_total: "Time the checkpoint follower spent removing released files (shrink steps, their pauses, unlinks), microseconds, counted as the removal goes.",
    counter checkpoint_segments_recycled_total: "Released journal segments the checkpoint follower offered for reuse instead of removing them.",
    counter checkpoint_snapshots_kept_total: "Released snapshot files the checkpoint follower kept as the spare for its next snapshot write to overwrite, instead of removing them.",
    counter journal_segment_switches_recycled_total: "Journal segment roll-overs onto a released segment (written blocks: appends commit no extent metadata).",
    gauge checkpoint_install_us: "Last checkpoint: superblock write and removals on the shard (µs).",
    counter state_syncs_total: "State syncs started (a peer no longer retained the ops needed).",
    counter state_syncs_failed_total: "State syncs abandoned (peer quiet, checkpoint moved on, bad snapshot).",
    counter state_syncs_installed_total: "State syncs installed (journal restarted at a peer's checkpoint).",
    counter state_sync_bytes_total: "Snapshot bytes received for state syncs.",
    counter state_sync_bytes_served_total: "Snapshot bytes sent to peers that sync.",
    gauge bft_view: "BFT mode: the view this replica is in (leader percore_engine::placement::leader_of(shard, view, n)).",
    gauge bft_status: "BFT mode: 1 normal, 2 changing views, 3 waiting for a state transfer.",
    gauge bft_is_leader: "BFT mode: 1 if this replica is the ready leader of its group.",
    gauge bft_commit_op: "BFT mode: highest BFT op executed (null ops included).",
    gauge bft_low_op: "BFT mode: the stable checkpoint's op (low watermark).",
    gauge bft_evidence_kept: "BFT mode: equivocation evidence records held (bounded).",
    counter bft_equivocations_total: "BFT mode: equivocations detected (two validly signed conflicting statements by one replica).",
    counter bft_bad_signatures_total: "BFT mode: messages refused for a signature verify_strict rejects.",
    counter bft_messages_refused_total: "BFT mode: messages refused for any reason but staleness (signature, view, window, certificate, sender, decoding).",
    counter bft_messages_received_total: "BFT mode: BFT messages received from peers.",
    counter bft_messages_sent_total: "BFT mode: BFT messages queued to peers.",
    counter bft_view_changes_total: "BFT mode: view changes started or joined.",
    counter bft_suspicions_deferred_total: "BFT mode: progress timeouts that did not suspect the leader (f+1 peers not yet heard since start, or catching up).",
    counter bft_checkpoints_stable_total: "BFT mode: stable checkpoints reached (2f+1 signed checkpoint votes).",
    counter bft_commit_proofs_applied_total: "BFT mode: ops committed from a peer's commit certificate (catch-up).",
    counter bft_null_ops_total: "BFT mode: null ops executed (gaps a new view filled; nothing journaled but the certificate).",
    counter bft_batches_invalid_total: "BFT mode: committed batches skipped because their bytes are not a batch of this shard.",
    counter bft_stale_requests_total: "BFT mode: client requests answered at once as stale (error 1017): their number is behind the client's session here, with no reply kept.",
    gauge bft_xshard_outputs_kept: "BFT mode: outputs to other groups this replica keeps (collecting votes, or certified and not yet settled).",
    gauge bft_xshard_inbound_queued: "BFT mode: other groups' verified proofs waiting for this group to commit them.",
    counter bft_xshard_votes_signed_total: "BFT mode: outputs statements this replica signed (one per op and destination group).",
    counter bft_xshard_votes_accepted_total: "BFT mode: peers' outputs votes accepted (matching what this replica produced).",
    counter bft_xshard_votes_refused_total: "BFT mode: peers' outputs votes refused (bad signature, unknown signer, another group, or validly signed for other outputs of an op).",
    counter bft_xshard_votes_early_total: "BFT mode: peers' outputs votes for outputs not produced here yet (dropped; answered once produced).",
    counter bft_xshard_certified_total: "BFT mode: outputs certified here (q matching signatures).",
    counter bft_xshard_deliveries_total: "BFT mode: certified outputs handed to this node's replica of their destination group, first and resent.",
    counter bft_xshard_deliveries_dropped_total: "BFT mode: deliveries dropped because the mesh ring to the destination shard was full (delivered again at the next resend).",
    counter bft_xshard_collector_full_total: "BFT mode: outputs not signed because the collector was full after releasing every settled output.",
    counter bft_xshard_outputs_released_total: "BFT mode: outputs released because they are settled (legs acknowledged; acknowledgements after their keep time).",
    counter bft_xshard_proofs_accepted_total: "BFT mode: other groups' proofs verified and queued.",
    counter bft_xshard_proofs_refused_total: "BFT mode: other groups' proofs refused (certificate, digest, destination or records invalid).",
    counter bft_xshard_proofs_duplicate_total: "BFT mode: proofs already queued (not verified again).",
    counter bft_xshard_proofs_full_total: "BFT mode: proofs dropped because the inbound queue was full (their origin delivers them again).",
    counter bft_xshard_proofs_committed_total: "BFT mode: queued proofs taken out because a proven batch holding them committed.",
    counter bft_xshard_proofs_forwarded_total: "BFT mode: proofs a backup sent its leader because they stayed queued (a late delivery no leader holds).",
    counter bft_xshard_proofs_forwarded_in_total: "BFT mode: proofs received from a backup of this group (verified like delivered ones).",
    counter bft_xshard_outputs_resigned_total: "BFT mode: unsettled outputs of ops replayed from the journal at start, signed again.",
    gauge bft_xshard_in_flight_kept: "BFT mode: in-flight chunks (legs in flight at a snapshot op, signed from state) this replica keeps.",
    counter bft_xshard_in_flight_signed_total: "BFT mode: in-flight statements this replica signed (legs in flight at a snapshot op or a restored snapshot, per destination and chunk).",
    counter bft_xshard_in_flight_certified_total: "BFT mode: in-flight chunks certified here (q matching signatures).",
    counter bft_xshard_in_flight_deliveries_total: "BFT mode: certified in-flight chunks delivered because some of their legs were still unacknowledged after the delivery delay.",
    counter bft_xshard_proofs_recently_applied_total: "BFT mode: proofs dropped on arrival because this replica applied them within the last second (late deliveries, copies forwarded by lagging replicas).",
    counter bft_xshard_batches_proposed_total: "BFT mode: proven batches (other groups' certified outputs) this replica proposed as leader.",
    counter bft_proposals_refused_total: "BFT mode: proposals validly signed by the leader refused before voting because a request lacks a valid client signature.",
    counter bft_client_requests_refused_total: "BFT mode: client requests refused at admission: unknown client id (error 1015) or bad or missing signature (error 1016).",
    counter bft_client_signatures_verified_total: "BFT mode: client request signatures verified with verify_strict (requests already verified here are not verified again).",
    counter bft_certs_journaled_total: "BFT mode: commit and checkpoint certificates written to the certificate journal.",
    counter bft_cert_segments_released_total: "BFT mode: certificate journal segments released by its checkpoints (below the previous one and below what peers transferring state by log may still need).",
    counter bft_proposals_total: "BFT mode: batches this replica proposed as leader.",
    counter bft_guard_writes_total: "BFT mode: vote guard records written (fsynced) before the votes they cover were sent.",
    counter bft_prepared_persisted_total: "BFT mode: prepared certificates made durable (in group writes) before this replica's Commits for them were sent.",
    counter bft_state_transfers_total: "BFT mode: state transfers the core asked for (this replica was behind its peers' stable checkpoint; a raised target counts again).",
    counter bft_state_transfers_completed_total: "BFT mode: state transfers that reached their checkpoint (chain digest matched the 2f+1-signed checkpoint certificate).",
    counter bft_state_ops_applied_total: "BFT mode: ops executed from peers' StateOps (each with a verified commit certificate).",
    counter bft_catchup_ops_applied_total: "BFT mode: of those, ops a peer served outside a state transfer (ops it restored from its journal after a restart, so it held no CommitProof for them).",
    counter bft_catchup_serves_total: "BFT mode: ranges of ops restored from the journal that this replica served a peer behind it, in answer to its Status.",
    counter bft_state_requests_total: "BFT mode: StateRequests sent to peers (first asks and retries to the next peer).",
    counter bft_commits_held_for_durability_total: "BFT mode: times execution waited because commits_undurable_ops_max committed ops handed to the driver were not yet durable (the disk behind the group).",
    counter bft_state_serves_refused_total: "BFT mode: peers' StateRequests refused because the peer's serve budget (state_serve_ops_per_s, per peer) did not hold the ops asked for: a peer asking faster than an honest state transfer does.",
    counter bft_state_ops_served_total: "BFT mode: committed ops with certificates sent to peers that transfer state.",
    counter bft_state_certs_total: "BFT mode: state certificates formed (2f+1 StateCheckpoint votes on one snapshot statement: op, chain, journal op, state digest).",
    counter bft_snapshot_votes_total: "BFT mode: snapshot checkpoint (StateCheckpoint) votes this replica signed, one per snapshot its follower wrote at a snapshot op.",
    counter bft_snapshot_fetches_total: "BFT mode: certified snapshots this replica fetched from a peer (its transfer was below every peer's log).",
    counter bft_snapshot_fetches_failed_total: "BFT mode: snapshot fetches that failed (silent peer, or bytes that do not restore to the certified state digest); each costs one retry with the next peer.",
    counter bft_snapshot_installs_total: "BFT mode: certified snapshots installed (restored state digest equal to the 2f+1-signed one, checked before adopting).",
    counter bft_snapshot_bytes_total: "BFT mode: snapshot file bytes received from peers.",
    counter bft_snapshot_bytes_served_total: "BFT mode: snapshot file bytes served to peers.",
    counter bft_snapshot_requests_dropped_total: "BFT mode: snapshot chunk requests dropped because their peer already had a fetch's window of requests waiting (a peer asking faster than an honest fetch does).",
    counter bft_core_us_total: "BFT mode: time spent in the BFT core (signing and verifying included), microseconds.",
    counter bft_sign_us_total: "BFT mode: time the leader spent in propose (one signature per batch), microseconds.",
}

/// A per-peer gauge: name, help and how to read it.
type PeerGauge = (&'static str, &'static str, fn(&PeerMetrics) -> &AtomicU64);

/// Most peer replicas tracked per shard (the replica count limit).
pub const PEERS_MAX: usize = percore_engine::replica::REPLICA_COUNT_MAX;

/// What one replica knows of one peer of its group.
#[derive(Debug, Default)]
pub struct PeerMetrics {
    /// 1 for a replica of this shard's group other than this one (set when its sender
    /// starts): its gauges are exported from then on, so a peer never reached shows as
    /// `percore_peer_connected 0` rather than not at all.
    pub expected: AtomicU64,
    /// 1 while an authenticated connection to the peer is up.
    pub connected: AtomicU64,
    /// 1 while that connection runs under the key accepted during a key rotation (the peer
    /// answered with it, not with this node's cluster key).
    pub accepted_key: AtomicU64,
    /// Highest op the peer acknowledged (leader) or reported durable.
    pub op_durable: AtomicU64,
    /// Ops behind this replica's durable head.
    pub lag_ops: AtomicU64,
    /// Smoothed ack/repair/ping round trip (µs).
    pub srtt_us: AtomicU64,
    /// Routing score `srtt + 4 · rttvar` (µs).
    pub score_us: AtomicU64,
    /// Leader: time from sending a Prepare to its acknowledgement (µs).
    pub ack_latency: LatencyHistogram,
}

impl ShardMetrics {
    /// Metrics for `shard`, all zero.
    pub fn new(shard: u32) -> Self {
        Self {
            shard,
            ..Self::default()
        }
    }

    /// Adds to a counter (single writer: the owning shard).
    #[inline]
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads a counter or gauge.
    #[inline]
    pub fn get(value: &AtomicU64) -> u64 {
        value.load(Ordering::Relaxed)
    }

    /// Appends this shard's metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.render_fields(out);
        let histograms = [
            (
                &self.request_latency,
                "percore_request_latency_seconds",
                "Time from a client request's arrival to its reply being ready.",
                Unit::Seconds,
            ),
            (
                &self.batch_size,
                "percore_batch_entries",
                "Records per sealed batch.",
                Unit::Count,
            ),
            (
                &self.journal_commit_latency,
                "percore_journal_commit_seconds",
                "Time to stage, write and (per the fsync policy) fdatasync one group of batches.",
                Unit::Seconds,
            ),
            (
                &self.commit_latency,
                "percore_commit_seconds",
                "Leader: time from staging an op to its quorum commit.",
                Unit::Seconds,
            ),
            (
                &self.apply_latency,
                "percore_apply_seconds",
                "Time to apply one committed batch and hand its results to their requests.",
                Unit::Seconds,
            ),
        ];
        for (histogram, name, help, unit) in histograms {
            histogram.render(out, name, help, self.shard, unit);
        }
        self.commit_gap.render(out, self.shard, &COMMIT_GAP_NAMES);
        self.executor_lag
            .render(out, self.shard, &EXECUTOR_LAG_NAMES);
        self.render_peers(out);
    }

    fn render_peers(&self, out: &mut String) {
        let gauges: [PeerGauge; 6] = [
            (
                "percore_peer_connected",
                "1 while a connection to the peer is up.",
                |p| &p.connected,
            ),
            (
                "percore_peer_accepted_key",
                "1 while the connection to the peer runs under the key accepted during a key rotation, not this node's cluster key.",
                |p| &p.accepted_key,
            ),
            (
                "percore_peer_op_durable",
                "Highest op the peer acknowledged or reported durable.",
                |p| &p.op_durable,
            ),
            (
                "percore_peer_lag_ops",
                "Ops the peer is behind this replica's durable head.",
                |p| &p.lag_ops,
            ),
            (
                "percore_peer_srtt_us",
                "Smoothed round trip to the peer (RFC 6298), microseconds.",
                |p| &p.srtt_us,
            ),
            (
                "percore_peer_score_us",
                "Routing score srtt + 4 rttvar, microseconds.",
                |p| &p.score_us,
            ),
        ];
        for (name, help, get) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for (peer, metrics) in self.peers.iter().enumerate() {
                let heard = metrics.connected.load(Ordering::Relaxed) != 0
                    || metrics.srtt_us.load(Ordering::Relaxed) != 0;
                // A peer never heard of says only that it is not connected: its lag and
                // round trip are unknown, not 0.
                let expected = metrics.expected.load(Ordering::Relaxed) != 0
                    && name == "percore_peer_connected";
                if !heard && !expected {
                    continue;
                }
                let value = get(metrics).load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{}\",peer=\"{peer}\"}} {value}",
                    self.shard
                );
            }
        }
        let name = "percore_peer_ack_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from sending an op to the peer to its acknowledgement."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (peer, metrics) in self.peers.iter().enumerate() {
            if metrics.ack_latency.count() > 0 {
                let labels = format!("shard=\"{}\",peer=\"{peer}\"", self.shard);
                metrics
                    .ack_latency
                    .render_labelled(out, name, &labels, Unit::Seconds);
            }
        }
    }
}

/// Renders every shard's metrics as one Prometheus text exposition: each family's HELP and
/// TYPE lines once, then its samples from every shard, in shard order (the text format
/// wants a family's samples together; a second TYPE line for one family is an error to
/// strict parsers such as `promtool`). Runs on the scrape thread, never on a shard's.
pub fn render_all(shards: &[Arc<ShardMetrics>]) -> String {
    let texts: Vec<String> = shards
        .iter()
        .map(|metrics| {
            let mut text = String::with_capacity(16 * 1024);
            metrics.render(&mut text);
            text
        })
        .collect();
    merge_families(&texts)
}

/// Merges expositions that each hold every family once (a HELP line opens a family, its
/// TYPE line and samples follow) into one exposition holding each family once, in the order
/// families first appear.
fn merge_families(texts: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, (Vec<&str>, Vec<&str>)> =
        std::collections::HashMap::new();
    for text in texts {
        let mut current: Option<&str> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or(rest);
                current = Some(name);
                let family = families.entry(name).or_insert_with(|| {
                    order.push(name);
                    (Vec::new(), Vec::new())
                });
                if family.0.is_empty() {
                    family.0.push(line);
                }
                continue;
            }
            let Some(name) = current else {
                continue;
            };
            let family = families.get_mut(name).expect("opened by its HELP line");
            if line.starts_with("# TYPE ") {
                if family.0.len() < 2 {
                    family.0.push(line);
                }
            } else {
                family.1.push(line);
            }
        }
    }
    let mut out = String::with_capacity(texts.iter().map(String::len).sum());
    for name in order {
        let (header, samples) = &families[name];
        for line in header.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Serves `GET /metrics` on `addr` from a plain thread (not a shard's executor) until
/// `stop`; the thread runs wherever its spawner may.
pub fn serve(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    serve_with_node_text(addr, shards, String::new(), stop, Vec::new())
}

/// [`serve`], with `node_text` (node-level samples that never change, such as
/// `crate::config::render_node_gauges`) appended to every scrape, on a thread confined to
/// `cores` (a node's [`crate::runtime::Node::helper_cores`], so that rendering a scrape
/// never takes a shard's core; empty: wherever the spawner may run).
pub fn serve_with_node_text(
    addr: SocketAddr,
    shards: Vec<Arc<ShardMetrics>>,
    node_text: String,
    stop: Arc<AtomicBool>,
    cores: Vec<usize>,
) -> std::io::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = std::thread::Builder::new().name("percore-metrics".into()).spawn(move || {
        if let Err(error) = crate::affinity::confine_current(&cores) {
            tracing::warn!(?cores, %error, "metrics thread: could not confine to the helper cores");
        }
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut request = [0u8; 1024];
                    let read = stream.read(&mut request).unwrap_or(0);
                    let head = std::str::from_utf8(&request[..read]).unwrap_or("");
                    let response = if head.starts_with("GET /metrics") {
                        let mut body = render_all(&shards);
                        body.push_str(&node_text);
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                    };
                    let _ = stream.write_all(response.as_bytes());
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => tracing::warn!(%err, "metrics accept failed"),
            }
        }
    })?;
    Ok((local, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer of the group is exported from its sender's start, connected or not: an alert
    /// on `percore_peer_connected == 0` sees one that was never reached. Slots that are not
    /// peers (this replica, indices past the group) stay out.
    #[test]
    fn an_expected_peer_is_exported_before_it_ever_connects() {
        let metrics = ShardMetrics::new(2);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(!out.contains("percore_peer_connected{"), "{out}");
        ShardMetrics::set(&metrics.peers[1].expected, 1);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            out.contains("percore_peer_connected{shard=\"2\",peer=\"1\"} 0"),
            "{out}"
        );
        assert!(!out.contains("peer=\"0\""), "{out}");
        assert!(
            !out.contains("percore_peer_lag_ops{"),
            "unknown, not 0: {out}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = LatencyHistogram::default();
        histogram.record(5, 1);
        histogram.record(150, 2);
        histogram.record(5_000_000, 1);
        let mut out = String::new();
        histogram.render(&mut out, "x", "help", 3, Unit::Seconds);
        assert!(
            out.starts_with("# HELP x help\n# TYPE x histogram\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{shard=\"3\",le=\"0.00001\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{shard=\"3\",le=\"0.0002\"} 3"),
            "{out}"
        );
        assert!(out.contains("x_bucket{shard=\"3\",le=\"+Inf\"} 4"), "{out}");
        assert!(out.contains("x_count{shard=\"3\"} 4"), "{out}");
    }

    /// One exposition of several shards is valid text format: each family's HELP and TYPE
    /// once, its samples together; histograms typed; batch sizes in records, not scaled as
    /// seconds.
    #[test]
    fn shards_render_as_one_exposition_with_each_family_once() {
        let shards: Vec<Arc<ShardMetrics>> = (0..3)
            .map(|shard| {
                let metrics = ShardMetrics::new(shard);
                ShardMetrics::add(&metrics.tx_applied_total, u64::from(shard) + 10);
                metrics.batch_size.record(200, 1);
                Arc::new(metrics)
            })
            .collect();
        let text = render_all(&shards);
        for family in [
            "percore_tx_applied_total counter",
            "percore_batch_entries histogram",
            "percore_commit_seconds histogram",
            "percore_peer_ack_seconds histogram",
            "percore_commit_gap_us histogram",
        ] {
            let type_line = format!("# TYPE {family}\n");
            assert_eq!(text.matches(&type_line).count(), 1, "{family}:\n{text}");
        }
        assert_eq!(text.matches("# HELP percore_tx_applied_total ").count(), 1);
        // The family's samples follow its TYPE line, every shard's, in order.
        let at = text
            .find("# TYPE percore_tx_applied_total counter\n")
            .unwrap();
        let block: Vec<&str> = text[at..].lines().skip(1).take(3).collect();
        assert_eq!(
            block,
            [
                "percore_tx_applied_total{shard=\"0\"} 10",
                "percore_tx_applied_total{shard=\"1\"} 11",
                "percore_tx_applied_total{shard=\"2\"} 12",
            ]
        );
        // Every sample line belongs to the family whose TYPE line came last before it.
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(family), "{line} under {family}");
            }
        }
        assert!(
            text.contains("percore_batch_entries_bucket{shard=\"1\",le=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("percore_batch_entries_sum{shard=\"1\"} 200\n"),
            "{text}"
        );
    }

    #[test]
    fn commit_gaps_count_only_while_work_waits() {
        let mut clock = CommitGapClock::default();
        // Idle: an advance with nothing waiting before or after reports nothing.
        assert_eq!(clock.advanced(100, false), None);
        assert!(!clock.is_open());
        // Work arrives at 1,000 and commits at 1,300, with more still waiting.
        clock.work_waiting(1_000);
        clock.work_waiting(1_100); // already open: the earlier start stands
        assert_eq!(clock.advanced(1_300, true), Some(300));
        // The next advance closes the gap that opened at the last one.
        assert_eq!(clock.advanced(2_300, false), Some(1_000));
        // Nothing waited after that: the time until new work arrives is not a gap.
        assert_eq!(clock.advanced(9_000, false), None);
        clock.work_waiting(10_000);
        assert_eq!(clock.advanced(10_050, false), Some(50));
        // A replica that stops leading forgets its open gap.
        clock.work_waiting(20_000);
        clock.forget();
        assert_eq!(clock.advanced(90_000, true), None);
        assert!(clock.is_open());
        // A clock read out of order never reports a negative gap.
        assert_eq!(clock.advanced(80_000, false), Some(0));
    }

    #[test]
    fn commit_gap_histogram_exports_buckets_and_the_maximum() {
        let metrics = ShardMetrics::new(2);
        metrics.commit_gap.record(20); // <= 20 µs: the first bucket
        metrics.commit_gap.record(700); // <= 1 ms
        metrics.commit_gap.record(3_000_000); // over 1 s
        metrics.commit_gap.record(400); // the maximum stays
        assert_eq!(metrics.commit_gap.max_us(), 3_000_000);
        let buckets = metrics.commit_gap.buckets();
        assert_eq!(buckets.iter().sum::<u64>(), 4);
        assert_eq!(buckets[0], 1);
        assert_eq!(buckets[COMMIT_GAP_BUCKETS_US.len()], 1);
        let mut out = String::new();
        metrics.render(&mut out);
        for line in [
            "# TYPE percore_commit_gap_us histogram",
            "percore_commit_gap_us_bucket{shard=\"2\",le=\"20\"} 1",
            "percore_commit_gap_us_bucket{shard=\"2\",le=\"500\"} 2",
            "percore_commit_gap_us_bucket{shard=\"2\",le=\"1000\"} 3",
            "percore_commit_gap_us_bucket{shard=\"2\",le=\"1000000\"} 3",
            "percore_commit_gap_us_bucket{shard=\"2\",le=\"+Inf\"} 4",
            "percore_commit_gap_us_count{shard=\"2\"} 4",
            "percore_commit_gap_max_us{shard=\"2\"} 3000000",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }

    #[test]
    fn executor_lag_exports_under_its_own_names() {
        let metrics = ShardMetrics::new(1);
        metrics.executor_lag.record(40);
        metrics.executor_lag.record(1_500);
        let mut out = String::new();
        metrics.render(&mut out);
        for line in [
            "# TYPE percore_executor_lag_us histogram",
            "percore_executor_lag_us_bucket{shard=\"1\",le=\"50\"} 1",
            "percore_executor_lag_us_bucket{shard=\"1\",le=\"2000\"} 2",
            "percore_executor_lag_us_count{shard=\"1\"} 2",
            "percore_executor_lag_max_us{shard=\"1\"} 1500",
            // The commit gaps are not touched.
            "percore_commit_gap_us_count{shard=\"1\"} 0",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
    }

    #[test]
    fn endpoint_serves_prometheus_text() {
        let metrics = Arc::new(ShardMetrics::new(1));
        ShardMetrics::add(&metrics.tx_applied_total, 42);
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, handle) =
            serve("127.0.0.1:0".parse().unwrap(), vec![metrics], stop.clone()).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("percore_tx_applied_total{shard=\"1\"} 42"),
            "{response}"
        );
        assert!(
            response.contains("# TYPE percore_commit_op gauge"),
            "{response}"
        );
    }
}
