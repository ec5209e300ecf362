//! `percore bench --series` end to end: a local 3-replica cluster under load for
//! [`DURATION_S`] seconds, checked for the shape of a healthy long run (one series point per
//! second, no RSS growth after warm-up, no long commit gaps), not for throughput goals.

use std::process::Command;

/// Seconds measured.
const DURATION_S: u64 = 20;
/// Most RSS growth (percent) any replica may show after the warm-up share of the run.
const RSS_GROWTH_PERCENT_MAX: f64 = 10.0;
/// Longest stretch (ms) a leader's commit op may stand still while load is offered.
const COMMIT_GAP_MS_MAX: u64 = 2_000;
/// Node and load sizes small enough for three debug nodes on a CI box (as in
/// tests/tests/cluster.rs).
const BENCH_ARGS: [&str; 32] = [
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

#[test]
fn a_soak_run_has_one_point_per_second_flat_rss_and_no_long_commit_gap() {
    let output = Command::new(env!("CARGO_BIN_EXE_percore"))
        .arg("bench")
        .args(BENCH_ARGS)
        .args(["--duration-s", &DURATION_S.to_string()])
        .output()
        .expect("percore bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
    let soak = &report["soak"];
    let series = soak["series"].as_array().expect("a series");
    assert_eq!(series.len() as u64, DURATION_S, "{stderr}");
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
    }
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
    let gap_ms = soak["longest_commit_gap_ms"].as_u64().expect("gap");
    assert!(
        gap_ms <= COMMIT_GAP_MS_MAX,
        "a leader's commit op stood still for {gap_ms} ms: {stderr}"
    );
    assert!(soak["p999_us"].as_u64() > Some(0));
    eprintln!("{stderr}");
}
