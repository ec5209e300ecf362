//! The BFT simulator's command line: replay one seed, or run a range and report failures.
//!
//! ```text
//! cargo run -p percore-tests --bin sim_bft -- --seed 42 [--replicas 4|7] [--byzantine N]
//!     [--crashes N] [--crash-all] [--slow-links] [--beyond-budget] [--journal-before-prepared] [--prepared-before-guard]
//!     [--client-weak-quorum] [--commits-undurable-max N]
//!     [--behaviour silent|equivocate|wrong-digest|withhold|replay|forge|forge-request|flood-state]
//!     [--steps N] [--faults on|off]
//!     [--bug quorum-minus-one|new-view-ignores-prepared|votes-without-proposal-check|
//!            restore-ignores-guard|restore-drops-prepared] [-v]
//! cargo run -p percore-tests --release --bin sim_bft -- --seeds 0..10000
//! ```

use std::process::ExitCode;

use percore_tests::bft_sim;

fn main() -> ExitCode {
    let (options, seeds) = match bft_sim::parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("sim_bft: {error}");
            eprintln!(
                "usage: sim_bft (--seed S | --seeds A..B) [--replicas 4|7] [--byzantine N] \\
                 [--crashes N] [--crash-all] [--slow-links] [--beyond-budget] [--journal-before-prepared] \\
                 [--prepared-before-guard] [--client-weak-quorum] [--commits-undurable-max N] \\
                 [--behaviour silent|equivocate|wrong-digest|withhold|replay|forge|forge-request|flood-state] \\
                 [--steps N] [--faults on|off] \\
                 [--bug quorum-minus-one|new-view-ignores-prepared|votes-without-proposal-check|\\
                 restore-ignores-guard|restore-drops-prepared] [-v]"
            );
            return ExitCode::from(2);
        }
    };
    let single = seeds.end == seeds.start + 1;
    let mut failures = Vec::new();
    let mut total = bft_sim::Summary::default();
    let mut byzantine_first_leader = 0u64;
    for seed in seeds.clone() {
        if single {
            println!("seed {seed}");
        }
        match bft_sim::run(seed, &options) {
            Ok(summary) => {
                if single {
                    println!("seed {seed} passed: {summary:?}");
                }
                total.add(&summary);
                byzantine_first_leader += u64::from(summary.byzantine_first_leader);
            }
            Err(failure) => {
                print!("{failure}");
                println!(
                    "replay: cargo run -p percore-tests --bin sim_bft -- --seed {seed} {}",
                    bft_sim::options_args(&options).join(" ")
                );
                failures.push((seed, failure.checker));
            }
        }
    }
    if !single {
        println!(
            "seeds {}..{}: {} passed, {} failed",
            seeds.start,
            seeds.end,
            seeds.end - seeds.start - failures.len() as u64,
            failures.len()
        );
        println!(
            "passing runs: {} with a Byzantine first leader; ops committed {}, requests accepted {}, \
             view changes {} (highest view {}), stable checkpoints {}, state transfers {}, \
             equivocations accepted by correct replicas {}, detected {}, messages refused {} \
             (bad signatures {}), proposals refused for unsigned requests {} ({} after a \
             restart), dropped {}; \
             restarts {}, guard writes {}, sends held for a guard or prepared write {} \
             ({} others left past a held Commit), prepared \
             certificates persisted {} and restored {}; state requests refused for want of \
             serve budget {} ({} of correct replicas), ops served to Byzantine replicas {}; \
             executions held for undurable commits {}",
            byzantine_first_leader,
            total.ops_committed,
            total.requests_accepted,
            total.view_changes,
            total.view_max,
            total.checkpoints,
            total.state_transfers,
            total.equivocations_accepted,
            total.equivocations_detected,
            total.messages_refused,
            total.bad_signatures,
            total.proposals_refused,
            total.proposals_refused_restarted,
            total.messages_dropped,
            total.restarts,
            total.guard_writes,
            total.sends_held,
            total.sends_past_held_commits,
            total.prepared_persisted,
            total.prepared_restored,
            total.state_serves_refused,
            total.state_serves_refused_to_correct,
            total.state_ops_served_to_byzantine,
            total.commits_held_for_durability,
        );
        for (seed, checker) in &failures {
            println!("  seed {seed}: {checker}");
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
