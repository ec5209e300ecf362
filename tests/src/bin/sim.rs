//! The cluster simulator's command line: replay one seed, or run a range and report the
//! failures.
//!
//! ```text
//! cargo run -p percore-tests --bin sim -- --seed 42 [--replicas 3|5] [--groups 1|2]
//!     [--steps N] [--faults on|off] [--corrupt on|off] [--pipeline N] [--strict-legs] [--quiet-heal]
//!     [--view-change [--no-workarounds] [--rebalance-ms MS] [--replace on|off] [--sync on|off]]
//!     [--bug send-before-durable|ack-before-durable|skip-expected-checksum|persist-after-send|keep-origins-on-truncate|forget-recovering|no-sessions|leader-resumes-view|serve-from-disk|replace-as-new|replace-skip-floor]
//!     [-v]
//! cargo run -p percore-tests --bin sim -- --seeds 0..10000
//! ```

use std::process::ExitCode;

use percore_tests::sim;

fn main() -> ExitCode {
    let (options, seeds) = match sim::parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("sim: {error}");
            eprintln!(
                "usage: sim (--seed S | --seeds A..B) [--replicas 3|5] [--groups 1|2] [--steps N] \\
                 [--faults on|off] [--corrupt on|off] [--pipeline N] [--strict-legs] [--quiet-heal] \\
                 [--view-change [--no-workarounds] [--rebalance-ms MS] [--replace on|off] [--sync on|off]] \\
                 [--bug send-before-durable|ack-before-durable|skip-expected-checksum|persist-after-send|keep-origins-on-truncate|forget-recovering|no-sessions|leader-resumes-view|serve-from-disk|replace-as-new|replace-skip-floor] [-v]"
            );
            return ExitCode::from(2);
        }
    };
    let single = seeds.end == seeds.start + 1;
    let mut failures = Vec::new();
    let mut total = sim::Summary::default();
    for seed in seeds.clone() {
        if single {
            println!("seed {seed}");
        }
        match sim::run(seed, &options) {
            Ok(summary) if single => println!("seed {seed} passed: {summary:?}"),
            Ok(summary) => {
                total.failovers += summary.failovers;
                total.failover_us_max = total.failover_us_max.max(summary.failover_us_max);
                for (sum, count) in total
                    .failover_buckets
                    .iter_mut()
                    .zip(summary.failover_buckets)
                {
                    *sum += count;
                }
                total.views_led += summary.views_led;
                total.truncations += summary.truncations;
                total.chain_mismatches += summary.chain_mismatches;
                total.leader_handoffs += summary.leader_handoffs;
                total.handoff_periods += summary.handoff_periods;
                total.handoff_us_sum += summary.handoff_us_sum;
                total.handoff_us_max = total.handoff_us_max.max(summary.handoff_us_max);
                total.leader_resumed_view += summary.leader_resumed_view;
                total.leader_sent_crashes += summary.leader_sent_crashes;
                total.leader_sent_ops_lost += summary.leader_sent_ops_lost;
                total.durable_above_truncation += summary.durable_above_truncation;
                total.append_past_install += summary.append_past_install;
                total.superblock_commit_kept += summary.superblock_commit_kept;
                total.corruptions += summary.corruptions;
                total.recoveries += summary.recoveries;
                total.replacements += summary.replacements;
                total.replacements_rebuilt += summary.replacements_rebuilt;
                total.checkpoints += summary.checkpoints;
                total.not_retained += summary.not_retained;
                total.not_retained_new_leader += summary.not_retained_new_leader;
                total.state_syncs += summary.state_syncs;
                total.state_syncs_leader += summary.state_syncs_leader;
                total.state_syncs_replacing += summary.state_syncs_replacing;
                total.state_syncs_installed += summary.state_syncs_installed;
                total.state_syncs_failed += summary.state_syncs_failed;
            }
            Err(failure) => {
                print!("{failure}");
                println!(
                    "replay: cargo run -p percore-tests --bin sim -- --seed {seed} {}",
                    sim::options_args(&options).join(" ")
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
        for (seed, checker) in &failures {
            println!("  seed {seed}: {checker}");
        }
        println!(
            "passing seeds: {} durable entries damaged, {} replicas started recovering",
            total.corruptions, total.recoveries
        );
        if options.replace {
            println!(
                "replaced disks (--replace): {} replica-groups, {} rebuilt before the run ended",
                total.replacements, total.replacements_rebuilt
            );
        }
        if options.sync {
            println!(
                "state sync (--sync): {} checkpoints, {} repairs not retained ({} to a new leader installing its view), {} syncs started ({} by a new leader installing its view, {} by a replica rebuilding after --replace), {} installed, {} failed",
                total.checkpoints,
                total.not_retained,
                total.not_retained_new_leader,
                total.state_syncs,
                total.state_syncs_leader,
                total.state_syncs_replacing,
                total.state_syncs_installed,
                total.state_syncs_failed
            );
        }
        if options.view_change {
            print_failovers(&total);
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The failover-time distribution over the passing seeds (simulated time).
fn print_failovers(total: &sim::Summary) {
    println!(
        "periods without a ready leader: {} (longest {} ms); views led {} ({} handed back to \
         the preferred leader), truncations {} ({} after an entry did not chain), leader crashes that lost sent entries {} ({} entries), leaders that resumed their \
         view after a restart {}; workarounds: on_durable above a truncation {}, appends past \
         an install {}, superblock commit numbers kept {}",
        total.failovers,
        total.failover_us_max / 1_000,
        total.views_led,
        total.leader_handoffs,
        total.truncations,
        total.chain_mismatches,
        total.leader_sent_crashes,
        total.leader_sent_ops_lost,
        total.leader_resumed_view,
        total.durable_above_truncation,
        total.append_past_install,
        total.superblock_commit_kept,
    );
    if total.handoff_periods > 0 {
        println!(
            "handoffs (leader rebalancing): {} periods without a ready leader, mean {} ms, \
             longest {} ms (included above)",
            total.handoff_periods,
            total.handoff_us_sum / total.handoff_periods / 1_000,
            total.handoff_us_max / 1_000,
        );
    }
    let mut lower_ms = 0;
    for (index, count) in total.failover_buckets.iter().enumerate() {
        let label = match sim::FAILOVER_BUCKETS_US.get(index) {
            Some(bound) => {
                let label = format!("{lower_ms}-{} ms", bound / 1_000);
                lower_ms = bound / 1_000;
                label
            }
            None => format!("> {lower_ms} ms"),
        };
        println!("  {label:>14}: {count}");
    }
}
