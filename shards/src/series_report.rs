//! `percore series`: where a soak's slow seconds came from, read back from the series file
//! `percore bench --series-out` wrote (JSON lines, one [`SeriesPoint`] per second).
//!
//! A run's whole-run percentiles say how bad the tail was, not why. Each point also
//! carries that second's journal commits (write and `fdatasync`), the shards' executor
//! lag, the checkpoint work and the CPU time the host took (steal), so the seconds can be
//! split by cause: this is the analysis docs/benchmarks.md reports for the 16-core soaks,
//! computed here from the file so that anyone can repeat it.
//!
//! - **Per-second percentiles**: of each second's request p99 (and p50, p999), the p10,
//!   median and p90 over the seconds, and how many seconds had a p99 under the goal
//!   ([`P99_GOAL_US`]), over 20 ms and over 100 ms.
//! - **By steal** (summed over every CPU): none, some, or [`STEAL_HEAVY_MS`] or more. An
//!   executor late in a second with heavy steal was held back by the host, not the node.
//! - **By checkpoint work**: a snapshot write, else a release of files, else roll-overs onto
//!   reused segments only, else none.
//! - **The slow seconds** (p99 over [`SLOW_SECOND_P99_US`]), each with its slowest journal
//!   commit, its latest executor wake-up, its steal and its checkpoint work, and the
//!   likeliest cause: the host, the disk, the executors or a backlog. A slow commit with
//!   executors on time and no steal is the disk's.
//!
//! Quantiles are nearest-rank: the value at index `⌊q·n⌋` (at most `n − 1`) of the sorted
//! seconds; the median of an even count is the upper middle.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::soak::SeriesPoint;

/// The per-second request p99 the issue sets as the goal at 90 % of peak (µs).
pub const P99_GOAL_US: u64 = 5_000;
/// Seconds with a request p99 above this are listed one by one (µs).
pub const SLOW_SECOND_P99_US: u64 = 10_000;
/// Steal in one second, summed over every CPU, from which a second counts as steal-heavy
/// (ms): ten clock ticks.
pub const STEAL_HEAVY_MS: u64 = 100;
/// Late executor wake-ups in one second from which the executors count as stalled in it
/// (each shard's probe wakes about a thousand times a second).
pub const LATE_WAKEUPS_MANY: u64 = 20;
/// Most slow seconds listed; the count of the rest is given.
pub const SLOW_SECONDS_LISTED_MAX: usize = 40;

/// Why a series file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SeriesReadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not a series point.
    #[error("{path}:{line}: not a series point: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Its line number (from 1).
        line: usize,
        /// What the parser said.
        source: serde_json::Error,
    },
}

/// Which of the fields added to the series over time every point of a file carries: a
/// split by a field some point lacks would count its seconds as zero, not as unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Recorded {
    /// `cpu` (steal): the 16-core soaks before the eighth lease had none.
    pub steal: bool,
    /// `checkpointing`.
    pub checkpointing: bool,
    /// `executor_lag`.
    pub executor_lag: bool,
}

/// A series file's points and what they record.
#[derive(Debug, Clone)]
pub struct Series {
    /// One point a second, in file order.
    pub points: Vec<SeriesPoint>,
    /// The later fields every point carries.
    pub recorded: Recorded,
}

/// Reads every point of a series file (blank lines skipped).
pub fn read(path: &Path) -> Result<Series, SeriesReadError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| SeriesReadError::Io {
        path: name.clone(),
        source,
    })?;
    let mut recorded = Recorded {
        steal: true,
        checkpointing: true,
        executor_lag: true,
    };
    let mut points = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse_error = |source| SeriesReadError::Parse {
            path: name.clone(),
            line: index + 1,
            source,
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(parse_error)?;
        recorded.steal &= value.get("cpu").is_some();
        recorded.checkpointing &= value.get("checkpointing").is_some();
        recorded.executor_lag &= value.get("executor_lag").is_some();
        points.push(serde_json::from_value(value).map_err(parse_error)?);
    }
    Ok(Series { points, recorded })
}

/// p10, median and p90 of some per-second figure (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Spread {
    /// 10th percentile over the seconds.
    pub p10: u64,
    /// Median.
    pub median: u64,
    /// 90th percentile.
    pub p90: u64,
    /// Largest.
    pub max: u64,
}

impl Spread {
    fn of(mut values: Vec<u64>) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        values.sort_unstable();
        let at = |q: f64| values[((q * values.len() as f64) as usize).min(values.len() - 1)];
        Self {
            p10: at(0.1),
            median: at(0.5),
            p90: at(0.9),
            max: *values.last().expect("not empty"),
        }
    }
}

/// The seconds of one kind (a steal band, a kind of checkpoint work).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Band {
    /// What these seconds had.
    pub name: &'static str,
    /// How many.
    pub seconds: usize,
    /// Their request p99 (µs).
    pub p99_us: Spread,
    /// Of them, seconds with a p99 over [`SLOW_SECOND_P99_US`].
    pub seconds_slow: usize,
    /// Their late executor wake-ups a second.
    pub late_wakeups: Spread,
    /// Of them, seconds with [`LATE_WAKEUPS_MANY`] late wake-ups or more.
    pub seconds_many_late: usize,
}

impl Band {
    fn of(name: &'static str, points: &[&SeriesPoint]) -> Self {
        Self {
            name,
            seconds: points.len(),
            p99_us: Spread::of(points.iter().map(|p| p.latency_us.p99).collect()),
            seconds_slow: points
                .iter()
                .filter(|p| p.latency_us.p99 > SLOW_SECOND_P99_US)
                .count(),
            late_wakeups: Spread::of(
                points
                    .iter()
                    .map(|p| p.executor_lag.late_over_goal)
                    .collect(),
            ),
            seconds_many_late: points
                .iter()
                .filter(|p| p.executor_lag.late_over_goal >= LATE_WAKEUPS_MANY)
                .count(),
        }
    }
}

/// One second with a p99 over [`SLOW_SECOND_P99_US`] and what else happened in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlowSecond {
    /// When (s into the window, rounded).
    pub t_s: u64,
    /// Its request p99 (µs).
    pub p99_us: u64,
    /// Committed transactions a second.
    pub committed_tx_per_s: u64,
    /// Its slowest journal commit, at most (µs; `None` without commits).
    pub journal_slowest_at_most_us: Option<u64>,
    /// Its journal commits over 5 ms.
    pub journal_slow: u64,
    /// Its latest executor wake-up, at most (µs).
    pub executor_latest_at_most_us: Option<u64>,
    /// Its late executor wake-ups.
    pub late_wakeups: u64,
    /// Steal summed over every CPU (ms; `None` when the file records none).
    pub steal_ms: Option<u64>,
    /// Its checkpoint work ([`checkpoint_kind`]).
    pub checkpoint: &'static str,
    /// The likeliest cause ([`Cause`]).
    pub cause: &'static str,
}

/// What `percore series` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeriesSummary {
    /// Seconds read from the file.
    pub seconds_read: usize,
    /// Of them, the seconds reported (from `from_s` on).
    pub seconds: usize,
    /// Per-second request p50 (µs).
    pub p50_us: Spread,
    /// Per-second request p99 (µs).
    pub p99_us: Spread,
    /// Per-second request p999 (µs).
    pub p999_us: Spread,
    /// Seconds with a p99 under [`P99_GOAL_US`].
    pub seconds_p99_under_goal: usize,
    /// Seconds with a p99 over 20 ms.
    pub seconds_p99_over_20ms: usize,
    /// Seconds with a p99 over 100 ms.
    pub seconds_p99_over_100ms: usize,
    /// Which later fields the file records; a split by one it does not is left empty.
    pub recorded: Recorded,
    /// Steal over the seconds reported, summed over every CPU (ms).
    pub steal_ms: u64,
    /// Seconds by steal: none, some, heavy (empty when the file records no steal).
    pub by_steal: Vec<Band>,
    /// Seconds by checkpoint work (empty when the file records none).
    pub by_checkpoint: Vec<Band>,
    /// The slow seconds, in time order (at most [`SLOW_SECONDS_LISTED_MAX`]).
    pub slow: Vec<SlowSecond>,
    /// Slow seconds beyond those listed.
    pub slow_unlisted: usize,
}

/// A second's checkpoint work: a snapshot write, else a release of files, else roll-overs
/// onto reused segments, else none.
pub fn checkpoint_kind(point: &SeriesPoint) -> &'static str {
    let work = &point.checkpointing;
    if work.snapshot_write_ms > 0 {
        "snapshot write"
    } else if work.release_ms > 0 {
        "release of files"
    } else if work.segment_switches_reused > 0 {
        "reused segments only"
    } else {
        "none"
    }
}

/// The likeliest cause of a slow second ([`Cause::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// [`STEAL_HEAVY_MS`] of steal or more while the executors were late.
    Host,
    /// A journal commit longer than both the latest executor wake-up and
    /// [`SLOW_SECOND_P99_US`] (a commit needs `fdatasync`s in series).
    Disk,
    /// The executors were late without either.
    Executors,
    /// None of these: the second's requests waited behind earlier ones.
    Backlog,
}

impl Cause {
    /// Every cause, in the order [`Cause::of`] tries them.
    pub const ALL: [Cause; 4] = [Cause::Host, Cause::Disk, Cause::Executors, Cause::Backlog];

    /// The first cause that fits `point`, in [`Cause::ALL`] order.
    pub fn of(point: &SeriesPoint) -> Cause {
        let late = point.executor_lag.late_over_goal >= LATE_WAKEUPS_MANY;
        let lag = point.executor_lag.longest_at_most_us.unwrap_or(0);
        let commit = point.journal_commits.slowest_at_most_us.unwrap_or(0);
        if late && point.cpu.steal_ms >= STEAL_HEAVY_MS {
            Cause::Host
        } else if commit > lag.max(SLOW_SECOND_P99_US) {
            Cause::Disk
        } else if late {
            Cause::Executors
        } else {
            Cause::Backlog
        }
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Host => "host (steal)",
            Cause::Disk => "disk",
            Cause::Executors => "executors",
            Cause::Backlog => "backlog",
        }
    }
}

/// How many seconds of `points` had a p99 over [`SLOW_SECOND_P99_US`], per cause in
/// [`Cause::ALL`] order.
pub fn slow_causes(points: &[SeriesPoint]) -> [usize; Cause::ALL.len()] {
    let mut counts = [0; Cause::ALL.len()];
    for point in points
        .iter()
        .filter(|p| p.latency_us.p99 > SLOW_SECOND_P99_US)
    {
        counts[Cause::of(point) as usize] += 1;
    }
    counts
}

/// What a soak's summary says of its slow seconds: how many, by cause.
pub fn slow_causes_line(points: &[SeriesPoint]) -> String {
    let counts = slow_causes(points);
    let named: Vec<String> = Cause::ALL
        .iter()
        .zip(counts)
        .map(|(cause, seconds)| format!("{} {seconds}", cause.name()))
        .collect();
    format!(
        "seconds with request p99 over {} ms: {} ({}; `percore series` on the series file lists them)",
        SLOW_SECOND_P99_US / 1_000,
        counts.iter().sum::<usize>(),
        named.join(", ")
    )
}

/// Summarises `series`, leaving out the points before `from_s` (the warm-up).
pub fn summarize(series: &Series, from_s: f64) -> SeriesSummary {
    let points = &series.points;
    let recorded = series.recorded;
    let kept: Vec<&SeriesPoint> = points.iter().filter(|p| p.t_s >= from_s).collect();
    let spread =
        |field: fn(&SeriesPoint) -> u64| Spread::of(kept.iter().map(|p| field(p)).collect());
    let count = |keep: &dyn Fn(&SeriesPoint) -> bool| kept.iter().filter(|p| keep(p)).count();
    let band = |name, keep: &dyn Fn(&SeriesPoint) -> bool| {
        let points: Vec<&SeriesPoint> = kept.iter().copied().filter(|p| keep(p)).collect();
        Band::of(name, &points)
    };
    let mut by_steal = vec![
        band("no steal", &|p| p.cpu.steal_ms == 0),
        band("some steal", &|p| {
            (1..STEAL_HEAVY_MS).contains(&p.cpu.steal_ms)
        }),
        band("heavy steal", &|p| p.cpu.steal_ms >= STEAL_HEAVY_MS),
    ];
    let mut by_checkpoint: Vec<Band> = [
        "none",
        "snapshot write",
        "release of files",
        "reused segments only",
    ]
    .into_iter()
    .map(|kind| band(kind, &move |p| checkpoint_kind(p) == kind))
    .collect();
    if !recorded.steal {
        by_steal.clear();
    }
    if !recorded.checkpointing {
        by_checkpoint.clear();
    }
    let slow_all: Vec<SlowSecond> = kept
        .iter()
        .filter(|p| p.latency_us.p99 > SLOW_SECOND_P99_US)
        .map(|p| SlowSecond {
            t_s: p.t_s.round() as u64,
            p99_us: p.latency_us.p99,
            committed_tx_per_s: p.committed_tx_per_s.round() as u64,
            journal_slowest_at_most_us: p.journal_commits.slowest_at_most_us,
            journal_slow: p.journal_commits.slow,
            executor_latest_at_most_us: p.executor_lag.longest_at_most_us,
            late_wakeups: p.executor_lag.late_over_goal,
            steal_ms: recorded.steal.then_some(p.cpu.steal_ms),
            checkpoint: checkpoint_kind(p),
            cause: Cause::of(p).name(),
        })
        .collect();
    let slow_unlisted = slow_all.len().saturating_sub(SLOW_SECONDS_LISTED_MAX);
    SeriesSummary {
        seconds_read: points.len(),
        seconds: kept.len(),
        p50_us: spread(|p| p.latency_us.p50),
        p99_us: spread(|p| p.latency_us.p99),
        p999_us: spread(|p| p.latency_us.p999),
        seconds_p99_under_goal: count(&|p| p.latency_us.p99 < P99_GOAL_US),
        seconds_p99_over_20ms: count(&|p| p.latency_us.p99 > 20_000),
        seconds_p99_over_100ms: count(&|p| p.latency_us.p99 > 100_000),
        recorded,
        steal_ms: kept.iter().map(|p| p.cpu.steal_ms).sum(),
        by_steal,
        by_checkpoint,
        slow: slow_all.into_iter().take(SLOW_SECONDS_LISTED_MAX).collect(),
        slow_unlisted,
    }
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1_000.0)
}

fn at_most(us: Option<u64>) -> String {
    us.map_or_else(|| "-".to_string(), |us| format!("<={}", ms(us)))
}

/// The summary as text.
pub fn render_text(summary: &SeriesSummary, from_s: f64) -> String {
    let mut out = String::new();
    let s = summary;
    let _ = writeln!(
        out,
        "{} seconds from t = {from_s} s ({} read); request latency per second, ms (p10 / median / p90 / max over the seconds):",
        s.seconds, s.seconds_read
    );
    for (name, spread) in [("p50", s.p50_us), ("p99", s.p99_us), ("p999", s.p999_us)] {
        let _ = writeln!(
            out,
            "  {name:<5} {} / {} / {} / {}",
            ms(spread.p10),
            ms(spread.median),
            ms(spread.p90),
            ms(spread.max)
        );
    }
    let steal = if s.recorded.steal {
        format!("{} ms", s.steal_ms)
    } else {
        "not recorded".to_string()
    };
    let _ = writeln!(
        out,
        "seconds with p99 < {} ms: {}; over 20 ms: {}; over 100 ms: {}; CPU steal in them {steal}",
        ms(P99_GOAL_US),
        s.seconds_p99_under_goal,
        s.seconds_p99_over_20ms,
        s.seconds_p99_over_100ms,
    );
    for (title, bands, recorded) in [
        ("by CPU steal (every CPU)", &s.by_steal, s.recorded.steal),
        (
            "by checkpoint work",
            &s.by_checkpoint,
            s.recorded.checkpointing,
        ),
    ] {
        if !recorded {
            let _ = writeln!(out, "{title}: not recorded in this file");
            continue;
        }
        let _ = writeln!(
            out,
            "{title}: seconds | p99 median / p90 / max ms | over {} ms | late wake-ups a second, median | seconds with >= {LATE_WAKEUPS_MANY} late",
            ms(SLOW_SECOND_P99_US)
        );
        for band in bands.iter() {
            let _ = writeln!(
                out,
                "  {:<21} {:>6} | {} / {} / {} | {} | {} | {}",
                band.name,
                band.seconds,
                ms(band.p99_us.median),
                ms(band.p99_us.p90),
                ms(band.p99_us.max),
                band.seconds_slow,
                band.late_wakeups.median,
                band.seconds_many_late
            );
        }
    }
    let _ = writeln!(
        out,
        "seconds with p99 over {} ms: t s | p99 ms | committed tx/s | slowest journal commit ms (over 5 ms) | latest executor wake-up ms (late) | steal ms | checkpoint | cause",
        ms(SLOW_SECOND_P99_US)
    );
    for second in &s.slow {
        let _ = writeln!(
            out,
            "  {} | {} | {} | {} ({}) | {} ({}) | {} | {} | {}",
            second.t_s,
            ms(second.p99_us),
            second.committed_tx_per_s,
            at_most(second.journal_slowest_at_most_us),
            second.journal_slow,
            at_most(second.executor_latest_at_most_us),
            second.late_wakeups,
            second
                .steal_ms
                .map_or_else(|| "-".to_string(), |ms| ms.to_string()),
            second.checkpoint,
            second.cause
        );
    }
    if s.slow_unlisted > 0 {
        let _ = writeln!(out, "  ... and {} more", s.slow_unlisted);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::LatencyRow;
    use crate::soak::{Checkpointing, CpuStolen, ExecutorLag, JournalCommits};

    fn point(t_s: f64, p99_us: u64) -> SeriesPoint {
        SeriesPoint {
            t_s,
            committed_tx_per_s: 1_000.0,
            latency_us: LatencyRow {
                p50: p99_us / 2,
                p99: p99_us,
                p999: p99_us + 1,
                max: p99_us + 2,
            },
            requests: 10,
            rss_kib: vec![1, 1, 1],
            pool_transactions_high_water: vec![0; 3],
            pool_batches_high_water: vec![0; 3],
            commit_gaps: 10,
            longest_commit_gap_at_most_us: Some(2_000),
            journal_commits: JournalCommits {
                commits: 30,
                slow: 0,
                slowest_at_most_us: Some(2_000),
                slowest_over_bounds: false,
            },
            checkpointing: Checkpointing::default(),
            executor_lag: ExecutorLag {
                wakeups: 1_000,
                late_over_goal: 1,
                longest_at_most_us: Some(2_000),
            },
            cpu: CpuStolen::default(),
        }
    }

    /// Seconds land in the right bands, the warm-up is left out, and each slow second is
    /// put down to the host, the disk or the executors by what else happened in it.
    #[test]
    fn seconds_are_split_by_steal_and_checkpoint_work_and_slow_ones_explained() {
        let mut points: Vec<SeriesPoint> = (1..=20).map(|t| point(f64::from(t), 3_000)).collect();
        // Warm-up: slow, left out.
        points[0].latency_us.p99 = 900_000;
        // t = 5: heavy steal and late executors.
        points[4].latency_us.p99 = 12_000;
        points[4].cpu.steal_ms = 300;
        points[4].executor_lag.late_over_goal = 50;
        points[4].executor_lag.longest_at_most_us = Some(10_000);
        // t = 8: a 200 ms fdatasync, executors on time, a snapshot write.
        points[7].latency_us.p99 = 150_000;
        points[7].journal_commits.slowest_at_most_us = Some(200_000);
        points[7].journal_commits.slow = 12;
        points[7].checkpointing.snapshot_write_ms = 900;
        // t = 9: late executors without steal.
        points[8].latency_us.p99 = 11_000;
        points[8].executor_lag.late_over_goal = 30;
        points[8].executor_lag.longest_at_most_us = Some(20_000);
        // t = 10: some steal, reused segments.
        points[9].cpu.steal_ms = 20;
        points[9].checkpointing.segment_switches_reused = 2;
        let series = Series {
            points,
            recorded: Recorded {
                steal: true,
                checkpointing: true,
                executor_lag: true,
            },
        };
        let summary = summarize(&series, 2.0);
        assert_eq!((summary.seconds_read, summary.seconds), (20, 19));
        assert_eq!(summary.seconds_p99_under_goal, 16);
        assert_eq!(
            (
                summary.seconds_p99_over_20ms,
                summary.seconds_p99_over_100ms
            ),
            (1, 1)
        );
        assert_eq!(summary.steal_ms, 320);
        let seconds: Vec<usize> = summary.by_steal.iter().map(|b| b.seconds).collect();
        assert_eq!(seconds, [17, 1, 1]);
        assert_eq!(summary.by_steal[2].seconds_many_late, 1);
        assert_eq!(summary.by_steal[0].seconds_many_late, 1);
        let seconds: Vec<(&str, usize)> = summary
            .by_checkpoint
            .iter()
            .map(|b| (b.name, b.seconds))
            .collect();
        assert_eq!(
            seconds,
            [
                ("none", 17),
                ("snapshot write", 1),
                ("release of files", 0),
                ("reused segments only", 1)
            ]
        );
        assert_eq!(summary.by_checkpoint[1].p99_us.max, 150_000);
        let slow: Vec<(u64, &str, &str)> = summary
            .slow
            .iter()
            .map(|s| (s.t_s, s.cause, s.checkpoint))
            .collect();
        assert_eq!(
            slow,
            [
                (5, "host (steal)", "none"),
                (8, "disk", "snapshot write"),
                (9, "executors", "none")
            ]
        );
        assert_eq!(
            slow_causes(&series.points),
            [1, 1, 1, 1],
            "the warm-up second too"
        );
        assert_eq!(summary.p99_us.median, 3_000);
        assert_eq!(summary.p99_us.max, 150_000);
        let text = render_text(&summary, 2.0);
        assert!(
            text.contains(
                "  8 | 150.0 | 1000 | <=200.0 (12) | <=2.0 (1) | 0 | snapshot write | disk"
            ),
            "{text}"
        );
    }

    /// A series file reads back point for point, and a line written before the fields
    /// added later (journal commits, checkpoint work, executor lag, steal) reads with them
    /// empty; a bad line is named.
    #[test]
    fn series_files_read_back_old_lines_included() {
        let dir = std::env::temp_dir().join(format!("percore-series-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("series.jsonl");
        let written = point(1.0, 4_000);
        let old = r#"{"t_s":2.0,"committed_tx_per_s":5.0,"latency_us":{"p50":1,"p99":2,"p999":3,"max":4},"requests":1,"rss_kib":[7],"pool_transactions_high_water":[0],"pool_batches_high_water":[0],"commit_gaps":0,"longest_commit_gap_at_most_us":null}"#;
        let text = format!("{}\n\n{old}\n", serde_json::to_string(&written).unwrap());
        std::fs::write(&path, text).unwrap();
        let series = read(&path).expect("reads");
        let points = &series.points;
        assert_eq!(points.len(), 2);
        assert_eq!(
            serde_json::to_string(&points[0]).unwrap(),
            serde_json::to_string(&written).unwrap()
        );
        assert_eq!(points[1].latency_us.p99, 2);
        assert_eq!(points[1].cpu, CpuStolen::default());
        assert_eq!(points[1].executor_lag, ExecutorLag::default());
        // Not recorded on every line: no split by them, said so, rather than zeros.
        assert_eq!(
            series.recorded,
            Recorded {
                steal: false,
                checkpointing: false,
                executor_lag: false
            }
        );
        let summary = summarize(&series, 0.0);
        assert!(summary.by_steal.is_empty() && summary.by_checkpoint.is_empty());
        let text = render_text(&summary, 0.0);
        assert!(
            text.contains("by CPU steal (every CPU): not recorded in this file")
                && text.contains("CPU steal in them not recorded"),
            "{text}"
        );
        std::fs::write(&path, serde_json::to_string(&written).unwrap()).unwrap();
        assert!(read(&path).expect("reads").recorded.steal);
        std::fs::write(&path, format!("{old}\n{{\"t_s\": \"soon\"}}\n")).unwrap();
        match read(&path) {
            Err(SeriesReadError::Parse { line, .. }) => assert_eq!(line, 2),
            other => panic!("read a bad line: {:?}", other.map(|s| s.points.len())),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
