//! `percore bench --series` end to end: a local 3-replica cluster under load for
//! [`DURATION_S`] seconds, checked for the shape of a healthy long run (one series point per
//! second, no RSS growth after warm-up, no long commit gaps, the in-node commit-gap
//! histogram read every second), not for throughput goals; and a short `--rate` run,
//! checked for keeping to the offered rate (not for speed); and runs whose group leader is
//! paused, checked for the load following the group to its new leader.

use std::process::Command;
use std::sync::Mutex;

/// Seconds measured.
const DURATION_S: u64 = 20;
/// Most RSS growth (percent) any replica may show after the warm-up share of the run.
const RSS_GROWTH_PERCENT_MAX: f64 = 10.0;
/// Longest stretch (ms) a leader's commit op may stand still while load is offered.
const COMMIT_GAP_MS_MAX: u64 = 2_000;
/// Ops between checkpoints in the long run: several checkpoints per group in it.
const CHECKPOINT_INTERVAL_OPS: u64 = 1_024;
/// Seconds measured by the paced run.
const PACED_DURATION_S: u64 = 5;
/// Transfers per second the paced run offers: a small share of what even a debug cluster
/// commits, so that the run measures the pacer, not the cluster.
const PACED_RATE_TX_PER_S: f64 = 2_000.0;
/// Most the paced run's committed rate may exceed the offered one (fraction): requests
/// straddling the window's edges.
const PACED_RATE_EXCESS_MAX: f64 = 0.10;
/// Least share of the offered rate the paced run must commit: a pacer that stalls fails.
const PACED_RATE_SHARE_MIN: f64 = 0.5;
/// Transfers per request in every run here (`--records-per-request` in [`BENCH_ARGS`]).
const PACED_RECORDS_PER_REQUEST: f64 = 100.0;
/// One cluster at a time: both tests start three nodes on the same core.
static CLUSTER: Mutex<()> = Mutex::new(());
/// Node and load sizes small enough for three debug nodes on a CI box (as in
/// tests/tests/cluster.rs).
const BENCH_ARGS: [&str; 33] = [
    // Fixed view: three debug-build replicas share one core here, where a leader's long
    // batcher turn can outlast the followers' leader timeout and start a view change, whose
    // pause the commit-gap bounds below would count; the shape tests are about the series,
    // and the tests that pause a leader (below) drop this flag.
    "--fixed-view",
    "--segment-mib",
    "4",
    "--accounts-max",
    "1024",
    "--transfers-max",
    "65536",
    "--credit-legs-max",
    "4096",
    "--io-memory-kib",
    "512",
    "--transactions",
    "4096",
    "--batches",
    "64",
    "--connections-max",
    "16",
    "--cores",
    "0",
    "--replicas",
    "3",
    "--fsync",
    "never",
    "--accounts-per-shard",
    "8",
    "--records-per-request",
    "100",
    "--warmup-s",
    "1",
    "--window",
    "4",
    "--json",
    "--series",
];

/// Runs `percore bench` with [`BENCH_ARGS`] and `extra`; returns its JSON report and
/// stderr.
fn bench(extra: &[&str]) -> (serde_json::Value, String) {
    bench_args(BENCH_ARGS.iter().chain(extra).copied())
}

/// [`BENCH_ARGS`] with the values of some of its flags replaced, then `extra`.
fn bench_replacing(values: &[(&str, &str)], extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = BENCH_ARGS.to_vec();
    for (flag, value) in values {
        let at = args
            .iter()
            .position(|arg| arg == flag)
            .unwrap_or_else(|| panic!("{flag} is one of BENCH_ARGS"));
        args[at + 1] = value;
    }
    bench_args(args.into_iter().chain(extra.iter().copied()))
}

/// Runs `percore bench` with `args`; returns its JSON report and stderr.
fn bench_args<'a>(args: impl IntoIterator<Item = &'a str>) -> (serde_json::Value, String) {
    let _one_cluster = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_percore"))
        .arg("bench")
        .args(args)
        .output()
        .expect("percore bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "bench failed: {stderr}");
    let report = serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    (report, stderr)
}

#[test]
fn a_soak_run_has_one_point_per_second_flat_rss_and_no_long_commit_gap() {
    let lines_path =
        std::env::temp_dir().join(format!("percore-soak-series-{}.jsonl", std::process::id()));
    let (report, stderr) = bench(&[
        "--duration-s",
        &DURATION_S.to_string(),
        "--series-out",
        lines_path.to_str().expect("a UTF-8 temporary path"),
        // Checkpoints inside the run, for the series' checkpoint columns.
        "--checkpoint-interval-ops",
        &CHECKPOINT_INTERVAL_OPS.to_string(),
    ]);
    assert!(
        report["offered_tx_per_s"].is_null(),
        "closed loop by default"
    );
    let soak = &report["soak"];
    let series = soak["series"].as_array().expect("a series");
    assert_eq!(series.len() as u64, DURATION_S, "{stderr}");
    // --series-out: the same points, one JSON object per line, written as they were taken.
    let lines = std::fs::read_to_string(&lines_path).expect("the series file written");
    // `percore series` reads it back: every second, each in one steal band and one kind
    // of checkpoint work.
    let output = Command::new(env!("CARGO_BIN_EXE_percore"))
        .args(["series", "--json", "--from-s", "0"])
        .arg(&lines_path)
        .output()
        .expect("percore series runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    assert_eq!(summary["seconds"].as_u64(), Some(DURATION_S), "{summary}");
    for split in ["by_steal", "by_checkpoint"] {
        let seconds: u64 = summary[split]
            .as_array()
            .expect("bands")
            .iter()
            .map(|band| band["seconds"].as_u64().expect("a count"))
            .sum();
        assert_eq!(seconds, DURATION_S, "{split}: {summary}");
    }
    let _ = std::fs::remove_file(&lines_path);
    let streamed: Vec<serde_json::Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON point per line"))
        .collect();
    assert_eq!(&streamed, series, "--series-out holds the report's series");
    for point in series {
        assert_eq!(point["rss_kib"].as_array().expect("rss").len(), 3);
        assert!(
            point["rss_kib"]
                .as_array()
                .unwrap()
                .iter()
                .all(|kib| kib.as_u64() > Some(0)),
            "{point}"
        );
        assert!(point["committed_tx_per_s"].as_f64() > Some(0.0), "{point}");
        // Under full load work always waits on every leader, so each second records gaps
        // from the leaders' own percore_commit_gap_us histograms.
        assert!(point["commit_gaps"].as_u64() > Some(0), "{point}");
        let longest_us = point["longest_commit_gap_at_most_us"].as_u64();
        assert!(longest_us.is_some_and(|us| us > 0), "{point}");
        assert!(
            longest_us <= soak["longest_commit_gap_at_most_us"].as_u64(),
            "a second's longest gap exceeds the run's: {point}"
        );
        // Every replica's journals commit every second under load, and say how slowly.
        let journal = &point["journal_commits"];
        assert!(journal["commits"].as_u64() > Some(0), "{point}");
        assert!(
            journal["slow"].as_u64() <= journal["commits"].as_u64(),
            "{point}"
        );
        assert!(
            journal["slowest_at_most_us"]
                .as_u64()
                .is_some_and(|us| us > 0),
            "{point}"
        );
    }
    let journal_commits: u64 = series
        .iter()
        .map(|point| point["journal_commits"]["commits"].as_u64().unwrap())
        .sum();
    assert_eq!(
        soak["journal_commits"]["commits"].as_u64(),
        Some(journal_commits),
        "the run's journal commits are the seconds' commits"
    );
    // Checkpoints happened, and the run's checkpoint work is the seconds' work (the times
    // are whole ms per second, so the seconds' sum may fall short of the run's).
    let checkpointing = &soak["checkpointing"];
    let per_second = |field: &str| -> u64 {
        series
            .iter()
            .map(|point| point["checkpointing"][field].as_u64().expect(field))
            .sum()
    };
    let installed = checkpointing["installed"].as_u64().expect("installed");
    assert!(installed > 0, "no checkpoint in the run: {stderr}");
    assert_eq!(per_second("installed"), installed);
    assert_eq!(
        per_second("segment_switches_reused"),
        checkpointing["segment_switches_reused"].as_u64().unwrap()
    );
    for field in ["snapshot_write_ms", "release_ms"] {
        assert!(
            per_second(field) <= checkpointing[field].as_u64().unwrap(),
            "{field}: {checkpointing}"
        );
    }
    assert!(
        checkpointing["snapshot_write_ms"].as_u64() > Some(0),
        "{installed} snapshot files written in no time: {checkpointing}"
    );
    // Applies are counted; those a leader did during its next write are some of them
    // (none here: what is in flight fits one group commit; see the next test).
    let applies = &soak["applies"];
    let applied_ops = applies["ops"].as_u64().expect("applied ops counted");
    let during_write = applies["during_write"]
        .as_u64()
        .expect("applies during writes");
    assert!(applied_ops > 0, "{stderr}");
    assert!(
        during_write <= applied_ops,
        "{during_write} of {applied_ops}"
    );
    // Every shard of the three replicas (one each) probes its executor's lag about every
    // millisecond: each second holds wake-ups of all three (fewer than a thousand each when
    // the three debug replicas share one core), and the run's are the seconds'.
    let shards_total = 3;
    let lag_wakeups: u64 = series
        .iter()
        .map(|point| {
            let lag = &point["executor_lag"];
            let wakeups = lag["wakeups"].as_u64().expect("executor lag wake-ups");
            assert!(wakeups >= 10 * shards_total, "{point}");
            assert!(lag["late_over_goal"].as_u64() <= Some(wakeups), "{point}");
            assert!(lag["longest_at_most_us"].as_u64().is_some(), "{point}");
            wakeups
        })
        .sum();
    assert_eq!(soak["executor_lag"]["wakeups"].as_u64(), Some(lag_wakeups));
    // Each second carries the CPUs' steal and I/O wait from `/proc/stat`; the run's are
    // the seconds' (the readings chain, and a clock tick is a whole number of ms), its
    // worst CPU-second the seconds' worst.
    let cpu_sum = |field: &str| -> u64 {
        series
            .iter()
            .map(|point| point["cpu"][field].as_u64().expect("cpu time per second"))
            .sum()
    };
    let cpu = &soak["cpu"];
    assert_eq!(cpu["steal_ms"].as_u64(), Some(cpu_sum("steal_ms")), "{cpu}");
    assert_eq!(
        cpu["iowait_ms"].as_u64(),
        Some(cpu_sum("iowait_ms")),
        "{cpu}"
    );
    let worst = series
        .iter()
        .map(|point| point["cpu"]["steal_ms_cpu_max"].as_u64().unwrap())
        .max();
    assert_eq!(cpu["steal_ms_cpu_max"].as_u64(), worst, "{cpu}");
    let gaps = soak["commit_gaps"].as_u64().expect("in-node gaps counted");
    let per_second: u64 = series
        .iter()
        .map(|point| point["commit_gaps"].as_u64().unwrap())
        .sum();
    assert_eq!(gaps, per_second, "the run's gaps are the seconds' gaps");
    assert!(soak["commit_gaps_over_goal"].as_u64() <= Some(gaps));
    let gap_us = soak["longest_commit_gap_at_most_us"]
        .as_u64()
        .expect("in-node gap");
    assert!(
        gap_us <= COMMIT_GAP_MS_MAX * 1_000,
        "a leader went {gap_us} µs between commits with work waiting: {stderr}"
    );
    for (replica, growth) in soak["rss_growth_percent"]
        .as_array()
        .expect("growth")
        .iter()
        .enumerate()
    {
        let growth = growth.as_f64().expect("a number");
        assert!(
            growth <= RSS_GROWTH_PERCENT_MAX,
            "replica {replica} RSS grew {growth:.1}% after warm-up: {stderr}"
        );
    }
    let gap_ms = soak["longest_commit_gap_sampled_ms"]
        .as_u64()
        .expect("sampled gap");
    assert!(
        gap_ms <= COMMIT_GAP_MS_MAX,
        "a leader's commit op stood still for {gap_ms} ms: {stderr}"
    );
    assert!(soak["p999_us"].as_u64() > Some(0));
    // The summary counts the seconds with a p99 over 10 ms, by cause, as the series has them.
    let slow = series
        .iter()
        .filter(|point| point["latency_us"]["p99"].as_u64() > Some(10_000))
        .count();
    let said = stderr
        .lines()
        .find_map(|line| line.split("seconds with request p99 over 10 ms: ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|count| count.parse::<usize>().ok());
    assert_eq!(said, Some(slow), "{stderr}");
    eprintln!("{stderr}");
}

/// With more requests queued than one group commit holds, a leader applies what its last
/// write committed while its next write is in flight (`journal_commit_applying`), and the
/// cluster still answers every request. 16 requests of 1,000 transfers per shard in flight
/// (four connections, four each) against a 512 KiB write buffer (four batches): each round
/// of requests takes several group commits back to back.
#[test]
fn a_leader_with_requests_queued_applies_during_its_next_write() {
    let (report, stderr) = bench_replacing(
        &[
            ("--records-per-request", "1000"),
            ("--transactions", "16384"),
            ("--fsync", "always"),
        ],
        &["--connections-per-shard", "4", "--duration-s", "5"],
    );
    assert_eq!(report["failed"].as_u64(), Some(0), "{stderr}");
    let applies = &report["soak"]["applies"];
    let applied_ops = applies["ops"].as_u64().expect("applied ops counted");
    let during_write = applies["during_write"]
        .as_u64()
        .expect("applies during writes");
    assert!(
        during_write > 0 && during_write <= applied_ops,
        "{during_write} of {applied_ops} ops applied by a leader during its next write: {stderr}"
    );
    eprintln!("{during_write} of {applied_ops} ops applied during a leader's next write");
}

#[test]
fn a_paced_run_keeps_to_its_offered_rate() {
    let (report, stderr) = bench(&[
        "--duration-s",
        &PACED_DURATION_S.to_string(),
        "--rate",
        &PACED_RATE_TX_PER_S.to_string(),
    ]);
    assert_eq!(
        report["offered_tx_per_s"].as_f64(),
        Some(PACED_RATE_TX_PER_S),
        "{report}"
    );
    assert!(
        report["pacing"]
            .as_str()
            .is_some_and(|p| p.starts_with("open loop")),
        "{report}"
    );
    assert!(report["peak_tx_per_s"].is_null(), "{report}");
    let achieved = report["total_committed_tx_per_s"].as_f64().expect("rate");
    assert!(
        achieved <= PACED_RATE_TX_PER_S * (1.0 + PACED_RATE_EXCESS_MAX),
        "committed {achieved:.0} tx/s with {PACED_RATE_TX_PER_S} offered: {stderr}"
    );
    assert!(
        achieved >= PACED_RATE_TX_PER_S * PACED_RATE_SHARE_MIN,
        "committed only {achieved:.0} tx/s of {PACED_RATE_TX_PER_S} offered: {stderr}"
    );
    assert_eq!(report["failed"].as_u64(), Some(0), "{report}");
    let series = report["soak"]["series"].as_array().expect("a series");
    assert_eq!(series.len() as u64, PACED_DURATION_S, "{stderr}");
    assert!(report["request_latency_us"]["p50"].as_u64() > Some(0));
    // This load keeps up, and the latency counts every request due in the window.
    assert_every_request_due_is_measured(&report, PACED_RATE_TX_PER_S, &stderr);
    assert!(report["requests_unsent_at_end"].is_u64(), "{report}");
}

/// The latency of an open-loop run at `offered` tx/s counts every request due in its
/// window, answered or not: as many as the window's length at that rate, within 10 %.
fn assert_every_request_due_is_measured(report: &serde_json::Value, offered: f64, stderr: &str) {
    let duration_s = report["duration_s"].as_f64().expect("duration");
    let due = offered * duration_s / PACED_RECORDS_PER_REQUEST;
    let measured = report["requests_measured"]
        .as_f64()
        .expect("requests measured");
    assert!(
        (measured - due).abs() <= 0.1 * due + 2.0,
        "{measured} requests measured, {due:.0} due in the window: {stderr}"
    );
}

/// Seconds measured by the runs whose leader is paused.
const FOLLOW_DURATION_S: u64 = 8;
/// How long group 0's leader is stopped: past the followers' leader timeout (150-300 ms)
/// with room for their view change on a loaded debug box.
const LEADER_PAUSE_MS: u64 = 1_500;

/// The process whose command line names `data_dir` (a node's `--data-dir`).
fn node_pid(data_dir: &std::path::Path) -> Option<i32> {
    let wanted = data_dir.to_str().expect("a UTF-8 path");
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
        let is_node = args.contains(&b"node".as_slice());
        let names_dir = args.contains(&wanted.as_bytes());
        (is_node && names_dir).then_some(pid)
    })
}

/// Sends `signal` ("STOP", "CONT") to `pid` with kill(1).
fn signal(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// Runs `percore bench` with leader failover (the nodes' default) and `extra`; once the
/// load runs, stops group 0's first leader (replica 0) for [`LEADER_PAUSE_MS`] with
/// SIGSTOP, so that its followers elect another, then lets it go on. Returns the JSON
/// report and stderr.
fn bench_with_paused_leader(name: &str, extra: &[&str]) -> (serde_json::Value, String) {
    use std::io::{BufRead as _, BufReader};
    use std::process::Stdio;
    let _one_cluster = CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let root = std::env::temp_dir().join(format!("percore-soak-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // BENCH_ARGS without its leading `--fixed-view`.
    assert_eq!(BENCH_ARGS[0], "--fixed-view");
    let mut child = Command::new(env!("CARGO_BIN_EXE_percore"))
        .arg("bench")
        .args(&BENCH_ARGS[1..])
        .args(["--duration-s", &FOLLOW_DURATION_S.to_string()])
        .arg("--data-dir")
        .arg(&root)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("percore bench starts");
    let stderr_pipe = child.stderr.take().expect("stderr piped");
    let (running_tx, running_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            // The first per-second point: the load runs.
            if line.contains("tx/s") && line.contains("p50") {
                let _ = running_tx.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let running = running_rx.recv_timeout(std::time::Duration::from_secs(120));
    let paused = running.ok().and_then(|()| {
        let pid = node_pid(&root.join("replica-0"))?;
        signal(pid, "STOP");
        std::thread::sleep(std::time::Duration::from_millis(LEADER_PAUSE_MS));
        signal(pid, "CONT");
        Some(pid)
    });
    let output = child.wait_with_output().expect("percore bench ends");
    let stderr = reader.join().expect("stderr reader");
    assert!(
        paused.is_some(),
        "the load never ran, or no node of replica 0: {stderr}"
    );
    assert!(output.status.success(), "bench failed: {stderr}");
    let report = serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    let _ = std::fs::remove_dir_all(&root);
    (report, stderr)
}

/// Checks what a run whose leader was paused must show: the load moved to the new leader,
/// every request was answered Ok (those sent again too), and the series went on.
fn assert_followed(report: &serde_json::Value, stderr: &str) {
    assert!(
        report["leader_follows"].as_u64() >= Some(1),
        "no connection moved to a new leader: {stderr}"
    );
    assert_eq!(report["failed"].as_u64(), Some(0), "{stderr}");
    assert!(report["acknowledged"].as_u64() > Some(0), "{stderr}");
    let series = report["soak"]["series"].as_array().expect("a series");
    assert_eq!(series.len() as u64, FOLLOW_DURATION_S, "{stderr}");
    assert!(
        series
            .last()
            .is_some_and(|point| point["committed_tx_per_s"].as_f64() > Some(0.0)),
        "nothing committed after the leader change: {stderr}"
    );
    // The batch figures survive the leader change too: the entries sealed in the window
    // (mean batch x batches, counted by whichever replica sealed) are the transfers
    // committed in it, give or take the requests in flight at its two ends. (They were once
    // read from the leader of the moment, so a change mixed two replicas' counters.)
    let duration_s = report["duration_s"].as_f64().expect("duration");
    for row in report["per_shard"].as_array().expect("per-shard rows") {
        let sealed = row["mean_batch_entries"].as_f64().expect("mean batch")
            * row["batches"].as_f64().expect("batches");
        let committed = row["committed_tx_per_s"].as_f64().expect("committed") * duration_s;
        assert!(
            (sealed - committed).abs() <= 0.1 * committed + 2_000.0,
            "shard {}: {sealed} entries sealed, {committed} committed: {stderr}",
            row["shard"]
        );
    }
}

/// An open loop far beyond what the cluster commits: the latency must count every request
/// due in the window, not only those answered in it. (It once counted the replies that
/// came inside the window, which under overload left out the backlog at its end.)
#[test]
fn an_overloaded_paced_run_counts_every_request_due_in_its_window() {
    const OVERLOAD_TX_PER_S: f64 = 2_000_000.0;
    const OVERLOAD_DURATION_S: u64 = 3;
    let (report, stderr) = bench(&[
        "--duration-s",
        &OVERLOAD_DURATION_S.to_string(),
        "--rate",
        &OVERLOAD_TX_PER_S.to_string(),
    ]);
    let duration_s = report["duration_s"].as_f64().expect("duration");
    let committed = report["total_committed_tx_per_s"].as_f64().expect("rate");
    assert!(
        committed < OVERLOAD_TX_PER_S / 4.0,
        "the cluster kept up with {OVERLOAD_TX_PER_S} tx/s: no overload to measure: {stderr}"
    );
    assert_every_request_due_is_measured(&report, OVERLOAD_TX_PER_S, &stderr);
    let unsent = report["requests_unsent_at_end"]
        .as_f64()
        .expect("an open loop");
    let answered =
        report["acknowledged"].as_f64().expect("acknowledged") / PACED_RECORDS_PER_REQUEST;
    assert!(
        unsent > answered,
        "{unsent} requests never sent, {answered} answered: {stderr}"
    );
    // The backlog grows through the window: its median request waited at least a quarter
    // of it, its oldest nearly all of it.
    let latency = &report["request_latency_us"];
    let window_us = duration_s * 1e6;
    assert!(
        latency["p50"].as_f64().expect("p50") >= 0.25 * window_us,
        "{latency} over a {duration_s} s window: {stderr}"
    );
    assert!(
        latency["max"].as_f64().expect("max") >= 0.9 * window_us,
        "{latency} over a {duration_s} s window: {stderr}"
    );
}

#[test]
fn a_closed_loop_load_follows_its_group_to_a_new_leader() {
    let (report, stderr) = bench_with_paused_leader("follow-closed", &[]);
    assert_followed(&report, &stderr);
}

#[test]
fn a_paced_load_follows_its_group_to_a_new_leader() {
    let (report, stderr) = bench_with_paused_leader(
        "follow-paced",
        &["--rate", &PACED_RATE_TX_PER_S.to_string()],
    );
    assert_followed(&report, &stderr);
}
