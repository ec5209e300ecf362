//! The deterministic cluster simulator in CI: a fixed batch of seeds over several cluster
//! shapes must pass every checker; injected bugs must be caught; a seed replays exactly;
//! every seed in `tests/seeds.txt` gives the outcome recorded there.
//!
//! Most batches run with leader failover (`Options::view_change`); a smaller fixed-view
//! batch keeps the runtime's default shape covered. Sized for `cargo test --workspace` in
//! debug (about 50 ms a seed, the batches run in parallel as separate tests). The long mode
//! is `#[ignore]`d:
//! `cargo test -p percore-tests --release --test sim -- --ignored`, or
//! `cargo run -p percore-tests --release --bin sim -- --seeds 0..10000`.

use std::ops::Range;

use percore_tests::sim::{self, Bug, Failure, Options};
use percore_tests::support::SeedCase;

/// Runs `seeds` with `options`; returns the failures.
fn run_batch(seeds: Range<u64>, options: &Options) -> Vec<Failure> {
    run_batch_summaries(seeds, options).0
}

/// Runs `seeds` with `options`; returns the failures and the passing runs' summaries.
fn run_batch_summaries(seeds: Range<u64>, options: &Options) -> (Vec<Failure>, Vec<sim::Summary>) {
    let mut failures = Vec::new();
    let mut summaries = Vec::new();
    for seed in seeds {
        match sim::run(seed, options) {
            Ok(summary) => summaries.push(summary),
            Err(failure) => failures.push(*failure),
        }
    }
    (failures, summaries)
}

/// Seeds `tests/seeds.txt` records as failing with exactly `options` (known issues, replayed
/// by `seeds_file_replays`): a batch skips them.
fn known_failures(options: &Options) -> Vec<u64> {
    seed_cases()
        .into_iter()
        .filter(|case| case.expect != "pass")
        .filter_map(|case| {
            let arguments = case.arguments.split_whitespace().map(str::to_string);
            let (parsed, seeds) = sim::parse_args(arguments).ok()?;
            (parsed == *options).then_some(seeds)
        })
        .flatten()
        .collect()
}

/// Fails unless every seed passes (but those `tests/seeds.txt` records as failing); returns
/// the passing runs' summaries.
fn assert_batch_passes(seeds: Range<u64>, options: Options) -> Vec<sim::Summary> {
    let known = known_failures(&options);
    let (failures, summaries) = run_batch_summaries(seeds.clone(), &options);
    let failures: Vec<Failure> = failures
        .into_iter()
        .filter(|failure| !known.contains(&failure.seed))
        .collect();
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
    summaries
}

// With leader failover (view change), the shape CI runs most: crashes and pauses aimed at
// leaders, partitions isolating them, clients that look for the leader.

#[test]
fn view_change_three_replicas_two_groups() {
    assert_batch_passes(0..200, Options::view_change());
}

#[test]
fn view_change_five_replicas_two_groups() {
    let options = Options {
        replicas: 5,
        ..Options::view_change()
    };
    assert_batch_passes(1_000..1_080, options);
}

#[test]
fn view_change_one_group() {
    let options = Options {
        groups: 1,
        ..Options::view_change()
    };
    assert_batch_passes(2_000..2_100, options);
    let options = Options {
        groups: 1,
        replicas: 5,
        ..Options::view_change()
    };
    assert_batch_passes(2_100..2_140, options);
}

/// Pipelines far below the ops a run produces: a StartView's checksums then cover only the
/// last few ops, and lagging replicas keep entries below them (`docs/simulator.md`, issue 8).
#[test]
fn view_change_small_pipelines() {
    for (pipeline, seeds) in [(1, 4_000..4_040), (2, 4_100..4_140), (4, 4_200..4_240)] {
        let options = Options {
            pipeline_prepares_max: pipeline,
            ..Options::view_change()
        };
        assert_batch_passes(seeds, options);
    }
}

/// Leader rebalancing (`ReplicaConfig::leader_rebalance_us`): after a failover, a group goes
/// back to its view-0 leader once that replica has been connected and caught up for a few
/// hundred ms, by a view change its current leader starts. Every checker runs across those
/// handoffs, and the summary must show some.
#[test]
fn view_change_leader_rebalance() {
    for (replicas, rebalance_ms, seeds) in [(3, 400, 5_000..5_060), (5, 300, 5_100..5_130)] {
        let options = Options {
            replicas,
            rebalance_ms,
            ..Options::view_change()
        };
        let handoffs: u64 = assert_batch_passes(seeds, options)
            .iter()
            .map(|summary| summary.leader_handoffs)
            .sum();
        assert!(handoffs > 0, "no handoff in {replicas} replicas' runs");
    }
}

/// Disk loss (`percore format --replace`): in some runs a replica restarted by a fault first
/// loses its disk and comes back on a blank one marked replacing; it must rebuild (hear the
/// views of `f + 1` others, install a log at least that new) before it acknowledges or votes.
/// Every checker runs across those rebuilds, and the summaries must show replacements, each
/// rebuilt by the end of its run.
#[test]
fn view_change_replaced_disks() {
    for (replicas, seeds) in [(3, 6_000..6_060), (5, 6_130..6_160)] {
        let options = Options {
            replicas,
            replace: true,
            ..Options::view_change()
        };
        let summaries = assert_batch_passes(seeds, options);
        let replaced: u64 = summaries.iter().map(|summary| summary.replacements).sum();
        let rebuilt: u64 = summaries
            .iter()
            .map(|summary| summary.replacements_rebuilt)
            .sum();
        assert!(replaced > 0, "no disk lost in {replicas} replicas' runs");
        assert_eq!(rebuilt, replaced, "every replaced replica rebuilds");
    }
}

/// Checkpoints, journal retention and state sync (`--sync on`): replicas checkpoint every
/// few ops and stop serving ops below their previous checkpoint that no peer within
/// `retain_ops` needs; a replica asking for a removed op is answered `NotRetained` and
/// syncs to a peer's checkpoint. That includes the new leader of a view whose selected log
/// its peers no longer hold whole, and a replica rebuilding after `--replace`. Every
/// checker runs across the syncs; the installed checkpoint's state must be the committed
/// state at its op.
#[test]
fn view_change_checkpoints_and_state_sync() {
    let mut installed = 0;
    let mut by_leader = 0;
    let mut by_replacing = 0;
    for (replicas, groups, replace, rebalance_ms, seeds) in [
        (3, 2, false, 0, 7_000..7_060),
        (5, 2, false, 0, 7_100..7_130),
        (3, 1, true, 0, 7_200..7_230),
        (5, 2, true, 400, 7_400..7_420),
    ] {
        let options = Options {
            replicas,
            groups,
            replace,
            rebalance_ms,
            sync: true,
            ..Options::view_change()
        };
        let summaries = assert_batch_passes(seeds, options);
        let sum = |count: fn(&sim::Summary) -> u64| summaries.iter().map(count).sum::<u64>();
        installed += sum(|summary| summary.state_syncs_installed);
        by_leader += sum(|summary| summary.state_syncs_leader);
        by_replacing += sum(|summary| summary.state_syncs_replacing);
    }
    assert!(installed > 0, "no state sync was installed");
    assert!(
        by_leader > 0,
        "no new leader synced while installing its view"
    );
    assert!(
        by_replacing > 0,
        "no replaced replica rebuilt through a sync"
    );
}

#[test]
fn view_change_no_faults_converges() {
    let options = Options {
        faults: false,
        ..Options::view_change()
    };
    assert_batch_passes(3_000..3_030, options);
}

// The fixed view (every group keeps view 0), as the runtime runs without `view_change`.

#[test]
fn fixed_view_three_replicas_two_groups() {
    assert_batch_passes(0..100, Options::default());
}

#[test]
fn fixed_view_five_replicas_and_one_group() {
    let options = Options {
        replicas: 5,
        ..Options::default()
    };
    assert_batch_passes(1_000..1_040, options);
    let options = Options {
        groups: 1,
        ..Options::default()
    };
    assert_batch_passes(2_000..2_040, options);
}

#[test]
fn fixed_view_no_faults_converges() {
    let options = Options {
        faults: false,
        ..Options::default()
    };
    assert_batch_passes(3_000..3_020, options);
}

/// Checkpoints, retention and state sync (`--sync on`) in the fixed view: followers that
/// fell behind what their peers retain sync to a checkpoint (the leader, whose journal is
/// the group's log, never needs to).
#[test]
fn fixed_view_checkpoints_and_state_sync() {
    let options = Options {
        sync: true,
        ..Options::default()
    };
    let summaries = assert_batch_passes(7_300..7_360, options);
    let installed: u64 = summaries
        .iter()
        .map(|summary| summary.state_syncs_installed)
        .sum();
    assert!(installed > 0, "no state sync was installed");
}

#[test]
fn a_seed_replays_exactly() {
    for (seed, options) in [
        (7, Options::default()),
        (8, Options::default()),
        (7, Options::view_change()),
        (
            7,
            Options {
                sync: true,
                replace: true,
                ..Options::view_change()
            },
        ),
    ] {
        let first = sim::run(seed, &options);
        let second = sim::run(seed, &options);
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

/// With view change a leader sends each Prepare as soon as it stages the entry, so a crash
/// can lose entries its followers hold; a restarted leader therefore leaves its old view.
/// With that rule broken (`--bug leader-resumes-view`) it seals other entries under op
/// numbers the followers hold in the same view, and the safety checkers see two entries
/// for one op (agreement, state-agreement) or a truncation of a committed one.
#[test]
fn leader_resumes_view_is_caught() {
    let options = Options {
        bug: Some(Bug::LeaderResumesView),
        ..Options::view_change()
    };
    let failures = run_batch(100..200, &options);
    assert!(
        failures.iter().any(|failure| matches!(
            failure.checker,
            "agreement" | "state-agreement" | "truncate-committed"
        )),
        "no safety violation in 100 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// A replica that lost its disk and restarts on the blank one as if nothing was lost
/// (`--bug replace-as-new`: no `replacing_start`) acknowledges and votes with an empty log.
/// The checkers still count what it lost as held, so what they catch is the consequence: a
/// view change that drops a committed op (agreement, state-agreement, truncate-committed,
/// or the engine's own assertion that the selected log holds every committed op). The
/// floor rule (`--bug replace-skip-floor`) is caught more rarely; `tests/seeds.txt` replays
/// the seeds that catch it.
#[test]
fn replace_as_new_is_caught() {
    let options = Options {
        bug: Some(Bug::ReplaceAsNew),
        replace: true,
        ..Options::view_change()
    };
    let failures = run_batch(60..180, &options);
    assert!(
        failures.iter().any(|failure| matches!(
            failure.checker,
            "agreement" | "state-agreement" | "truncate-committed" | "durability" | "panic"
        )),
        "no safety violation in 120 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// A replica keeps the clients of the ops a truncation cuts and answers them when the new
/// view's entry under the same op number applies: replies for other requests' records, from
/// an op that did commit. Linearizability catches it at the reply (the reply's op is
/// committed and durable; when the client's retry committed its records elsewhere, as in
/// seed 16, no other checker does).
#[test]
fn keep_origins_on_truncate_is_caught_by_linearizability() {
    let options = Options {
        bug: Some(Bug::KeepOriginsOnTruncate),
        ..Options::view_change()
    };
    let failures = run_batch(0..60, &options);
    assert!(
        failures
            .iter()
            .any(|failure| failure.checker == "linearizability"),
        "no linearizability violation in 60 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// A replica whose journal lost entries it may have acknowledged (durable sectors damaged
/// while it was down) restarts without recovering status: it acknowledges and votes with
/// the shorter log. The **recovering** checker catches a vote for less than it voted for
/// before, and **durability** a committed op that only the damaged replica's promise kept
/// on a quorum.
#[test]
fn forget_recovering_is_caught() {
    for options in [Options::default(), Options::view_change()] {
        let options = Options {
            bug: Some(Bug::ForgetRecovering),
            ..options
        };
        let failures = run_batch(0..60, &options);
        assert!(
            failures
                .iter()
                .any(|failure| failure.checker == "recovering"),
            "no recovering violation in 60 seeds ({options:?}): {:?}",
            failures
                .iter()
                .map(|failure| (failure.seed, failure.checker))
                .collect::<Vec<_>>()
        );
    }
}

/// Without session descriptors in the journal (`--bug no-sessions`), a retry that reaches a
/// new leader after its request committed is applied again and answered `Exists`: the
/// **client-result** checker (a client sees only `Ok`) catches it.
#[test]
fn no_sessions_is_caught() {
    let options = Options {
        bug: Some(Bug::NoSessions),
        ..Options::view_change()
    };
    let failures = run_batch(0..20, &options);
    assert!(
        failures
            .iter()
            .any(|failure| failure.checker == "client-result"),
        "no retry answered `Exists` in 20 seeds: {:?}",
        failures
            .iter()
            .map(|failure| (failure.seed, failure.checker))
            .collect::<Vec<_>>()
    );
}

/// The linearizability checker saw every reply and every client record of passing runs
/// (a run fails if a reply was never compared; this shows the counts are not vacuous).
#[test]
fn linearizability_checks_every_reply() {
    for options in [Options::default(), Options::view_change()] {
        for seed in 0..4 {
            let summary = sim::run(seed, &options).unwrap_or_else(|failure| panic!("{failure}"));
            assert!(summary.requests > 0, "seed {seed}: no request answered");
            assert_eq!(summary.answers_checked, summary.requests, "seed {seed}");
            assert!(
                summary.records_ordered >= summary.requests,
                "seed {seed}: {} records ordered for {} requests",
                summary.records_ordered,
                summary.requests
            );
        }
    }
}

fn seed_cases() -> Vec<SeedCase> {
    percore_tests::support::seed_cases(include_str!("../seeds.txt"), "seeds.txt")
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
    assert_batch_passes(0..10_000, Options::view_change());
    let options = Options {
        replicas: 5,
        ..Options::view_change()
    };
    assert_batch_passes(10_000..12_000, options);
    assert_batch_passes(20_000..22_000, Options::default());
    let options = Options {
        sync: true,
        replace: true,
        ..Options::view_change()
    };
    assert_batch_passes(30_000..32_000, options);
}
