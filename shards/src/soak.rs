//! Long-run (soak) observation of a local cluster under `percore bench --series`.
//!
//! Owns the sampling loop that replaces the plain measurement sleep: every
//! [`SERIES_INTERVAL_MS`] it records one [`SeriesPoint`] (committed tx/s from the leaders'
//! `percore_tx_applied_total`, the client latency of that second, each node's RSS from
//! `/proc/<pid>/status`, pool high-water marks, and the commit gaps the leaders measured
//! themselves) and prints a progress line on stderr. It also draws the series as an SVG,
//! and hands each point to a [`SeriesSink`] as it is taken (`--series-out`, and the plot
//! redrawn while the run goes on), so that a run cut short keeps what it measured. It
//! never drives load and never touches the children beyond reading their metrics and
//! `/proc`.
//!
//! Two commit-gap measures, kept apart in the report:
//! - **in-node** (the one to judge a shard by): each leader's `percore_commit_gap_us`
//!   histogram, the time between advances of its commit point while work waited to commit,
//!   measured on the node at microsecond resolution. Read per second from the bucket deltas,
//!   so a gap is known to bucket resolution ("at most" the bucket's bound, or the leader's
//!   `percore_commit_gap_max_us` when that is lower). A gap is recorded when it ends, so a
//!   leader that never commits again records nothing:
//! - **sampled**: every [`SAMPLE_INTERVAL_MS`] the loop also reads each leader's
//!   `percore_commit_op`; the longest stretch without it advancing catches that stuck leader,
//!   at [`SAMPLE_INTERVAL_MS`] resolution. It cannot tell waiting work from idleness, so under
//!   a light `--rate` it also counts stretches with nothing to commit.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use plotters::coord::ranged1d::Ranged;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cluster::{self, ClusterError, LocalCluster};
use crate::loadgen::{BenchError, LatencyRow};
use crate::metrics::{COMMIT_GAP_BUCKETS_US, LATENCY_BUCKETS_US};

/// How often the leaders' commit ops are sampled (the sampled commit gap's resolution).
pub const SAMPLE_INTERVAL_MS: u64 = 100;
/// Series points between two drawings of a run's plot while the run goes on
/// ([`SeriesSink`]): a 600-point plot takes milliseconds to draw.
pub const PLOT_REDRAW_POINTS: usize = 30;
/// In-node commit gaps longer than this (µs) are counted separately: under load a shard
/// should commit at least this often.
pub const COMMIT_GAP_GOAL_US: u64 = 1_000;
/// Journal group commits (write and `fdatasync`) slower than this (µs) are counted
/// separately: the disk's share of a slow second.
pub const JOURNAL_COMMIT_SLOW_US: u64 = 5_000;
const _: () = assert!(is_bound(&LATENCY_BUCKETS_US, JOURNAL_COMMIT_SLOW_US));
/// Buckets of the exported latency histograms (the last is the overflow bucket).
const LATENCY_BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;
/// Buckets of the exported commit-gap histogram (the last is the overflow bucket).
const GAP_BUCKETS: usize = COMMIT_GAP_BUCKETS_US.len() + 1;
const _: () = assert!(is_bound(&COMMIT_GAP_BUCKETS_US, COMMIT_GAP_GOAL_US));

/// Whether `us` is one of `bounds` (counts over it are then whole buckets).
const fn is_bound(bounds: &[u64], us: u64) -> bool {
    let mut index = 0;
    while index < bounds.len() {
        if bounds[index] == us {
            return true;
        }
        index += 1;
    }
    false
}

/// What a histogram with bucket upper bounds `bounds` (plus an overflow bucket) counted
/// between a scrape whose cumulative buckets were `before` and one where they were
/// `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BucketDeltas {
    /// Observations in all.
    total: u64,
    /// Of those, observations over `over_us` (a bound of `bounds`).
    over: u64,
    /// The highest bucket that counted one; `None` without observations.
    highest: Option<usize>,
}

impl BucketDeltas {
    fn between(bounds: &[u64], before: &[u64], after: &[u64], over_us: u64) -> Self {
        debug_assert_eq!(before.len(), bounds.len() + 1);
        debug_assert_eq!(after.len(), bounds.len() + 1);
        let cumulative = |index: usize| after[index].saturating_sub(before[index]);
        let in_bucket = |index: usize| {
            let below = index.checked_sub(1).map_or(0, cumulative);
            cumulative(index).saturating_sub(below)
        };
        let over_index = bounds
            .iter()
            .position(|&bound| bound == over_us)
            .expect("the threshold is a bucket bound");
        let total = cumulative(bounds.len());
        Self {
            total,
            over: total.saturating_sub(cumulative(over_index)),
            highest: (0..=bounds.len()).rev().find(|&index| in_bucket(index) > 0),
        }
    }
}
/// One series point per this many milliseconds.
pub const SERIES_INTERVAL_MS: u64 = 1_000;
/// Samples per series point.
const SAMPLES_PER_POINT: u64 = SERIES_INTERVAL_MS / SAMPLE_INTERVAL_MS;
const _: () = assert!(SERIES_INTERVAL_MS.is_multiple_of(SAMPLE_INTERVAL_MS));
/// Share of the run (percent) treated as warm-up when measuring RSS growth.
pub const RSS_WARMUP_PERCENT: usize = 20;
/// Further scrapes of a series point after a failed one.
const SCRAPE_RETRIES: u32 = 3;
/// Pause before each of those (ms).
const SCRAPE_RETRY_MS: u64 = 20;
/// Width and height of the SVG (pixels).
const PLOT_WIDTH_PX: u32 = 1_200;
/// See [`PLOT_WIDTH_PX`].
const PLOT_HEIGHT_PX: u32 = 1_200;

/// What one second of the run looked like. Read back by `percore series`
/// ([`crate::series_report`]): fields added after the first series files default when
/// absent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Seconds since the measurement window started, at the end of this point.
    pub t_s: f64,
    /// Transfers the group leaders applied during this second, per second.
    pub committed_tx_per_s: f64,
    /// Client request latency of the replies received in this second (µs; zeros if none).
    pub latency_us: LatencyRow,
    /// Replies received in this second.
    pub requests: u64,
    /// Resident set size of each replica (KiB, `VmRSS`; 0 if it could not be read).
    pub rss_kib: Vec<u64>,
    /// Per replica, the largest `percore_pool_transactions_high_water` of its shards.
    pub pool_transactions_high_water: Vec<u64>,
    /// Per replica, the largest `percore_pool_batches_high_water` of its shards.
    pub pool_batches_high_water: Vec<u64>,
    /// In-node commit gaps the group leaders recorded in this second, all groups.
    pub commit_gaps: u64,
    /// The longest of them, at most this many µs ([`CommitGaps::longest_at_most_us`]);
    /// `None` when none was recorded (no work waited to commit).
    pub longest_commit_gap_at_most_us: Option<u64>,
    /// Journal group commits (write and `fdatasync`) in this second, every replica's.
    #[serde(default)]
    pub journal_commits: JournalCommits,
    /// What the checkpoints did in this second, every replica's: which seconds a snapshot
    /// write or a release of old files overlapped, to tell a slow second's cause.
    #[serde(default)]
    pub checkpointing: Checkpointing,
    /// Executor lag in this second, every replica's shards (`percore_executor_lag_us`):
    /// probe wake-ups (`--executor-probe-us` apart) and how late the latest came; a stall
    /// of a shard's executor shows here, the disk's does not.
    #[serde(default)]
    pub executor_lag: ExecutorLag,
    /// Time this machine's CPUs were held back by the host or waited on I/O in this second
    /// (`/proc/stat`): tells a stall the host caused from one the node caused.
    #[serde(default)]
    pub cpu: CpuStolen,
}

/// Wake-ups of the shards' executor lag probes between two scrapes
/// (`percore_executor_lag_us`), every replica's shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorLag {
    /// Probe wake-ups recorded (about one per shard per `--executor-probe-us`).
    pub wakeups: u64,
    /// Of those, wake-ups more than [`COMMIT_GAP_GOAL_US`] late: the executor stalled
    /// that long.
    pub late_over_goal: u64,
    /// The latest, at most this many µs (bucket resolution, as
    /// [`CommitGaps::longest_at_most_us`]); `None` when none was recorded.
    pub longest_at_most_us: Option<u64>,
}

impl From<CommitGaps> for ExecutorLag {
    fn from(gaps: CommitGaps) -> Self {
        Self {
            wakeups: gaps.gaps,
            late_over_goal: gaps.over_goal,
            longest_at_most_us: gaps.longest_at_most_us,
        }
    }
}

/// What `/proc/stat` says the CPUs lost between two readings, in ms (at the kernel's
/// clock-tick resolution, 10 ms per CPU on most machines).
///
/// *Steal* is time a virtual CPU was runnable but the hypervisor ran something else: a
/// shard's executor late with steal on its CPU was held back by the host, not by the node.
/// *I/O wait* is idle time with I/O outstanding (only a hint: the kernel counts it per CPU
/// loosely).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuStolen {
    /// Steal summed over every CPU.
    pub steal_ms: u64,
    /// The most steal on any one CPU.
    pub steal_ms_cpu_max: u64,
    /// That CPU (`None` when no CPU had any).
    pub steal_cpu: Option<u32>,
    /// I/O wait summed over every CPU.
    pub iowait_ms: u64,
}

/// Cumulative per-CPU times from one reading of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// `(cpu, steal ticks, iowait ticks)` per `cpuN` line.
    cpus: Vec<(u32, u64, u64)>,
    /// Clock ticks per second the counters are in.
    ticks_per_s: u64,
}

impl CpuTimes {
    /// Reads `/proc/stat`; empty when it cannot be read (the series then shows no loss).
    pub fn read() -> Self {
        let ticks_per_s = rustix::param::clock_ticks_per_second();
        std::fs::read_to_string("/proc/stat")
            .map(|text| Self::parse(&text, ticks_per_s))
            .unwrap_or_default()
    }

    /// Parses the `cpuN user nice system idle iowait irq softirq steal ...` lines (the
    /// summary `cpu` line and malformed lines are skipped).
    pub fn parse(text: &str, ticks_per_s: u64) -> Self {
        let cpus = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_ascii_whitespace();
                let cpu = fields.next()?.strip_prefix("cpu")?.parse::<u32>().ok()?;
                let times: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
                (times.len() == 8).then(|| (cpu, times[7], times[4]))
            })
            .collect();
        Self { cpus, ticks_per_s }
    }

    /// What the CPUs lost from `before` to `self` (CPUs in only one reading are skipped).
    pub fn since(&self, before: &Self) -> CpuStolen {
        let ms = |ticks: u64| ticks * 1_000 / self.ticks_per_s.max(1);
        let mut stolen = CpuStolen::default();
        for &(cpu, steal, iowait) in &self.cpus {
            let Some(&(_, steal_before, iowait_before)) =
                before.cpus.iter().find(|(c, _, _)| *c == cpu)
            else {
                continue;
            };
            let steal_ms = ms(steal.saturating_sub(steal_before));
            stolen.steal_ms += steal_ms;
            stolen.iowait_ms += ms(iowait.saturating_sub(iowait_before));
            if steal_ms > stolen.steal_ms_cpu_max {
                stolen.steal_ms_cpu_max = steal_ms;
                stolen.steal_cpu = Some(cpu);
            }
        }
        stolen
    }
}

/// Checkpoint work between two scrapes, summed over every replica and shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpointing {
    /// Checkpoints recorded in a superblock (`percore_checkpoints_total`).
    pub installed: u64,
    /// Time followers spent writing snapshot files (`percore_checkpoint_write_us_total`,
    /// ms; several followers writing at once add up, so it can exceed the interval).
    pub snapshot_write_ms: u64,
    /// Time followers spent removing released segments and stale snapshots
    /// (`percore_checkpoint_release_us_total`, ms, likewise).
    pub release_ms: u64,
    /// Journal roll-overs onto a reused (released) segment
    /// (`percore_journal_segment_switches_recycled_total`).
    pub segment_switches_reused: u64,
}

/// The cumulative counters behind [`Checkpointing`], as one scrape read them.
#[derive(Debug, Clone, Copy, Default)]
struct CheckpointCounters {
    installed: u64,
    snapshot_write_us: u64,
    release_us: u64,
    segment_switches_reused: u64,
}

impl Checkpointing {
    fn between(before: &Scrape, after: &Scrape) -> Self {
        let (before, after) = (&before.checkpointing, &after.checkpointing);
        Self {
            installed: after.installed.saturating_sub(before.installed),
            snapshot_write_ms: after
                .snapshot_write_us
                .saturating_sub(before.snapshot_write_us)
                / 1_000,
            release_ms: after.release_us.saturating_sub(before.release_us) / 1_000,
            segment_switches_reused: after
                .segment_switches_reused
                .saturating_sub(before.segment_switches_reused),
        }
    }

    /// Whether anything happened.
    fn any(&self) -> bool {
        *self != Self::default()
    }
}

/// The series and what it says about a long run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// One point per second of the window.
    pub series: Vec<SeriesPoint>,
    /// Per replica, RSS growth (percent) from the first point after the warm-up share
    /// ([`RSS_WARMUP_PERCENT`] of the points) to the last point.
    pub rss_growth_percent: Vec<f64>,
    /// In-node: the longest time between advances of a group leader's commit point while
    /// work waited to commit, over the window, at most this many µs (bucket resolution, see
    /// [`CommitGaps::longest_at_most_us`]); `None` if no gap was recorded.
    pub longest_commit_gap_at_most_us: Option<u64>,
    /// In-node commit gaps the group leaders recorded over the window.
    pub commit_gaps: u64,
    /// Of those, gaps longer than [`Self::commit_gap_goal_us`].
    pub commit_gaps_over_goal: u64,
    /// [`COMMIT_GAP_GOAL_US`].
    pub commit_gap_goal_us: u64,
    /// Sampled: the longest time (ms) any group leader's `percore_commit_op` did not advance
    /// during the window, idle or not: between the samples that saw it advance, so an upper
    /// bound at [`SAMPLE_INTERVAL_MS`] resolution (a steady stream reads as one interval).
    /// It catches a leader that stops committing, which the in-node histogram cannot.
    pub longest_commit_gap_sampled_ms: u64,
    /// Journal group commits over the window, every replica's.
    pub journal_commits: JournalCommits,
    /// Checkpoint work over the window, every replica's.
    pub checkpointing: Checkpointing,
    /// Executor lag over the window, every replica's shards: wake-ups of the lag probe,
    /// how many came more than [`COMMIT_GAP_GOAL_US`] late, and the latest at most.
    pub executor_lag: ExecutorLag,
    /// What the CPUs lost over the window: steal and I/O wait summed over every CPU, and
    /// the most steal of one CPU in one second ([`SeriesPoint::cpu`]) with that CPU.
    pub cpu: CpuStolen,
    /// Committed ops applied over the window, every replica's, and how many of them a
    /// leader applied while its next group commit was in flight.
    pub applies: Applies,
    /// Per replica, bytes backed by transparent huge pages at the end (`AnonHugePages`:
    /// the state machine tables where the kernel honoured the advice, `crate::hugepages`;
    /// 0 if it could not be read).
    pub huge_pages_bytes: Vec<u64>,
    /// Client request latency p999 over the whole run (µs).
    pub p999_us: u64,
    /// Scrapes that failed and were skipped or retried.
    pub scrape_failures: u64,
}

/// `VmRSS` of process `pid` in KiB, `None` if it cannot be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::hugepages::kib_field(&status, "VmRSS:")
}

/// Percentiles of `histogram` (zeros when empty).
pub fn latency_row(histogram: &Histogram<u64>) -> LatencyRow {
    if histogram.is_empty() {
        return LatencyRow {
            p50: 0,
            p99: 0,
            p999: 0,
            max: 0,
        };
    }
    LatencyRow {
        p50: histogram.value_at_quantile(0.50),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
    }
}

/// Follows each shard's commit op and remembers the longest stretch without an advance.
#[derive(Debug)]
pub struct CommitGapTracker {
    last_op: Vec<u64>,
    last_advance: Vec<Instant>,
    longest: Duration,
}

impl CommitGapTracker {
    /// Starts following `shards` shards whose commit ops are `ops`, at `now`.
    pub fn new(ops: Vec<u64>, now: Instant) -> Self {
        Self {
            last_advance: vec![now; ops.len()],
            last_op: ops,
            longest: Duration::ZERO,
        }
    }

    /// Records the commit ops sampled at `now`.
    pub fn sample(&mut self, ops: &[u64], now: Instant) {
        debug_assert_eq!(ops.len(), self.last_op.len());
        for (shard, &op) in ops.iter().enumerate() {
            // From the sample that last saw the op advance to this one: an upper bound of
            // the stall (so a steady stream reads as one sample interval). Stretches still
            // open count too, so a commit that never comes is a gap as well.
            let stretch = now.saturating_duration_since(self.last_advance[shard]);
            self.longest = self.longest.max(stretch);
            if op > self.last_op[shard] {
                self.last_op[shard] = op;
                self.last_advance[shard] = now;
            }
        }
    }

    /// The longest stretch seen so far.
    pub fn longest(&self) -> Duration {
        self.longest
    }
}

/// In-node commit gaps of one or more leaders between two scrapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitGaps {
    /// Gaps recorded.
    pub gaps: u64,
    /// Of those, gaps longer than [`COMMIT_GAP_GOAL_US`].
    pub over_goal: u64,
    /// The longest, at most this many µs: the upper bound of the highest bucket that
    /// counted a gap, or the leader's maximum since start when that is lower (then exact:
    /// the maximum rose between the scrapes); for the overflow bucket, that maximum. `None`
    /// when no gap was recorded.
    pub longest_at_most_us: Option<u64>,
}

impl CommitGaps {
    /// The gaps one leader recorded between a scrape whose cumulative
    /// `percore_commit_gap_us` buckets were `before` and one where they were `after` and
    /// its `percore_commit_gap_max_us` was `max_us`.
    pub fn between(before: &[u64], after: &[u64], max_us: u64) -> Self {
        let deltas =
            BucketDeltas::between(&COMMIT_GAP_BUCKETS_US, before, after, COMMIT_GAP_GOAL_US);
        let longest_at_most_us = deltas.highest.map(|index| {
            let lower = index.checked_sub(1).map_or(0, |i| COMMIT_GAP_BUCKETS_US[i]);
            let upper = COMMIT_GAP_BUCKETS_US.get(index).copied();
            match upper {
                // The maximum bounds every gap counted (metrics.rs orders the writes).
                Some(upper) if max_us > lower => upper.min(max_us),
                Some(upper) => upper,
                None => max_us,
            }
        });
        Self {
            gaps: deltas.total,
            over_goal: deltas.over,
            longest_at_most_us,
        }
    }

    /// Both sets together (several leaders).
    pub fn merge(self, other: Self) -> Self {
        Self {
            gaps: self.gaps + other.gaps,
            over_goal: self.over_goal + other.over_goal,
            longest_at_most_us: self.longest_at_most_us.max(other.longest_at_most_us),
        }
    }
}

/// Journal group commits (write and `fdatasync`, `percore_journal_commit_seconds`) of one or
/// more journals between two scrapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCommits {
    /// Group commits.
    pub commits: u64,
    /// Of those, commits slower than [`JOURNAL_COMMIT_SLOW_US`].
    pub slow: u64,
    /// The slowest, at most this many µs (the upper bound of the highest bucket that counted
    /// one; the overflow bucket reports its lower bound, 2 s: see `slowest_over_bounds`);
    /// `None` without commits.
    pub slowest_at_most_us: Option<u64>,
    /// The slowest was slower than the last bucket's bound (2 s): `slowest_at_most_us` is
    /// then a lower bound.
    pub slowest_over_bounds: bool,
}

impl JournalCommits {
    /// The commits of one journal between a scrape whose cumulative buckets were `before`
    /// and one where they were `after`.
    pub fn between(before: &[u64], after: &[u64]) -> Self {
        let deltas =
            BucketDeltas::between(&LATENCY_BUCKETS_US, before, after, JOURNAL_COMMIT_SLOW_US);
        Self {
            commits: deltas.total,
            slow: deltas.over,
            slowest_at_most_us: deltas
                .highest
                .map(|index| LATENCY_BUCKETS_US[index.min(LATENCY_BUCKETS_US.len() - 1)]),
            slowest_over_bounds: deltas
                .highest
                .is_some_and(|index| index >= LATENCY_BUCKETS_US.len()),
        }
    }

    /// The slowest commit as text: `<=N µs`, `>N µs` past the last bound, `-` without any.
    pub fn slowest_text(&self) -> String {
        match (self.slowest_at_most_us, self.slowest_over_bounds) {
            (Some(us), true) => format!(">{us} µs"),
            (at_most, _) => gap_text(at_most),
        }
    }

    /// Both sets together (several journals).
    pub fn merge(self, other: Self) -> Self {
        Self {
            commits: self.commits + other.commits,
            slow: self.slow + other.slow,
            slowest_at_most_us: self.slowest_at_most_us.max(other.slowest_at_most_us),
            slowest_over_bounds: self.slowest_over_bounds || other.slowest_over_bounds,
        }
    }
}

/// Committed ops applied (`percore_apply_seconds_count`) between two scrapes, every replica's,
/// and of those the ones a leader applied while its next group commit was in flight
/// (`percore_replication_applied_during_write_total`): applies taken out of the leader's
/// write cycle while requests queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Applies {
    /// Ops applied.
    pub ops: u64,
    /// Of those, applied by a leader during its next write.
    pub during_write: u64,
}

impl Applies {
    fn between(before: &Scrape, after: &Scrape) -> Self {
        Self {
            ops: after.applies.ops.saturating_sub(before.applies.ops),
            during_write: after
                .applies
                .during_write
                .saturating_sub(before.applies.during_write),
        }
    }
}

/// The journal commits of every journal between two scrapes.
fn journal_commits(before: &Scrape, after: &Scrape) -> JournalCommits {
    before
        .journal_commit_buckets
        .iter()
        .zip(&after.journal_commit_buckets)
        .map(|(before, after)| JournalCommits::between(before, after))
        .fold(JournalCommits::default(), JournalCommits::merge)
}

/// The in-node commit gaps of every leader between two scrapes.
fn commit_gaps(before: &Scrape, after: &Scrape) -> CommitGaps {
    (0..after.commit_gap_buckets.len())
        .map(|shard| {
            CommitGaps::between(
                &before.commit_gap_buckets[shard],
                &after.commit_gap_buckets[shard],
                after.commit_gap_max_us[shard],
            )
        })
        .fold(CommitGaps::default(), CommitGaps::merge)
}

/// The executor lag of every replica's shards between two scrapes.
fn executor_lag(before: &Scrape, after: &Scrape) -> ExecutorLag {
    before
        .executor_lag
        .iter()
        .zip(&after.executor_lag)
        .map(|((before, _), (after, max_us))| CommitGaps::between(before, after, *max_us))
        .fold(CommitGaps::default(), CommitGaps::merge)
        .into()
}

/// RSS growth (percent) per replica from the first point after the warm-up share to the
/// last point; empty if there are no points.
pub fn rss_growth_percent(series: &[SeriesPoint]) -> Vec<f64> {
    let Some(last) = series.last() else {
        return Vec::new();
    };
    let first = &series[(series.len() * RSS_WARMUP_PERCENT / 100).min(series.len() - 1)];
    first
        .rss_kib
        .iter()
        .zip(&last.rss_kib)
        .map(|(&base, &end)| {
            if base == 0 {
                0.0
            } else {
                (end as f64 - base as f64) * 100.0 / base as f64
            }
        })
        .collect()
}

/// Commit ops (the furthest replica's) and client records applied (summed over replicas:
/// only a leader counts its own), per shard, plus each replica's pool high-water marks,
/// from one scrape of every replica.
struct Scrape {
    commit_op: Vec<u64>,
    applied: Vec<u64>,
    pool_transactions_high_water: Vec<u64>,
    pool_batches_high_water: Vec<u64>,
    /// Per shard, the cumulative `percore_commit_gap_us` buckets summed over the replicas
    /// (only a leader records gaps, so a leader change loses none).
    commit_gap_buckets: Vec<Vec<u64>>,
    /// Per shard, the longest `percore_commit_gap_max_us` of any replica.
    commit_gap_max_us: Vec<u64>,
    /// Per replica and shard (replica-major), the cumulative `percore_executor_lag_us`
    /// buckets and `percore_executor_lag_max_us`.
    executor_lag: Vec<(Vec<u64>, u64)>,
    /// Per replica and shard (replica-major), the cumulative `percore_journal_commit_seconds`
    /// buckets.
    journal_commit_buckets: Vec<Vec<u64>>,
    /// Cumulative applies, every replica and shard.
    applies: Applies,
    /// Cumulative checkpoint counters, every replica and shard.
    checkpointing: CheckpointCounters,
}

/// `read(text, shard)` for every shard of every replica's scrape, replica-major.
fn per_replica_and_shard<T>(
    texts: &[String],
    shards: usize,
    read: impl Fn(&str, usize) -> T,
) -> Vec<T> {
    let read = &read;
    texts
        .iter()
        .flat_map(|text| (0..shards).map(move |shard| read(text, shard)))
        .collect()
}

fn scrape(cluster: &LocalCluster) -> Result<Scrape, BenchError> {
    let texts = (0..cluster.replicas())
        .map(|replica| cluster.scrape(replica))
        .collect::<Result<Vec<String>, ClusterError>>()?;
    let shards = cluster.shards();
    // Whoever leads a group now: what only leaders count is summed over the replicas
    // (a leader change between two samples loses nothing), and positions take the maximum.
    let over_replicas = |name: &str, fold: fn(u64, u64) -> u64| -> Vec<u64> {
        (0..shards)
            .map(|shard| {
                texts
                    .iter()
                    .map(|text| cluster::shard_metric(text, name, shard))
                    .fold(0, fold)
            })
            .collect()
    };
    let sum = |a: u64, b: u64| a + b;
    let per_replica_max = |name: &str| -> Vec<u64> {
        texts
            .iter()
            .map(|text| {
                (0..shards)
                    .map(|shard| cluster::shard_metric(text, name, shard))
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    };
    let commit_gap_buckets = (0..shards)
        .map(|shard| {
            let mut buckets = vec![0; GAP_BUCKETS];
            for text in &texts {
                let replica = cluster::histogram_buckets_sized(
                    text,
                    "percore_commit_gap_us",
                    shard,
                    GAP_BUCKETS,
                );
                for (total, count) in buckets.iter_mut().zip(replica) {
                    *total += count;
                }
            }
            buckets
        })
        .collect();
    let journal_commit_buckets = per_replica_and_shard(&texts, shards, |text, shard| {
        cluster::histogram_buckets_sized(
            text,
            "percore_journal_commit_seconds",
            shard,
            LATENCY_BUCKETS,
        )
    });
    let executor_lag = per_replica_and_shard(&texts, shards, |text, shard| {
        (
            cluster::histogram_buckets_sized(text, "percore_executor_lag_us", shard, GAP_BUCKETS),
            cluster::shard_metric(text, "percore_executor_lag_max_us", shard),
        )
    });
    let over_all = |name: &str| -> u64 {
        texts
            .iter()
            .map(|text| cluster::metric_sum(text, name, shards))
            .sum()
    };
    Ok(Scrape {
        journal_commit_buckets,
        executor_lag,
        applies: Applies {
            ops: over_all("percore_apply_seconds_count"),
            during_write: over_all("percore_replication_applied_during_write_total"),
        },
        checkpointing: CheckpointCounters {
            installed: over_all("percore_checkpoints_total"),
            snapshot_write_us: over_all("percore_checkpoint_write_us_total"),
            release_us: over_all("percore_checkpoint_release_us_total"),
            segment_switches_reused: over_all("percore_journal_segment_switches_recycled_total"),
        },
        commit_op: over_replicas("percore_commit_op", u64::max),
        applied: over_replicas("percore_tx_applied_total", sum),
        commit_gap_buckets,
        commit_gap_max_us: over_replicas("percore_commit_gap_max_us", u64::max),
        pool_transactions_high_water: per_replica_max("percore_pool_transactions_high_water"),
        pool_batches_high_water: per_replica_max("percore_pool_batches_high_water"),
    })
}

/// Scrapes again up to [`SCRAPE_RETRIES`] times, [`SCRAPE_RETRY_MS`] apart.
fn scrape_retrying(cluster: &LocalCluster, failures: &mut u64) -> Result<Scrape, BenchError> {
    let mut attempt = 0;
    loop {
        std::thread::sleep(Duration::from_millis(SCRAPE_RETRY_MS));
        match scrape(cluster) {
            Ok(sample) => return Ok(sample),
            Err(error) if attempt + 1 >= SCRAPE_RETRIES => return Err(error),
            Err(_) => {
                *failures += 1;
                attempt += 1;
            }
        }
    }
}

/// Samples `cluster` for `duration` while load runs. `take_latency` hands over (and
/// resets) the client latency recorded since its last call; `sink` gets the series after
/// each new point. Returns when the window started and what was seen; the caller adds
/// [`SoakReport::p999_us`].
pub fn sample_window(
    cluster: &LocalCluster,
    duration: Duration,
    mut take_latency: impl FnMut() -> Histogram<u64>,
    sink: &mut SeriesSink,
) -> Result<(Instant, SoakReport), BenchError> {
    let first = scrape(cluster)?;
    let cpu_first = CpuTimes::read();
    let mut cpu_before = cpu_first.clone();
    take_latency();
    let started = Instant::now();
    let mut gaps = CommitGapTracker::new(first.commit_op.clone(), started);
    let mut applied_before: u64 = first.applied.iter().sum();
    let mut point_started = started;
    let mut series = Vec::with_capacity(duration.as_secs() as usize);
    let mut scrape_failures = 0;
    let ticks = duration.as_millis() as u64 / SAMPLE_INTERVAL_MS;
    // The last point's scrape, for the in-node gaps of the next point and of the run.
    let mut point_scrape: Option<Scrape> = None;
    for tick in 1..=ticks {
        let due = started + Duration::from_millis(tick * SAMPLE_INTERVAL_MS);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let point_due = tick.is_multiple_of(SAMPLES_PER_POINT);
        // A busy metrics endpoint may drop one scrape: a sample of the commit ops is
        // skipped (the sampled gap then spans it), a series point is retried.
        let sample = match scrape(cluster) {
            Ok(sample) => sample,
            Err(_) if !point_due => {
                scrape_failures += 1;
                continue;
            }
            Err(_) => {
                scrape_failures += 1;
                scrape_retrying(cluster, &mut scrape_failures)?
            }
        };
        let now = Instant::now();
        gaps.sample(&sample.commit_op, now);
        if !point_due {
            continue;
        }
        let applied: u64 = sample.applied.iter().sum();
        let latency = take_latency();
        let point_gaps = commit_gaps(point_scrape.as_ref().unwrap_or(&first), &sample);
        let cpu_now = CpuTimes::read();
        let point = SeriesPoint {
            t_s: now.duration_since(started).as_secs_f64(),
            committed_tx_per_s: applied.saturating_sub(applied_before) as f64
                / now.duration_since(point_started).as_secs_f64(),
            latency_us: latency_row(&latency),
            requests: latency.len(),
            rss_kib: (0..cluster.replicas())
                .map(|replica| cluster.pid(replica).and_then(rss_kib).unwrap_or(0))
                .collect(),
            pool_transactions_high_water: sample.pool_transactions_high_water.clone(),
            pool_batches_high_water: sample.pool_batches_high_water.clone(),
            commit_gaps: point_gaps.gaps,
            longest_commit_gap_at_most_us: point_gaps.longest_at_most_us,
            journal_commits: journal_commits(point_scrape.as_ref().unwrap_or(&first), &sample),
            checkpointing: Checkpointing::between(point_scrape.as_ref().unwrap_or(&first), &sample),
            executor_lag: executor_lag(point_scrape.as_ref().unwrap_or(&first), &sample),
            cpu: cpu_now.since(&cpu_before),
        };
        print_progress(&point, gaps.longest());
        series.push(point);
        sink.point(&series);
        applied_before = applied;
        point_started = now;
        point_scrape = Some(sample);
        cpu_before = cpu_now;
    }
    let mut cpu = cpu_before.since(&cpu_first);
    // The run's worst CPU is the worst one-second reading, not the most over the window.
    if let Some(worst) = series.iter().max_by_key(|point| point.cpu.steal_ms_cpu_max) {
        cpu.steal_ms_cpu_max = worst.cpu.steal_ms_cpu_max;
        cpu.steal_cpu = worst.cpu.steal_cpu;
    }
    let run_gaps = commit_gaps(&first, point_scrape.as_ref().unwrap_or(&first));
    Ok((
        started,
        SoakReport {
            rss_growth_percent: rss_growth_percent(&series),
            series,
            longest_commit_gap_at_most_us: run_gaps.longest_at_most_us,
            commit_gaps: run_gaps.gaps,
            commit_gaps_over_goal: run_gaps.over_goal,
            commit_gap_goal_us: COMMIT_GAP_GOAL_US,
            longest_commit_gap_sampled_ms: gaps.longest().as_millis() as u64,
            journal_commits: journal_commits(&first, point_scrape.as_ref().unwrap_or(&first)),
            applies: Applies::between(&first, point_scrape.as_ref().unwrap_or(&first)),
            checkpointing: Checkpointing::between(&first, point_scrape.as_ref().unwrap_or(&first)),
            executor_lag: executor_lag(&first, point_scrape.as_ref().unwrap_or(&first)),
            cpu,
            huge_pages_bytes: (0..cluster.replicas())
                .map(|replica| {
                    cluster
                        .pid(replica)
                        .and_then(crate::hugepages::anon_huge_bytes_of)
                        .unwrap_or(0)
                })
                .collect(),
            p999_us: 0,
            scrape_failures,
        },
    ))
}

/// "≤N µs" for a longest gap, "-" when there was none.
fn gap_text(at_most_us: Option<u64>) -> String {
    at_most_us.map_or_else(|| "-".to_string(), |us| format!("<={us} µs"))
}

fn print_progress(point: &SeriesPoint, sampled_gap: Duration) {
    let rss_mib: Vec<String> = point
        .rss_kib
        .iter()
        .map(|kib| format!("{:.0}", *kib as f64 / 1024.0))
        .collect();
    let checkpointing = if point.checkpointing.any() {
        let c = &point.checkpointing;
        format!(
            "  checkpoints +{} (snapshot write {} ms, release {} ms, reused segments +{})",
            c.installed, c.snapshot_write_ms, c.release_ms, c.segment_switches_reused
        )
    } else {
        String::new()
    };
    eprintln!(
        "  {:>6.1}s {:>10.0} tx/s  p50 {} p99 {} p999 {} max {} µs  rss MiB [{}]  pool hw tx {:?} batches {:?}  commit gap {} (sampled so far {} ms)  journal commit {}  executor lag {}  steal {} ms{checkpointing}",
        point.t_s,
        point.committed_tx_per_s,
        point.latency_us.p50,
        point.latency_us.p99,
        point.latency_us.p999,
        point.latency_us.max,
        rss_mib.join(" "),
        point.pool_transactions_high_water,
        point.pool_batches_high_water,
        gap_text(point.longest_commit_gap_at_most_us),
        sampled_gap.as_millis(),
        point.journal_commits.slowest_text(),
        gap_text(point.executor_lag.longest_at_most_us),
        point.cpu.steal_ms,
    );
}

/// The summary lines of a soak run.
pub fn summary_lines(report: &SoakReport) -> Vec<String> {
    let growth: Vec<String> = report
        .rss_growth_percent
        .iter()
        .enumerate()
        .map(|(replica, percent)| format!("replica {replica} {percent:+.1}%"))
        .collect();
    vec![
        format!(
            "RSS growth after warm-up (first {RSS_WARMUP_PERCENT}% excluded): {}",
            growth.join(", ")
        ),
        format!(
            "on transparent huge pages at the end (AnonHugePages, MiB per replica): {:?}",
            report
                .huge_pages_bytes
                .iter()
                .map(|bytes| bytes >> 20)
                .collect::<Vec<_>>()
        ),
        format!(
            "longest commit gap, in-node (leaders' percore_commit_gap_us, while work waited): {}; {} gaps, {} over {} µs",
            gap_text(report.longest_commit_gap_at_most_us),
            report.commit_gaps,
            report.commit_gaps_over_goal,
            report.commit_gap_goal_us
        ),
        format!(
            "longest commit gap, sampled (leaders' percore_commit_op every {SAMPLE_INTERVAL_MS} ms, idle time included): {} ms",
            report.longest_commit_gap_sampled_ms
        ),
        format!(
            "journal group commits (write + fdatasync, every replica): {}, {} over {} µs, slowest {}",
            report.journal_commits.commits,
            report.journal_commits.slow,
            JOURNAL_COMMIT_SLOW_US,
            report.journal_commits.slowest_text()
        ),
        format!(
            "checkpoints (every replica): {} recorded; followers writing snapshots {:.1} s, removing released files {:.1} s; roll-overs onto reused segments {}",
            report.checkpointing.installed,
            report.checkpointing.snapshot_write_ms as f64 / 1_000.0,
            report.checkpointing.release_ms as f64 / 1_000.0,
            report.checkpointing.segment_switches_reused
        ),
        format!(
            "executor lag (every replica's shards' lag probes): longest {}; {} of {} wake-ups over {} µs late",
            gap_text(report.executor_lag.longest_at_most_us),
            report.executor_lag.late_over_goal,
            report.executor_lag.wakeups,
            COMMIT_GAP_GOAL_US
        ),
        format!(
            "CPU time the host took (steal, /proc/stat, every CPU): {} ms over the run, at most {} ms of one CPU in one second{}; I/O wait {} ms",
            report.cpu.steal_ms,
            report.cpu.steal_ms_cpu_max,
            report
                .cpu
                .steal_cpu
                .map_or_else(String::new, |cpu| format!(" (CPU {cpu})")),
            report.cpu.iowait_ms
        ),
        format!(
            "committed ops applied (every replica): {}, {} of them by a leader while its next journal write was in flight",
            report.applies.ops, report.applies.during_write
        ),
        format!("request latency p999 over the run: {} µs", report.p999_us),
        crate::series_report::slow_causes_line(&report.series),
        format!(
            "metrics scrapes failed (skipped or retried): {}",
            report.scrape_failures
        ),
    ]
}

/// Plot failures (the backend's error, as text: plotters' error type is generic).
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    /// The SVG being written.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Draws TPS, latency percentiles with the longest in-node commit gap of each second (ms,
/// log scale) and RSS per replica (MiB) over time, the seconds with checkpoint work shaded
/// behind the first two, into an SVG at `path`: drawn into
/// `path` + `.tmp` and renamed over `path`, so a reader never sees half a plot.
pub fn plot_svg(path: &Path, series: &[SeriesPoint]) -> Result<(), PlotError> {
    let error = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    draw(&temporary, series).map_err(|e| error(e.to_string()))?;
    std::fs::rename(&temporary, path).map_err(|e| error(e.to_string()))
}

/// Where a run's series goes while the run goes on, so that a run cut short (killed, or
/// outliving the machine it runs on) keeps what it measured: each point appended to a
/// JSON-lines file as it is taken (`percore bench --series-out`), and the plot (`--plot`)
/// drawn every [`PLOT_REDRAW_POINTS`] points. The report and the final plot do not depend
/// on it: a failure to write is reported once on stderr and the run goes on.
#[derive(Debug, Default)]
pub struct SeriesSink {
    plot: Option<PathBuf>,
    lines: Option<(PathBuf, File)>,
    /// A write failed and was reported; later failures are not.
    failed: bool,
}

impl SeriesSink {
    /// A sink drawing `plot` and appending to `lines`, created (or truncated) now: a path
    /// that cannot be written fails here, before the run starts, with an error naming it.
    pub fn create(plot: Option<&Path>, lines: Option<&Path>) -> std::io::Result<Self> {
        let lines = lines
            .map(|path| match File::create(path) {
                Ok(file) => Ok((path.to_path_buf(), file)),
                Err(error) => Err(std::io::Error::new(
                    error.kind(),
                    format!("{}: {error}", path.display()),
                )),
            })
            .transpose()?;
        Ok(Self {
            plot: plot.map(Path::to_path_buf),
            lines,
            failed: false,
        })
    }

    /// Takes the series so far, its last point new: appends that point as one line (one
    /// `write`, so a reader sees whole lines) and draws the plot every
    /// [`PLOT_REDRAW_POINTS`] points.
    pub fn point(&mut self, series: &[SeriesPoint]) {
        let Some(last) = series.last() else { return };
        if let Some((path, file)) = &mut self.lines {
            let written = serde_json::to_string(last)
                .map_err(std::io::Error::from)
                .and_then(|mut line| {
                    line.push('\n');
                    file.write_all(line.as_bytes())
                });
            if let Err(error) = written {
                Self::report(&mut self.failed, &path.display(), &error);
            }
        }
        if series.len().is_multiple_of(PLOT_REDRAW_POINTS)
            && let Some(path) = &self.plot
            && let Err(error) = plot_svg(path, series)
        {
            Self::report(&mut self.failed, &path.display(), &error);
        }
    }

    fn report(failed: &mut bool, path: &impl std::fmt::Display, error: &dyn std::fmt::Display) {
        if !std::mem::replace(failed, true) {
            eprintln!("WARNING: the series so far could not be written to {path}: {error}");
        }
    }
}

/// Reads one percentile out of a [`LatencyRow`].
type PickPercentile = fn(&LatencyRow) -> u64;
/// Picks a per-second "at most" value of a point (`None`: nothing that second).
type PickAtMost = fn(&SeriesPoint) -> Option<u64>;

fn draw(path: &Path, series: &[SeriesPoint]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (PLOT_WIDTH_PX, PLOT_HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let t_max = series.last().map_or(1.0, |p| p.t_s).max(1.0);

    let tps_max = series
        .iter()
        .map(|p| p.committed_tx_per_s)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[0])
        .caption("committed tx/s (leaders)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..tps_max * 1.1)?;
    chart.configure_mesh().x_desc("s").draw()?;
    let shaded = shade_checkpoint_work(&mut chart, series, (0.0, tps_max * 1.1))?;
    chart
        .draw_series(LineSeries::new(
            series.iter().map(|p| (p.t_s, p.committed_tx_per_s)),
            &BLUE,
        ))?
        .label("committed tx/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    if shaded {
        legend(&mut chart)?;
    }

    let ms = |us: u64| (us.max(1) as f64) / 1_000.0;
    let latency_max = series
        .iter()
        .flat_map(|p| {
            [
                Some(p.latency_us.p999),
                p.longest_commit_gap_at_most_us,
                p.journal_commits.slowest_at_most_us,
                p.executor_lag.longest_at_most_us,
            ]
        })
        .flatten()
        .map(ms)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[1])
        .caption(
            "request latency, longest in-node commit gap, slowest journal commit and executor lag per second (ms, log)",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, (0.001..latency_max * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("s").draw()?;
    shade_checkpoint_work(&mut chart, series, (0.001, latency_max * 2.0))?;
    let percentiles: [(&str, PickPercentile, RGBColor); 3] = [
        ("p50", |l| l.p50, GREEN),
        ("p99", |l| l.p99, BLUE),
        ("p999", |l| l.p999, RED),
    ];
    // A second without a reply has no latency (not 1 µs): no point, as for the gaps below.
    for (name, pick, color) in percentiles {
        chart
            .draw_series(LineSeries::new(
                series
                    .iter()
                    .filter(|p| p.latency_us.max > 0)
                    .map(|p| (p.t_s, ms(pick(&p.latency_us)))),
                &color,
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    // Seconds without a value (no gap: nothing waited) have no point; the line joins the
    // others.
    let lines: [(&str, PickAtMost, RGBColor); 3] = [
        (
            "commit gap (in-node, at most)",
            |p| p.longest_commit_gap_at_most_us,
            MAGENTA,
        ),
        (
            "journal commit, write + fdatasync (slowest, at most)",
            |p| p.journal_commits.slowest_at_most_us,
            RGBColor(140, 90, 0),
        ),
        (
            "executor lag, shards' own stalls (latest wake-up, at most)",
            |p| p.executor_lag.longest_at_most_us,
            RGBColor(0, 150, 150),
        ),
    ];
    for (name, pick, color) in lines {
        chart
            .draw_series(LineSeries::new(
                series.iter().filter_map(|p| Some((p.t_s, ms(pick(p)?)))),
                &color,
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    legend(&mut chart)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss_max = series
        .iter()
        .flat_map(|p| p.rss_kib.iter().map(|&kib| mib(kib)))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("RSS per replica (MiB)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, 0.0..rss_max * 1.1)?;
    chart.configure_mesh().x_desc("s").draw()?;
    let replicas = series.first().map_or(0, |p| p.rss_kib.len());
    for replica in 0..replicas {
        let color = Palette99::pick(replica).to_rgba();
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|p| (p.t_s, mib(p.rss_kib[replica]))),
                color,
            ))?
            .label(format!("replica {replica}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Draws a panel's legend in its lower right corner (the lines run above it: throughput
/// and RSS near the top, latencies above a millisecond on a log scale from a microsecond).
fn legend<'a, 'b: 'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>,
) -> Result<(), Box<dyn std::error::Error>>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Shades, behind a panel's lines and from `y.0` to `y.1`, the seconds in which checkpoint
/// followers wrote snapshot files (orange) or removed released files (purple), both where
/// both; labels them for the legend. Returns whether any second was shaded.
fn shade_checkpoint_work<Y>(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, Y>>,
    series: &[SeriesPoint],
    y: (f64, f64),
) -> Result<bool, Box<dyn std::error::Error>>
where
    Y: Ranged<ValueType = f64>,
{
    type Busy = fn(&Checkpointing) -> bool;
    let kinds: [(&str, Busy, RGBAColor); 2] = [
        (
            "checkpoint: snapshot write",
            |c| c.snapshot_write_ms > 0,
            RGBColor(255, 150, 0).mix(0.18),
        ),
        (
            "checkpoint: releasing files",
            |c| c.release_ms > 0,
            RGBColor(130, 0, 200).mix(0.14),
        ),
    ];
    let mut shaded = false;
    for (name, busy, color) in kinds {
        let seconds: Vec<(f64, f64)> = series
            .iter()
            .enumerate()
            .filter(|(_, point)| busy(&point.checkpointing))
            .map(|(index, point)| {
                let start = index
                    .checked_sub(1)
                    .map_or(0.0, |before| series[before].t_s);
                (start, point.t_s)
            })
            .collect();
        if seconds.is_empty() {
            continue;
        }
        shaded = true;
        chart
            .draw_series(
                seconds
                    .into_iter()
                    .map(|(start, end)| Rectangle::new([(start, y.0), (end, y.1)], color.filled())),
            )?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.filled()));
    }
    Ok(shaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t_s: f64, rss_kib: Vec<u64>) -> SeriesPoint {
        SeriesPoint {
            t_s,
            committed_tx_per_s: 100.0,
            latency_us: LatencyRow {
                p50: 100,
                p99: 1_000,
                p999: 5_000,
                max: 9_000,
            },
            requests: 10,
            rss_kib,
            pool_transactions_high_water: vec![1],
            pool_batches_high_water: vec![1],
            commit_gaps: 100,
            longest_commit_gap_at_most_us: Some(500),
            journal_commits: JournalCommits::default(),
            checkpointing: Checkpointing::default(),
            executor_lag: ExecutorLag {
                wakeups: 1_000,
                late_over_goal: 2,
                longest_at_most_us: Some(2_000),
            },
            cpu: CpuStolen::default(),
        }
    }

    #[test]
    fn cpu_steal_is_read_per_cpu_from_proc_stat() {
        let before = "cpu  10 0 10 100 7 0 0 40 0 0\n\
                      cpu0 5 0 5 50 3 0 0 10 0 0\n\
                      cpu1 5 0 5 50 4 0 0 30 0 0\n\
                      intr 12345\n";
        let after = "cpu  10 0 10 100 9 0 0 75 0 0\n\
                     cpu0 5 0 5 50 3 0 0 15 0 0\n\
                     cpu1 5 0 5 50 6 0 0 60 0 0\n\
                     cpu2 1 0 1 1 1 0 0 99 0 0\n";
        let (before, after) = (CpuTimes::parse(before, 100), CpuTimes::parse(after, 100));
        // cpu2 appeared: not in both readings, skipped. The summary line is not a CPU.
        assert_eq!(
            after.since(&before),
            CpuStolen {
                steal_ms: 350,
                steal_ms_cpu_max: 300,
                steal_cpu: Some(1),
                iowait_ms: 20,
            }
        );
        assert_eq!(before.since(&before), CpuStolen::default());
        // Unreadable or truncated lines give nothing, never a panic.
        let short = CpuTimes::parse("cpu0 1 2 3\ncpuX 1 2 3 4 5 6 7 8\n", 100);
        assert_eq!(short.since(&short), CpuStolen::default());
        assert_eq!(CpuTimes::default().since(&before), CpuStolen::default());
        // This machine's own reading names every CPU this process may run on, at least.
        let own = CpuTimes::read();
        assert!(own.ticks_per_s > 0);
        let usable = std::thread::available_parallelism().map_or(1, usize::from);
        assert!(own.cpus.len() >= usable, "{} < {usable}", own.cpus.len());
    }

    #[test]
    fn rss_growth_skips_the_warm_up_share() {
        let mut series: Vec<SeriesPoint> = (0..10)
            .map(|t| point(t as f64, vec![1_000, 2_000]))
            .collect();
        series[0].rss_kib = vec![10, 10]; // warm-up: ignored
        series[9].rss_kib = vec![1_100, 2_000];
        let growth = rss_growth_percent(&series);
        assert!((growth[0] - 10.0).abs() < 1e-9, "{growth:?}");
        assert_eq!(growth[1], 0.0);
        assert!(rss_growth_percent(&[]).is_empty());
    }

    #[test]
    fn commit_gap_counts_open_stretches() {
        let start = Instant::now();
        let mut gaps = CommitGapTracker::new(vec![5, 5], start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        gaps.sample(&[6, 6], at(100));
        gaps.sample(&[7, 6], at(200));
        assert_eq!(gaps.longest(), Duration::from_millis(100));
        gaps.sample(&[8, 6], at(700));
        assert_eq!(gaps.longest(), Duration::from_millis(600));
        gaps.sample(&[9, 7], at(800));
        assert_eq!(gaps.longest(), Duration::from_millis(700));
    }

    /// Cumulative buckets of a histogram with `buckets` buckets, `count` observations in
    /// bucket `index` for each `(index, count)`.
    fn cumulative_of(buckets: usize, counts: &[(usize, u64)]) -> Vec<u64> {
        let mut per_bucket = vec![0u64; buckets];
        for &(index, count) in counts {
            per_bucket[index] += count;
        }
        per_bucket
            .iter()
            .scan(0, |sum, count| {
                *sum += count;
                Some(*sum)
            })
            .collect()
    }

    /// Cumulative commit-gap buckets with `counts[i]` gaps in bucket `i` (per bucket).
    fn cumulative(counts: &[(usize, u64)]) -> Vec<u64> {
        cumulative_of(GAP_BUCKETS, counts)
    }

    fn bucket_of(us: u64) -> usize {
        COMMIT_GAP_BUCKETS_US.iter().position(|&b| b == us).unwrap()
    }

    #[test]
    fn in_node_gaps_name_the_highest_bucket_between_two_scrapes() {
        let before = cumulative(&[(bucket_of(5_000), 1), (bucket_of(100), 10)]);
        // Since then: 7 more gaps up to 100 µs, 2 up to 2 ms, none higher.
        let after = cumulative(&[
            (bucket_of(5_000), 1),
            (bucket_of(100), 17),
            (bucket_of(2_000), 2),
        ]);
        let gaps = CommitGaps::between(&before, &after, 5_000);
        assert_eq!(gaps.gaps, 9);
        assert_eq!(gaps.over_goal, 2);
        // The 5 ms gap was before: the longest since is at most 2 ms.
        assert_eq!(gaps.longest_at_most_us, Some(2_000));
        // A maximum inside that bucket is exact (it rose in between) and bounds it lower.
        let gaps = CommitGaps::between(&before, &after, 1_400);
        assert_eq!(gaps.longest_at_most_us, Some(1_400));
        // Nothing new: no gap.
        let none = CommitGaps::between(&after, &after, 5_000);
        assert_eq!(none, CommitGaps::default());
        // The overflow bucket is bounded by the maximum only.
        let stalled = cumulative(&[(GAP_BUCKETS - 1, 1)]);
        let gaps = CommitGaps::between(&cumulative(&[]), &stalled, 3_200_000);
        assert_eq!(gaps.longest_at_most_us, Some(3_200_000));
        assert_eq!(gaps.over_goal, 1);
        // Several leaders: counts add up, the longest is the longest of any.
        let both = gaps.merge(CommitGaps::between(&before, &after, 5_000));
        assert_eq!((both.gaps, both.over_goal), (10, 3));
        assert_eq!(both.longest_at_most_us, Some(3_200_000));
    }

    /// Cumulative latency buckets with `counts[i]` commits in the bucket bounded by `i`'s
    /// value (µs; `None`: the overflow bucket).
    fn latency_cumulative(counts: &[(Option<u64>, u64)]) -> Vec<u64> {
        let indexed: Vec<(usize, u64)> = counts
            .iter()
            .map(|&(bound, count)| {
                let index = bound.map_or(LATENCY_BUCKETS - 1, |us| {
                    LATENCY_BUCKETS_US.iter().position(|&b| b == us).unwrap()
                });
                (index, count)
            })
            .collect();
        cumulative_of(LATENCY_BUCKETS, &indexed)
    }

    #[test]
    fn journal_commits_between_two_scrapes_count_the_slow_ones() {
        let before = latency_cumulative(&[(Some(500), 100), (Some(20_000), 1)]);
        let after = latency_cumulative(&[(Some(500), 160), (Some(20_000), 1), (Some(7_000), 3)]);
        let commits = JournalCommits::between(&before, &after);
        assert_eq!(commits.commits, 63);
        assert_eq!(commits.slow, 3, "over 5 ms: the three up to 7 ms");
        assert_eq!(commits.slowest_at_most_us, Some(7_000));
        assert_eq!(
            JournalCommits::between(&after, &after),
            JournalCommits::default()
        );
        let stuck = latency_cumulative(&[(None, 1)]);
        let overflow = JournalCommits::between(&latency_cumulative(&[]), &stuck);
        assert_eq!(overflow.slowest_at_most_us, Some(2_000_000));
        // Slower than every bound: reported as over the last, not at most it.
        assert!(overflow.slowest_over_bounds);
        assert_eq!(overflow.slowest_text(), ">2000000 µs");
        assert_eq!(commits.slowest_text(), "<=7000 µs");
        let both = overflow.merge(commits);
        assert_eq!((both.commits, both.slow), (64, 4));
        assert_eq!(both.slowest_at_most_us, Some(2_000_000));
        assert!(both.slowest_over_bounds);
    }

    #[test]
    fn own_rss_is_read() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn the_sink_appends_each_point_and_redraws_the_plot_while_the_run_goes_on() {
        let dir = std::env::temp_dir().join(format!("percore-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let (plot, lines) = (dir.join("run.svg"), dir.join("run.jsonl"));
        let mut sink = SeriesSink::create(Some(&plot), Some(&lines)).expect("sink created");
        let mut series = Vec::new();
        for t in 1..=PLOT_REDRAW_POINTS + 1 {
            series.push(point(t as f64, vec![1_000, 2_000, 3_000]));
            sink.point(&series);
            assert_eq!(
                plot.exists(),
                t >= PLOT_REDRAW_POINTS,
                "the plot is first drawn at point {PLOT_REDRAW_POINTS}, not {t}"
            );
        }
        let written = std::fs::read_to_string(&lines).expect("lines written");
        let times: Vec<f64> = written
            .lines()
            .map(|line| {
                let point: serde_json::Value = serde_json::from_str(line).expect("one JSON point");
                point["t_s"].as_f64().expect("t_s")
            })
            .collect();
        let expected: Vec<f64> = (1..=PLOT_REDRAW_POINTS + 1).map(|t| t as f64).collect();
        assert_eq!(times, expected);
        assert!(
            !dir.join("run.svg.tmp").exists(),
            "drawn aside, then renamed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sink_that_cannot_write_fails_before_the_run() {
        let missing = std::env::temp_dir()
            .join("percore-no-such-dir")
            .join("run.jsonl");
        assert!(SeriesSink::create(None, Some(&missing)).is_err());
    }

    #[test]
    fn a_plot_is_written() {
        let path = std::env::temp_dir().join(format!("percore-soak-{}.svg", std::process::id()));
        let series: Vec<SeriesPoint> = (1..=5)
            .map(|t| point(t as f64, vec![1_000 * t, 2_000, 3_000]))
            .collect();
        plot_svg(&path, &series).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg written");
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{svg:.200}"
        );
        assert!(
            !svg.contains("checkpoint:"),
            "nothing to shade, no legend entry"
        );
        // The executor lag line: in the legend, drawn in its colour (#009696).
        assert!(svg.contains("executor lag"), "{svg:.400}");
        assert!(svg.contains("stroke=\"#009696\""), "{svg:.400}");
        // A snapshot write in seconds 2 and 3, a release in second 3: shaded and labelled.
        let mut series = series;
        series[1].checkpointing.snapshot_write_ms = 700;
        series[2].checkpointing.snapshot_write_ms = 300;
        series[2].checkpointing.release_ms = 200;
        plot_svg(&path, &series).expect("plot");
        let shaded = std::fs::read_to_string(&path).expect("svg written");
        let _ = std::fs::remove_file(&path);
        for label in ["checkpoint: snapshot write", "checkpoint: releasing files"] {
            // In the legends of the throughput and the latency panels.
            assert_eq!(shaded.matches(label).count(), 2, "{label}");
        }
        // Per panel (two), one rectangle per busy second and one legend swatch per kind.
        let filled = |color: &str| shaded.matches(&format!("fill=\"{color}\"")).count();
        assert_eq!(
            filled("#FF9600"),
            2 * (2 + 1),
            "snapshot writes: {shaded:.400}"
        );
        assert_eq!(filled("#8200C8"), 2 * (1 + 1), "releases");
    }
}
