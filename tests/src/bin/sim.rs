//! The cluster simulator's command line: replay one seed, or run a range and report the
//! failures.
//!
//! ```text
//! cargo run -p percore-tests --bin sim -- --seed 42 [--replicas 3|5] [--groups 1|2]
//!     [--steps N] [--faults on|off] [--pipeline N] [--strict-legs]
//!     [--bug send-before-durable|ack-before-durable] [-v]
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
                 [--faults on|off] [--pipeline N] [--strict-legs] \\
                 [--bug send-before-durable|ack-before-durable] [-v]"
            );
            return ExitCode::from(2);
        }
    };
    let single = seeds.end == seeds.start + 1;
    let mut failures = Vec::new();
    for seed in seeds.clone() {
        if single {
            println!("seed {seed}");
        }
        match sim::run(seed, &options) {
            Ok(summary) if single => println!("seed {seed} passed: {summary:?}"),
            Ok(_) => {}
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
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
