//! A deterministic cluster simulator: `N` replicas × `G` replication groups, each replica of
//! each group a real [`percore_engine::replica::Replica`] and a real
//! [`percore_engine::ledger::Ledger`], over a simulated network, simulated journals and a
//! simulated clock, all driven from one `u64` seed.
//!
//! The driver ([`world`]) is the logic of `shards/src/replication.rs` without io_uring:
//! the leader seals, stages, makes durable, then releases its Prepares; followers verify
//! the chain, stage, make durable and acknowledge; everyone applies up to `apply_limit`,
//! serves repairs from its journal, and a group's leader routes the credit legs its ledger
//! emits. Checkers ([`check`]) run after every event and at the end; see
//! `docs/simulator.md` for what is modelled, what is not, and how to replay a seed.
//!
//! This module must never read a clock, use a thread RNG, or let hash-map order decide
//! anything: the only randomness is [`rng::SimRng`] seeded from the run's seed.

pub mod check;
pub mod disk;
pub mod linearizability;
pub mod rng;
pub mod world;

use std::fmt;

/// A bug the simulator can inject on purpose, to show that the checkers catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Fixed view: the leader sends each Prepare when it stages the entry, before its own
    /// write is durable (the rule of `docs/protocol.md` section 0 broken): a leader crash
    /// then loses an op its followers hold, and the restarted leader, which resumes its
    /// view, reassigns the op number. (With view change that order is the design.)
    SendBeforeDurable,
    /// A follower acknowledges an entry as soon as it is staged, before its fsync: the leader
    /// may commit an op that only it holds durably.
    AckBeforeDurable,
    /// View change: while a log is installed, repair entries are appended without checking
    /// `Replica::expected_checksum` (only the hash chain): an entry of an abandoned view that
    /// chains onto the same head gets in, and the installed log is not the selected one.
    SkipExpectedChecksum,
    /// View change: the sends of an action list go out at once, before the `Persist` ahead
    /// of them is durable: a replica that votes and crashes forgets its vote.
    PersistAfterSend,
    /// View change: `Truncate` keeps who waited for the ops it cuts (their clients are not
    /// refused), so when the new view's entry under the same op number applies, the replica
    /// answers them with that entry's results: a reply for records that are not theirs, from
    /// an op that did commit.
    KeepOriginsOnTruncate,
    /// A replica whose journal lost entries it may have acknowledged (damage found at
    /// recovery) restarts as if nothing was lost: it is not put in recovering status, so it
    /// acknowledges and votes with the shorter log.
    ForgetRecovering,
    /// View change: a restarted leader resumes the view it led before the crash instead of
    /// leaving it (`Replica::bug_resume_view`). It may have lost entries it had sent, so
    /// it prepares a different entry under an op number its followers hold.
    LeaderResumesView,
    /// The leader journals client requests without their session descriptors: a retry
    /// that reaches a new leader is applied again, and the ledger answers it `Exists`
    /// instead of the original reply.
    NoSessions,
    /// View change: a repair is served up to the journal's durable head instead of the
    /// core's: after the core truncated (installing a new view) and before the journal did,
    /// ops of the abandoned suffix go out labelled as the new view's log (seed 394).
    ServeFromDisk,
    /// `--replace`: a replica that lost its disk restarts on the blank one as if nothing
    /// was lost (no `replacing_start`): it acknowledges and votes with an empty log. The
    /// checkers still count what it lost as held, so only the consequences show.
    ReplaceAsNew,
    /// `--replace`: a replaced replica does not wait for the views of `f + 1` others
    /// (`Replica::bug_skip_view_floor`) and installs the first StartView it gets.
    ReplaceSkipFloor,
}

impl Bug {
    /// Parses the command-line name.
    pub fn parse(name: &str) -> Option<Bug> {
        match name {
            "send-before-durable" => Some(Bug::SendBeforeDurable),
            "ack-before-durable" => Some(Bug::AckBeforeDurable),
            "skip-expected-checksum" => Some(Bug::SkipExpectedChecksum),
            "persist-after-send" => Some(Bug::PersistAfterSend),
            "keep-origins-on-truncate" => Some(Bug::KeepOriginsOnTruncate),
            "forget-recovering" => Some(Bug::ForgetRecovering),
            "no-sessions" => Some(Bug::NoSessions),
            "leader-resumes-view" => Some(Bug::LeaderResumesView),
            "serve-from-disk" => Some(Bug::ServeFromDisk),
            "replace-as-new" => Some(Bug::ReplaceAsNew),
            "replace-skip-floor" => Some(Bug::ReplaceSkipFloor),
            _ => None,
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Bug::SendBeforeDurable => "send-before-durable",
            Bug::AckBeforeDurable => "ack-before-durable",
            Bug::SkipExpectedChecksum => "skip-expected-checksum",
            Bug::PersistAfterSend => "persist-after-send",
            Bug::KeepOriginsOnTruncate => "keep-origins-on-truncate",
            Bug::ForgetRecovering => "forget-recovering",
            Bug::NoSessions => "no-sessions",
            Bug::LeaderResumesView => "leader-resumes-view",
            Bug::ServeFromDisk => "serve-from-disk",
            Bug::ReplaceAsNew => "replace-as-new",
            Bug::ReplaceSkipFloor => "replace-skip-floor",
        }
    }
}

/// How one run is shaped (everything else comes from the seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Replicas per group (3 or 5).
    pub replicas: u8,
    /// Replication groups (1 or 2).
    pub groups: u32,
    /// Events processed while faults and new client requests happen; then everything heals
    /// and the run must converge within the liveness bound.
    pub steps: u64,
    /// Crashes, partitions, drops, duplicates, slow links and disks, torn tails.
    pub faults: bool,
    /// A bug to inject, or none.
    pub bug: Option<Bug>,
    /// Keep (and print on failure) the whole trace, not only its tail.
    pub verbose: bool,
    /// The replicas' `pipeline_prepares_max`. Below the ops a group reaches in a run, a
    /// restarted leader stalls today (see `docs/simulator.md`, known issues).
    pub pipeline_prepares_max: u64,
    /// Check conservation over the *committed* prefixes (protocol invariant 8) rather than
    /// over the leaders' durable logs; fails today (see `docs/simulator.md`, known issues).
    pub strict_legs: bool,
    /// Send no request at all once faults stop. By default each group gets one more request
    /// then, as traffic would go on; without it a restarted leader never commits the tail it
    /// recovered (see `docs/simulator.md`, known issues).
    pub quiet_heal: bool,
    /// Leader failover (`ReplicaConfig::view_change`): the driver executes the view-change
    /// actions (superblock, truncation, the new messages), clients look for the leader, and
    /// faults also pause replicas and aim at leaders. Off, every group keeps view 0.
    pub view_change: bool,
    /// View change: drive the core exactly as the runtime does even where that trips the
    /// engine and runtime issues 4, 5 and 6 of `docs/simulator.md` (assertions in
    /// `on_durable`, `install_progress` and `write_views`). Off, the driver steps around
    /// them: it reports the core's head to `on_durable` after a truncation raced a group
    /// commit, appends nothing past the head of a log being installed, and never lowers the
    /// superblock's commit number.
    pub no_workarounds: bool,
    /// With `faults`: in some runs (drawn per seed, from a random stream of its own), a
    /// replica restarted by a fault first has a durable journal entry damaged, and must
    /// recover it from peers (`--corrupt off` replays a run as it was before this fault).
    pub corrupt: bool,
    /// View change: leader rebalancing (`ReplicaConfig::leader_rebalance_us`), in
    /// simulated ms; 0 (the simulator's default, so that the recorded runs stay as they
    /// were) turns it off. A few hundred ms hands groups back within a run.
    pub rebalance_ms: u64,
    /// View change, with `faults`: in some runs (drawn per seed, from a random stream of
    /// its own), a replica restarted by a fault first loses its disk and comes back
    /// formatted with `--replace` (`Replica::replacing_start`). Off by default, so that the
    /// recorded runs stay as they were.
    pub replace: bool,
    /// Replicas take checkpoints (every few ops, drawn per seed from a random
    /// stream of its own) and stop serving ops below their previous checkpoint once no
    /// peer within a drawn `retain_ops` needs them, as the runtime removes segments; a
    /// replica asking for a removed op is answered `NotRetained` and catches up by state
    /// sync from a peer's checkpoint. Off by default, so that the recorded runs stay as
    /// they were (without it no peer ever answers `NotRetained`).
    pub sync: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            replicas: 3,
            groups: 2,
            steps: STEPS_DEFAULT,
            faults: true,
            bug: None,
            verbose: false,
            pipeline_prepares_max: PIPELINE_PREPARES_MAX_DEFAULT,
            strict_legs: false,
            quiet_heal: false,
            view_change: false,
            no_workarounds: false,
            corrupt: true,
            rebalance_ms: 0,
            replace: false,
            sync: false,
        }
    }
}

impl Options {
    /// The defaults with leader failover on (the CI batches' shape).
    pub fn view_change() -> Options {
        Options {
            view_change: true,
            ..Options::default()
        }
    }
}

/// Default `pipeline_prepares_max` (the engine's default): above the ops a run's clients
/// produce per group ([`world::CLIENT_OPS_MAX`]).
pub const PIPELINE_PREPARES_MAX_DEFAULT: u64 =
    percore_engine::replica::PIPELINE_PREPARES_MAX_DEFAULT;

/// Default events of the faulty phase of a run.
pub const STEPS_DEFAULT: u64 = 3_000;

/// A checker that failed, with enough to replay and understand it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The run's seed.
    pub seed: u64,
    /// Events processed when it failed.
    pub step: u64,
    /// Simulated time (µs).
    pub time_us: u64,
    /// Which checker (`agreement`, `durability`, `liveness`, …).
    pub checker: &'static str,
    /// What exactly is wrong.
    pub message: String,
    /// The last events (all of them with `verbose`), oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} FAILED at step {} (t = {} us): {}: {}",
            self.seed, self.step, self.time_us, self.checker, self.message
        )?;
        writeln!(f, "trace (last {} events):", self.trace.len())?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// What a passing run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events processed.
    pub steps: u64,
    /// Simulated time at the end (µs).
    pub time_us: u64,
    /// Client requests acknowledged.
    pub requests: u64,
    /// Ops committed, summed over groups.
    pub ops_committed: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Messages dropped by the network (faults and broken connections).
    pub messages_dropped: u64,
    /// Torn tails found at recovery.
    pub torn_tails: u64,
    /// Durable journal entries damaged while their replica was down (fault).
    pub corruptions: u64,
    /// Replicas that started recovering (their journal lost entries they may have
    /// acknowledged).
    pub recoveries: u64,
    /// Replicas whose disk was lost and replaced (`--replace`), one per replica and event.
    pub replacements: u64,
    /// Replaced replica-groups that rebuilt (left replacing) before the run ended.
    pub replacements_rebuilt: u64,
    /// Checkpoints taken (`--sync on`).
    pub checkpoints: u64,
    /// Repairs answered `NotRetained` (the op asked for was removed).
    pub not_retained: u64,
    /// `NotRetained` answers that reached the new leader of a view during its view
    /// change (while it installs the selected log).
    pub not_retained_new_leader: u64,
    /// State syncs started (`Action::StateSync`).
    pub state_syncs: u64,
    /// State syncs started by the leader of the view whose log it was installing.
    pub state_syncs_leader: u64,
    /// State syncs started by a replica rebuilding after `--replace`.
    pub state_syncs_replacing: u64,
    /// State syncs installed (the journal switched to the peer's checkpoint).
    pub state_syncs_installed: u64,
    /// State syncs that failed (the peer no longer had the checkpoint, or no answer came).
    pub state_syncs_failed: u64,
    /// View-change actions the fixed-view driver dropped (none expected: without
    /// `view_change` the core produces none).
    pub view_change_actions_dropped: u64,
    /// Pauses injected (a replica stops running for a while, like SIGSTOP).
    pub pauses: u64,
    /// Crashes, pauses and partitions aimed at a group's ready leader.
    pub leader_faults: u64,
    /// `(group, view)` pairs that had a ready leader (with view change).
    pub views_led: u64,
    /// Journal truncations executed (divergent suffixes of abandoned views).
    pub truncations: u64,
    /// Entries of an installed log that did not chain onto a replica's head, so that the
    /// head (an entry kept below the new log's checksums) was cut.
    pub chain_mismatches: u64,
    /// Views a leader left to hand its group back to the preferred leader (`--rebalance-ms`).
    pub leader_handoffs: u64,
    /// Periods without a ready leader that began with a handoff (one of the `failovers`),
    /// and their summed and longest lengths (simulated µs).
    pub handoff_periods: u64,
    /// See `handoff_periods`.
    pub handoff_us_sum: u64,
    /// See `handoff_periods`.
    pub handoff_us_max: u64,
    /// Superblock writes (`Persist` and the periodic commit record).
    pub superblock_writes: u64,
    /// Client requests refused by a replica that is not the ready leader.
    pub refusals: u64,
    /// Periods without a ready leader that ended (see [`Summary::failover_buckets`]).
    pub failovers: u64,
    /// Longest period without a ready leader that ended (µs).
    pub failover_us_max: u64,
    /// Periods without a ready leader, by length: bucket `i` counts those up to
    /// [`FAILOVER_BUCKETS_US`]`[i]`, the last those longer.
    pub failover_buckets: [u64; FAILOVER_BUCKETS_US.len() + 1],
    /// A restarted leader sealed ops in the view it had sealed in before the crash (counted
    /// only under the `leader-resumes-view` bug; otherwise a `one-leader-per-view` failure).
    pub leader_resumed_view: u64,
    /// View change: crashes of a leader that lost entries it had already sent to its
    /// followers (staged, Prepares out, its own write not yet durable).
    pub leader_sent_crashes: u64,
    /// The entries those crashes lost.
    pub leader_sent_ops_lost: u64,
    /// Group commits that completed above the core's head because it truncated meanwhile
    /// (known issue 4; the driver reported the core's head to `on_durable`).
    pub durable_above_truncation: u64,
    /// Entries past the head of a log being installed that the driver did not append
    /// (known issue 5).
    pub append_past_install: u64,
    /// Superblock writes whose commit number was below the recorded one, kept at the
    /// recorded one by the driver (known issue 6).
    pub superblock_commit_kept: u64,
    /// Client replies compared, record by record, with the sequential reference at the
    /// position the reply came from (linearizability; every acknowledged request, at the end).
    pub answers_checked: u64,
    /// Client records found in the committed logs and checked to come after everything
    /// answered before their request was invoked (linearizability: real-time order).
    pub records_ordered: u64,
}

/// Upper bounds (µs) of the failover-time histogram buckets.
pub const FAILOVER_BUCKETS_US: [u64; 8] = [
    100_000, 200_000, 300_000, 500_000, 750_000, 1_000_000, 2_000_000, 5_000_000,
];

/// Parses command-line arguments (without the program name) into options and a seed range
/// (`--seed S` is `S..S+1`). Shared by the `sim` binary and the `tests/seeds.txt` replay.
pub fn parse_args<I: IntoIterator<Item = String>>(
    args: I,
) -> Result<(Options, std::ops::Range<u64>), String> {
    let mut options = Options::default();
    let mut seeds = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--strict-legs" => {
                options.strict_legs = true;
                continue;
            }
            "--quiet-heal" => {
                options.quiet_heal = true;
                continue;
            }
            "--view-change" => {
                options.view_change = true;
                continue;
            }
            "--no-workarounds" => {
                options.no_workarounds = true;
                continue;
            }
            "-v" | "--verbose" => {
                options.verbose = true;
                continue;
            }
            _ => {}
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let on_off = || -> Result<bool, String> {
            match value.as_str() {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(format!("{arg} is on or off")),
            }
        };
        let number = || -> Result<u64, String> {
            value
                .parse()
                .map_err(|_| format!("{arg} needs a number, not {value:?}"))
        };
        match arg.as_str() {
            "--seed" => {
                let seed = number()?;
                seeds = Some(seed..seed + 1);
            }
            "--seeds" => {
                seeds = Some(crate::sim::seed_range(&value).ok_or("--seeds needs A..B, A < B")?);
            }
            "--replicas" => match number()? {
                replicas @ (3 | 5) => options.replicas = replicas as u8,
                _ => return Err("--replicas is 3 or 5".to_string()),
            },
            "--groups" => match number()? {
                groups @ (1 | 2) => options.groups = groups as u32,
                _ => return Err("--groups is 1 or 2".to_string()),
            },
            "--steps" => options.steps = number()?,
            "--rebalance-ms" => options.rebalance_ms = number()?,
            "--pipeline" => options.pipeline_prepares_max = number()?.max(1),
            "--faults" => options.faults = on_off()?,
            "--replace" => options.replace = on_off()?,
            "--sync" => options.sync = on_off()?,
            "--corrupt" => options.corrupt = on_off()?,
            "--bug" => {
                options.bug = Some(Bug::parse(&value).ok_or(format!("unknown bug {value:?}"))?);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let seeds = seeds.ok_or("--seed S or --seeds A..B is required")?;
    Ok((options, seeds))
}

/// The arguments that rebuild `options` (what a replay needs).
pub fn options_args(options: &Options) -> Vec<String> {
    let mut args = vec![
        "--replicas".to_string(),
        options.replicas.to_string(),
        "--groups".to_string(),
        options.groups.to_string(),
        "--steps".to_string(),
        options.steps.to_string(),
        "--pipeline".to_string(),
        options.pipeline_prepares_max.to_string(),
        "--faults".to_string(),
        if options.faults { "on" } else { "off" }.to_string(),
    ];
    if let Some(bug) = options.bug {
        args.push("--bug".to_string());
        args.push(bug.name().to_string());
    }
    if options.strict_legs {
        args.push("--strict-legs".to_string());
    }
    if options.quiet_heal {
        args.push("--quiet-heal".to_string());
    }
    if options.view_change {
        args.push("--view-change".to_string());
    }
    if options.no_workarounds {
        args.push("--no-workarounds".to_string());
    }
    if !options.corrupt {
        args.push("--corrupt".to_string());
        args.push("off".to_string());
    }
    if options.replace {
        args.push("--replace".to_string());
        args.push("on".to_string());
    }
    if options.sync {
        args.push("--sync".to_string());
        args.push("on".to_string());
    }
    if options.rebalance_ms != 0 {
        args.push("--rebalance-ms".to_string());
        args.push(options.rebalance_ms.to_string());
    }
    if options.verbose {
        args.push("-v".to_string());
    }
    args
}

/// Runs one seed to the end or to the first failed checker.
pub fn run(seed: u64, options: &Options) -> Result<Summary, Box<Failure>> {
    world::World::new(seed, *options).run()
}

/// `A..B` as a range of seeds (both simulators' `--seeds`); `None` unless `A < B` (an
/// empty range would run nothing and report it as a pass).
pub fn seed_range(text: &str) -> Option<std::ops::Range<u64>> {
    let (low, high) = text.split_once("..")?;
    let seeds = low.parse().ok()?..high.parse().ok()?;
    (seeds.start < seeds.end).then_some(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_must_be_a_non_empty_range() {
        let parse = |seeds: &str| parse_args(["--seeds".to_string(), seeds.to_string()]);
        assert_eq!(parse("5..9").map(|(_, seeds)| seeds), Ok(5..9));
        for bad in ["9..5", "7..7", "5-9", "x..9"] {
            assert_eq!(
                parse(bad).map(|(_, seeds)| seeds),
                Err("--seeds needs A..B, A < B".to_string()),
                "{bad}"
            );
        }
    }
}
