//! Long-run (soak) observation of a local cluster under `percore bench --series`.
//!
//! Owns the sampling loop that replaces the plain measurement sleep: every
//! [`SAMPLE_INTERVAL_MS`] it scrapes every replica and follows each group leader's
//! `percore_commit_op` (the longest stretch without it advancing is the commit gap); every
//! [`SERIES_INTERVAL_MS`] it records one [`SeriesPoint`] (committed tx/s from the leaders'
//! `percore_tx_applied_total`, the client latency of that second, each node's RSS from
//! `/proc/<pid>/status`, pool high-water marks) and prints a progress line on stderr. It
//! also draws the series as an SVG. It never drives load and never touches the children
//! beyond reading their metrics and `/proc`.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::cluster::{self, ClusterError, LocalCluster};
use crate::loadgen::{BenchError, LatencyRow};

/// How often the leaders' commit ops are sampled (the commit gap's resolution).
pub const SAMPLE_INTERVAL_MS: u64 = 100;
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

/// What one second of the run looked like.
#[derive(Debug, Clone, Serialize)]
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
}

/// The series and what it says about a long run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// One point per second of the window.
    pub series: Vec<SeriesPoint>,
    /// Per replica, RSS growth (percent) from the first point after the warm-up share
    /// ([`RSS_WARMUP_PERCENT`] of the points) to the last point.
    pub rss_growth_percent: Vec<f64>,
    /// Longest time (ms) any group leader's `percore_commit_op` did not advance while load
    /// was offered: between the samples that saw it advance, so an upper bound at
    /// [`SAMPLE_INTERVAL_MS`] resolution (a steady stream reads as one interval).
    pub longest_commit_gap_ms: u64,
    /// Client request latency p999 over the whole run (µs).
    pub p999_us: u64,
    /// Scrapes that failed and were skipped or retried.
    pub scrape_failures: u64,
}

/// `VmRSS` of process `pid` in KiB, `None` if it cannot be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
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

/// Leader commit ops and applied counters, per shard, plus each replica's pool high-water
/// marks, from one scrape of every replica.
struct Scrape {
    commit_op: Vec<u64>,
    applied: Vec<u64>,
    pool_transactions_high_water: Vec<u64>,
    pool_batches_high_water: Vec<u64>,
}

fn scrape(cluster: &LocalCluster) -> Result<Scrape, BenchError> {
    let texts = (0..cluster.replicas())
        .map(|replica| cluster.scrape(replica))
        .collect::<Result<Vec<String>, ClusterError>>()?;
    let shards = cluster.shards();
    let leader = |name: &str| -> Vec<u64> {
        (0..shards)
            .map(|shard| cluster::shard_metric(&texts[cluster.leader_of(shard)], name, shard))
            .collect()
    };
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
    Ok(Scrape {
        commit_op: leader("percore_commit_op"),
        applied: leader("percore_tx_applied_total"),
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
/// resets) the client latency recorded since its last call. Returns when the window
/// started and what was seen; the caller adds [`SoakReport::p999_us`].
pub fn sample_window(
    cluster: &LocalCluster,
    duration: Duration,
    mut take_latency: impl FnMut() -> Histogram<u64>,
) -> Result<(Instant, SoakReport), BenchError> {
    let first = scrape(cluster)?;
    take_latency();
    let started = Instant::now();
    let mut gaps = CommitGapTracker::new(first.commit_op, started);
    let mut applied_before: u64 = first.applied.iter().sum();
    let mut point_started = started;
    let mut series = Vec::with_capacity(duration.as_secs() as usize);
    let mut scrape_failures = 0;
    let ticks = duration.as_millis() as u64 / SAMPLE_INTERVAL_MS;
    for tick in 1..=ticks {
        let due = started + Duration::from_millis(tick * SAMPLE_INTERVAL_MS);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let point_due = tick.is_multiple_of(SAMPLES_PER_POINT);
        // A busy metrics endpoint may drop one scrape: a commit-gap sample is skipped
        // (the gap then spans it), a series point is retried.
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
        let point = SeriesPoint {
            t_s: now.duration_since(started).as_secs_f64(),
            committed_tx_per_s: applied.saturating_sub(applied_before) as f64
                / now.duration_since(point_started).as_secs_f64(),
            latency_us: latency_row(&latency),
            requests: latency.len(),
            rss_kib: (0..cluster.replicas())
                .map(|replica| cluster.pid(replica).and_then(rss_kib).unwrap_or(0))
                .collect(),
            pool_transactions_high_water: sample.pool_transactions_high_water,
            pool_batches_high_water: sample.pool_batches_high_water,
        };
        print_progress(&point, gaps.longest());
        series.push(point);
        applied_before = applied;
        point_started = now;
    }
    Ok((
        started,
        SoakReport {
            rss_growth_percent: rss_growth_percent(&series),
            series,
            longest_commit_gap_ms: gaps.longest().as_millis() as u64,
            p999_us: 0,
            scrape_failures,
        },
    ))
}

fn print_progress(point: &SeriesPoint, gap: Duration) {
    let rss_mib: Vec<String> = point
        .rss_kib
        .iter()
        .map(|kib| format!("{:.0}", *kib as f64 / 1024.0))
        .collect();
    eprintln!(
        "  {:>6.1}s {:>10.0} tx/s  p50 {} p99 {} p999 {} max {} µs  rss MiB [{}]  pool hw tx {:?} batches {:?}  gap {} ms",
        point.t_s,
        point.committed_tx_per_s,
        point.latency_us.p50,
        point.latency_us.p99,
        point.latency_us.p999,
        point.latency_us.max,
        rss_mib.join(" "),
        point.pool_transactions_high_water,
        point.pool_batches_high_water,
        gap.as_millis()
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
            "longest commit gap (leader percore_commit_op, {SAMPLE_INTERVAL_MS} ms samples): {} ms",
            report.longest_commit_gap_ms
        ),
        format!("request latency p999 over the run: {} µs", report.p999_us),
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

/// Draws TPS, latency percentiles (ms, log scale) and RSS per replica (MiB) over time into
/// an SVG at `path`.
pub fn plot_svg(path: &Path, series: &[SeriesPoint]) -> Result<(), PlotError> {
    let error = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    draw(path, series).map_err(|e| error(e.to_string()))
}

/// Reads one percentile out of a [`LatencyRow`].
type PickPercentile = fn(&LatencyRow) -> u64;

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
    chart.draw_series(LineSeries::new(
        series.iter().map(|p| (p.t_s, p.committed_tx_per_s)),
        &BLUE,
    ))?;

    let ms = |us: u64| (us.max(1) as f64) / 1_000.0;
    let latency_max = series
        .iter()
        .map(|p| ms(p.latency_us.p999))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("request latency (ms, log)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max, (0.001..latency_max * 2.0).log_scale())?;
    chart.configure_mesh().x_desc("s").draw()?;
    let percentiles: [(&str, PickPercentile, RGBColor); 3] = [
        ("p50", |l| l.p50, GREEN),
        ("p99", |l| l.p99, BLUE),
        ("p999", |l| l.p999, RED),
    ];
    for (name, pick, color) in percentiles {
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|p| (p.t_s, ms(pick(&p.latency_us)))),
                &color,
            ))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;

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
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
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
        }
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

    #[test]
    fn own_rss_is_read() {
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn a_plot_is_written() {
        let path = std::env::temp_dir().join(format!("percore-soak-{}.svg", std::process::id()));
        let series: Vec<SeriesPoint> = (1..=5)
            .map(|t| point(t as f64, vec![1_000 * t, 2_000, 3_000]))
            .collect();
        plot_svg(&path, &series).expect("plot");
        let svg = std::fs::read_to_string(&path).expect("svg written");
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{svg:.200}"
        );
    }
}
