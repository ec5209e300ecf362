//! The `percore` binary as an operator runs it: real processes, signals, exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PERCORE: &str = env!("CARGO_BIN_EXE_percore");

fn first_core_list() -> String {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online >= 2 {
        "0,1".to_string()
    } else {
        "0".to_string()
    }
}

#[test]
fn node_drains_and_exits_cleanly_on_sigterm() {
    let mut child = Command::new(PERCORE)
        .args([
            "node",
            "--cores",
            &first_core_list(),
            "--client-port-base",
            "0",
        ])
        .args(["--accounts-max", "1024", "--transfers-max", "4096"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("percore starts");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("serving clients at"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("node did not come up: {seen:#?}"),
        }
    }
    // Deliver the signal as an operator (or systemd) would.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "node did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    seen.extend(lines_rx.try_iter());
    assert!(exit.success(), "exit {exit:?}: {seen:#?}");
    assert!(seen.iter().any(|l| l.contains("draining")), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("stopped at op")),
        "{seen:#?}"
    );
}

#[test]
fn a_core_that_does_not_exist_is_refused_with_a_clear_error() {
    let output = Command::new(PERCORE)
        .args(["node", "--cores", "4095"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("core 4095 does not exist"), "{stderr}");
}

#[test]
fn bad_arguments_are_refused_by_the_parser() {
    let output = Command::new(PERCORE)
        .args(["bench", "--cross-shard-percent", "101"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--cross-shard-percent"), "{stderr}");
}

#[test]
fn bench_load_flags_are_checked_by_the_parser() {
    let refused = |args: &[&str], expected: &str| {
        let output = Command::new(PERCORE)
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    // A rate and a share of the peak say two different things.
    refused(&["--rate", "1000", "--load", "0.5"], "cannot be used with");
    refused(&["--load", "1.5"], "0 < FRACTION <= 1");
    refused(&["--load", "0"], "0 < FRACTION <= 1");
    refused(&["--rate", "0"], "positive number of transfers per second");
    refused(&["--rate", "fast"], "not a rate");
    // The peak run's length means nothing without --load.
    refused(&["--peak-s", "3"], "--load");
}
