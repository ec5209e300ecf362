//! The deterministic cluster simulator in CI: a fixed batch of seeds over several cluster
//! shapes must pass every checker; injected bugs must be caught; a seed replays exactly;
//! every seed in `tests/seeds.txt` gives the outcome recorded there.
//!
//! Sized for `cargo test --workspace` in debug (about 50 ms a seed, the batches run in
//! parallel as separate tests). The long mode is `#[ignore]`d:
//! `cargo test -p percore-tests --release --test sim -- --ignored`, or
//! `cargo run -p percore-tests --release --bin sim -- --seeds 0..10000`.

use std::ops::Range;

use percore_tests::sim::{self, Bug, Failure, Options};

/// Runs `seeds` with `options`; returns the failures.
fn run_batch(seeds: Range<u64>, options: &Options) -> Vec<Failure> {
    seeds
        .filter_map(|seed| sim::run(seed, options).err().map(|failure| *failure))
        .collect()
}

fn assert_batch_passes(seeds: Range<u64>, options: Options) {
    let failures = run_batch(seeds.clone(), &options);
    if let Some(first) = failures.first() {
        let list: Vec<String> = failures
            .iter()
            .map(|failure| format!("{} ({})", failure.seed, failure.checker))
            .collect();
        panic!(
            "{} of seeds {seeds:?} failed ({options:?}): {}\nfirst failure:\n{first}\nadd each seed to tests/seeds.txt",
            failures.len(),
            list.join(", ")
        );
    }
}

#[test]
fn three_replicas_two_groups_with_faults() {
    assert_batch_passes(0..200, Options::default());
}

#[test]
fn five_replicas_two_groups_with_faults() {
    let options = Options {
        replicas: 5,
        ..Options::default()
    };
    assert_batch_passes(1_000..1_100, options);
}

#[test]
fn one_group_with_faults() {
    let options = Options {
        groups: 1,
        ..Options::default()
    };
    assert_batch_passes(2_000..2_100, options);
    let options = Options {
        groups: 1,
        replicas: 5,
        ..Options::default()
    };
    assert_batch_passes(2_100..2_150, options);
}

#[test]
fn no_faults_converges() {
    let options = Options {
        faults: false,
        ..Options::default()
    };
    assert_batch_passes(3_000..3_030, options);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 8] {
        let first = sim::run(seed, &Options::default());
        let second = sim::run(seed, &Options::default());
        match (first, second) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "seed {seed}"),
            (Err(a), Err(b)) => assert_eq!(
                (a.step, a.checker, &a.message, &a.trace),
                (b.step, b.checker, &b.message, &b.trace),
                "seed {seed}"
            ),
            (a, b) => panic!("seed {seed} ran differently: {a:?} / {b:?}"),
        }
    }
    let a = sim::run(7, &Options::default()).map(|summary| summary.time_us);
    let b = sim::run(8, &Options::default()).map(|summary| summary.time_us);
    assert_ne!(
        format!("{a:?}"),
        format!("{b:?}"),
        "different seeds, different runs"
    );
}

/// The leader sends Prepares before its own write is durable; a crash loses the op on the
/// leader while followers hold it (or the op number is reassigned): the prefix rule breaks.
#[test]
fn send_before_durable_is_caught() {
    let options = Options {
        bug: Some(Bug::SendBeforeDurable),
        ..Options::default()
    };
    let failures = run_batch(0..40, &options);
    assert!(
        failures
            .iter()
            .any(|failure| matches!(failure.checker, "agreement" | "durability")),
        "no agreement or durability violation in 40 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// Followers acknowledge before their fsync: the leader commits ops that only it holds
/// durably, and a follower crash then leaves a committed op on less than a quorum.
#[test]
fn ack_before_durable_is_caught() {
    let options = Options {
        bug: Some(Bug::AckBeforeDurable),
        ..Options::default()
    };
    let failures = run_batch(0..40, &options);
    assert!(
        failures
            .iter()
            .any(|failure| matches!(failure.checker, "durability" | "durable-before-ack")),
        "no durability violation in 40 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// One line of `tests/seeds.txt`: `<sim arguments> expect=<checker|pass>  # why`.
struct SeedCase {
    line: usize,
    arguments: String,
    expect: String,
}

fn seed_cases() -> Vec<SeedCase> {
    let text = include_str!("../seeds.txt");
    let mut cases = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let (arguments, expect) = content
            .rsplit_once("expect=")
            .unwrap_or_else(|| panic!("seeds.txt line {}: no expect=", index + 1));
        cases.push(SeedCase {
            line: index + 1,
            arguments: arguments.trim().to_string(),
            expect: expect.trim().to_string(),
        });
    }
    cases
}

#[test]
fn seeds_file_replays() {
    let cases = seed_cases();
    assert!(!cases.is_empty(), "tests/seeds.txt lists seeds");
    for case in cases {
        let arguments = case.arguments.split_whitespace().map(str::to_string);
        let (options, seeds) = sim::parse_args(arguments)
            .unwrap_or_else(|error| panic!("seeds.txt line {}: {error}", case.line));
        for seed in seeds {
            let outcome = match sim::run(seed, &options) {
                Ok(_) => "pass".to_string(),
                Err(failure) => failure.checker.to_string(),
            };
            assert_eq!(
                outcome, case.expect,
                "seeds.txt line {} (seed {seed}, {}): outcome changed; if a fix made it pass, \
                 update the line to expect=pass",
                case.line, case.arguments
            );
        }
    }
}

#[test]
#[ignore = "long mode: minutes in debug"]
fn long_mode() {
    assert_batch_passes(0..10_000, Options::default());
    let options = Options {
        replicas: 5,
        ..Options::default()
    };
    assert_batch_passes(10_000..12_000, options);
}
