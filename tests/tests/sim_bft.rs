//! The BFT simulator in CI: fixed batches of seeds (4 and 7 replicas, every Byzantine
//! behaviour, with and without network faults, correct replicas that crash and restart),
//! exact replay, injected protocol bugs that the checkers must catch, and every seed in
//! `tests/seeds_bft.txt` giving the outcome recorded there.

use percore_engine::bft::InjectedBug;
use percore_tests::bft_sim::{self, BEHAVIOURS, Behaviour, Options};
use percore_tests::support;

fn run_batch(options: Options, seeds: std::ops::Range<u64>) -> bft_sim::Summary {
    let mut total = bft_sim::Summary::default();
    for seed in seeds {
        match bft_sim::run(seed, &options) {
            Ok(summary) => total.add(&summary),
            Err(failure) => panic!(
                "{failure}replay: cargo run -p percore-tests --bin sim_bft -- --seed {seed} {}",
                bft_sim::options_args(&options).join(" ")
            ),
        }
    }
    total
}

#[test]
fn sim_bft_four_replicas_one_byzantine() {
    let total = run_batch(Options::default(), 0..60);
    assert!(total.requests_accepted > 0 && total.view_changes > 0);
    assert!(
        total.checkpoints > 0 && total.state_transfers > 0,
        "{total:?}"
    );
}

#[test]
fn sim_bft_seven_replicas_two_byzantine() {
    let options = Options {
        replicas: 7,
        byzantine: 2,
        ..Options::default()
    };
    run_batch(options, 0..25);
}

#[test]
fn sim_bft_every_behaviour() {
    for behaviour in BEHAVIOURS {
        let options = Options {
            behaviour: Some(behaviour),
            ..Options::default()
        };
        let total = run_batch(options, 100..110);
        if behaviour == Behaviour::Forge {
            assert!(total.bad_signatures > 0, "forged signatures were refused");
        }
        if behaviour == Behaviour::ForgeRequest {
            assert!(
                total.proposals_refused > 0,
                "proposals with requests no client signed were refused"
            );
        }
    }
}

/// A Byzantine replica floods its peers with `StateRequest`s (not among the drawn
/// behaviours): every run converges, the `serve-budget` checker holds what each correct
/// replica serves it to its budget, requests beyond it are refused, and no correct
/// replica's request is refused. A crashing replica catches up meanwhile.
#[test]
fn sim_bft_state_request_floods_are_held_to_the_serve_budget() {
    let options = Options {
        behaviour: Some(Behaviour::FloodState),
        crashes: 1,
        ..Options::default()
    };
    let total = run_batch(options, 0..30);
    assert!(total.requests_accepted > 0, "{total:?}");
    assert!(
        total.state_serves_refused > 0 && total.state_ops_served_to_byzantine > 0,
        "the flood was served up to its budget, then refused: {total:?}"
    );
    assert_eq!(total.state_serves_refused_to_correct, 0, "{total:?}");
}

/// Execution held back behind every journal write (one undurable commit at a time, as a
/// disk that lags holds it): the group still commits, converges and stays safe, with a
/// crashing replica and state transfers meanwhile.
#[test]
fn sim_bft_execution_held_for_durability_stays_safe_and_live() {
    let options = Options {
        commits_undurable_max: Some(1),
        crashes: 1,
        ..Options::default()
    };
    let total = run_batch(options, 0..30);
    assert!(total.requests_accepted > 0, "{total:?}");
    assert!(
        total.commits_held_for_durability > 0,
        "execution was held: {total:?}"
    );
}

#[test]
fn sim_bft_equivocation_is_detected_on_a_clean_network() {
    // Without network faults the checker requires evidence for every equivocation that
    // correct replicas accepted; make sure some happened.
    let options = Options {
        behaviour: Some(Behaviour::Equivocate),
        faults: false,
        ..Options::default()
    };
    let total = run_batch(options, 0..30);
    assert!(total.equivocations_accepted > 0, "{total:?}");
    assert!(total.equivocations_detected > 0, "{total:?}");
}

#[test]
fn sim_bft_a_seed_replays_exactly() {
    let options = Options::default();
    for seed in [3, 17] {
        let first = bft_sim::run(seed, &options).expect("passes");
        let second = bft_sim::run(seed, &options).expect("passes");
        assert_eq!(first, second);
    }
}

/// Scans seeds until the checker reports the injected bug as a safety violation.
fn bug_is_caught(options: Options, seeds: std::ops::Range<u64>) -> u64 {
    bug_is_caught_by(options, seeds, "safety")
}

/// Scans seeds until `checker` reports the injected bug.
fn bug_is_caught_by(options: Options, seeds: std::ops::Range<u64>, checker: &str) -> u64 {
    for seed in seeds.clone() {
        if let Err(failure) = bft_sim::run(seed, &options) {
            assert_eq!(failure.checker, checker, "{failure}");
            return seed;
        }
    }
    panic!("{:?} was not caught in seeds {seeds:?}", options.bug);
}

#[test]
fn sim_bft_catches_commit_with_one_vote_short_of_a_quorum() {
    let options = Options {
        behaviour: Some(Behaviour::Equivocate),
        bug: Some(InjectedBug::QuorumMinusOne),
        ..Options::default()
    };
    bug_is_caught(options, 0..40);
}

#[test]
fn sim_bft_catches_a_new_view_that_drops_prepared_batches() {
    let options = Options {
        behaviour: Some(Behaviour::Silent),
        bug: Some(InjectedBug::NewViewIgnoresPrepared),
        ..Options::default()
    };
    bug_is_caught(options, 0..200);
}

#[test]
fn sim_bft_catches_votes_for_requests_no_client_signed() {
    let options = Options {
        behaviour: Some(Behaviour::ForgeRequest),
        bug: Some(InjectedBug::VotesWithoutProposalCheck),
        ..Options::default()
    };
    bug_is_caught_by(options, 0..40, "auth");
}

#[test]
fn sim_bft_correct_replicas_crash_and_restart() {
    // Every replica correct, one crashing.
    let options = Options {
        byzantine: 0,
        crashes: 1,
        ..Options::default()
    };
    let total = run_batch(options, 0..40);
    assert!(total.restarts > 0 && total.guard_writes > 0, "{total:?}");
    assert!(
        total.sends_held > 0,
        "sends waited for guard and prepared writes: {total:?}"
    );
    // Only Commits wait for their prepared certificates: later Prepares and proposals do
    // not queue behind them.
    assert!(
        total.sends_past_held_commits > 0,
        "sends left while a Commit waited for its prepared certificate: {total:?}"
    );
}

#[test]
fn sim_bft_every_replica_crashes_at_once_and_the_group_recovers() {
    // Power loss of the whole group, again and again: every replica restarts from its own
    // disk at its own commit point, often between views (docs/bft.md §12, *a whole group
    // restarted*). Before the fix 227 of seeds 0..300 never converged.
    let options = Options {
        byzantine: 0,
        crashes: 4,
        crash_all: true,
        ..Options::default()
    };
    let total = run_batch(options, 0..30);
    assert!(
        total.restarts >= 4 * 30,
        "every replica restarted: {total:?}"
    );
    assert!(total.view_changes > 0, "{total:?}");
}

#[test]
fn sim_bft_slow_links_still_commit_after_view_changes() {
    // Every message takes 100 to 150 ms, so a new view's first commit always comes after
    // the first progress timeout (200 ms): each view change must double the timeouts until
    // one is long enough, and a NewView must not reset them. Before, every seed of 0..20
    // of each set changed views without end (`liveness`).
    for options in [
        Options {
            slow_links: true,
            ..Options::default()
        },
        Options {
            byzantine: 0,
            crashes: 4,
            crash_all: true,
            slow_links: true,
            ..Options::default()
        },
    ] {
        let total = run_batch(options, 0..20);
        assert!(
            total.requests_accepted > 0 && total.view_changes > 0,
            "{total:?}"
        );
    }
}

#[test]
fn sim_bft_seven_replicas_one_byzantine_one_crashing() {
    let options = Options {
        replicas: 7,
        byzantine: 1,
        crashes: 1,
        ..Options::default()
    };
    let total = run_batch(options, 0..15);
    assert!(total.restarts > 0, "{total:?}");
}

#[test]
fn sim_bft_restarted_replicas_still_refuse_requests_no_client_signed() {
    // A forging leader beside a crashing replica (n = 7: one of each within f = 2): the
    // restored cores get their proposal check again, as the runtime's do.
    let options = Options {
        replicas: 7,
        byzantine: 1,
        crashes: 1,
        behaviour: Some(Behaviour::ForgeRequest),
        ..Options::default()
    };
    // Seed 24 has a restored core refuse one (with the draws since prepared certificates
    // are durable; before, several of 0..15 did).
    let total = run_batch(options, 0..25);
    assert!(total.restarts > 0, "{total:?}");
    assert!(
        total.proposals_refused_restarted > 0,
        "restarted replicas refused forged proposals: {total:?}"
    );
}

#[test]
fn sim_bft_catches_a_restore_that_ignores_the_guard() {
    // A restarted replica that forgets what it signed puts a second, different statement
    // on the wire (or one its durable guard does not cover, which the driver would have
    // had to write below the guard on disk).
    let options = Options {
        byzantine: 0,
        crashes: 1,
        bug: Some(InjectedBug::RestoreIgnoresGuard),
        ..Options::default()
    };
    for seed in 0..200 {
        match bft_sim::run(seed, &options) {
            Ok(_) => {}
            Err(failure) if failure.checker == "conflicting-votes" => return,
            Err(failure) => assert_eq!(failure.checker, "guard", "{failure}"),
        }
    }
    panic!("no conflicting votes in seeds 0..200");
}

#[test]
fn sim_bft_crashes_do_not_count_against_f() {
    // n = 4, f = 1: a Byzantine replica and two correct ones that crash and restart (with
    // their prepared certificates): three faults for PBFT without them (docs/bft.md
    // section 10).
    let options = Options {
        byzantine: 1,
        crashes: 2,
        ..Options::default()
    };
    let total = run_batch(options, 0..30);
    assert!(total.restarts > 0, "{total:?}");
    assert!(
        total.prepared_persisted > 0 && total.prepared_restored > 0,
        "prepared certificates were written and restored: {total:?}"
    );
}

#[test]
fn sim_bft_catches_a_restore_that_drops_prepared_certificates() {
    // A restarted replica that sent a Commit and lost the prepared certificate reports
    // nothing for that op in its next ViewChange (section 10's counter-example needs two
    // of them at n = 4).
    let options = Options {
        byzantine: 0,
        crashes: 2,
        bug: Some(InjectedBug::RestoreDropsPrepared),
        ..Options::default()
    };
    for seed in 0..100 {
        match bft_sim::run(seed, &options) {
            Ok(_) => {}
            Err(failure) => {
                assert_eq!(failure.checker, "prepared-report", "{failure}");
                return;
            }
        }
    }
    panic!("no prepared-report failure in seeds 0..100");
}

/// A client that accepts a result on `f` matching replies takes one Byzantine replica's
/// made-up answer, in every run: the end-of-run check finds each accepted result no correct
/// replica executed. The check at acceptance alone sees only the replicas that executed the
/// request by then, which the lie usually precedes: it caught 16 runs of 200.
#[test]
fn sim_bft_catches_a_client_that_accepts_f_replies() {
    let options = Options {
        byzantine: 1,
        behaviour: Some(Behaviour::Equivocate),
        client_weak_quorum: true,
        ..Options::default()
    };
    for seed in 0..10 {
        match bft_sim::run(seed, &options) {
            Err(failure) => assert_eq!(failure.checker, "client", "{failure}"),
            Ok(_) => panic!("seed {seed}: a client accepted a lie unseen"),
        }
    }
}

#[test]
fn sim_bft_catches_a_journal_that_outruns_prepared_certificates() {
    // A replica commits an op with its own Commit (held for the prepared certificate) and
    // journals it; it crashes with the journal durable and the certificate lost, and after
    // its restart it reports nothing for an op it executed (the driver now waits). Or,
    // since a restarted replica serves the ops it restored from its journal to peers
    // behind it, it relays the journaled certificate holding that Commit, which its
    // durable guard may not cover (`guard`; seed 6).
    let options = Options {
        byzantine: 0,
        crashes: 2,
        journal_before_prepared: true,
        ..Options::default()
    };
    let mut prepared_report = false;
    for seed in 0..300 {
        match bft_sim::run(seed, &options) {
            Ok(_) => {}
            Err(failure) => {
                assert!(
                    ["prepared-report", "guard"].contains(&failure.checker),
                    "{failure}"
                );
                prepared_report |= failure.checker == "prepared-report";
                if prepared_report {
                    return;
                }
            }
        }
    }
    panic!("no prepared-report failure in seeds 0..300");
}

#[test]
fn sim_bft_catches_a_prepared_write_that_outruns_its_guard() {
    // A prepared certificate holds the replica's own Prepare; written before the guard
    // covering it, a crash can keep the certificate and lose the guard, and the restarted
    // replica relays (in a ViewChange) a vote its durable guard does not cover.
    let options = Options {
        byzantine: 1,
        crashes: 2,
        prepared_before_guard: true,
        ..Options::default()
    };
    for seed in 0..200 {
        match bft_sim::run(seed, &options) {
            Ok(_) => {}
            Err(failure) => {
                assert!(
                    ["guard", "conflicting-votes"].contains(&failure.checker),
                    "{failure}"
                );
                return;
            }
        }
    }
    panic!("no guard failure in seeds 0..200");
}

/// `tests/seeds_bft.txt`: every recorded seed gives its recorded outcome.
#[test]
fn sim_bft_seeds_file_replays() {
    let cases = support::seed_cases(include_str!("../seeds_bft.txt"), "seeds_bft.txt");
    assert!(!cases.is_empty(), "tests/seeds_bft.txt lists seeds");
    for case in cases {
        let arguments = case.arguments.split_whitespace().map(str::to_string);
        let (options, seeds) = bft_sim::parse_args(arguments)
            .unwrap_or_else(|error| panic!("seeds_bft.txt line {}: {error}", case.line));
        for seed in seeds {
            let outcome = match bft_sim::run(seed, &options) {
                Ok(_) => "pass".to_string(),
                Err(failure) => failure.checker.to_string(),
            };
            assert_eq!(
                outcome, case.expect,
                "seeds_bft.txt line {} (seed {seed}, {}): outcome changed; if a fix made it \
                 pass, update the line to expect=pass",
                case.line, case.arguments
            );
        }
    }
}
