//! A deterministic simulator of one BFT replication group: `n` (4 or 7) real
//! [`percore_engine::bft::BftReplica`]s, up to `f` of them Byzantine, a simulated network
//! (drops, duplicates, delays and reordering, partitions), clients that accept a result
//! after `f + 1` matching replies, correct replicas that crash and restart from what they
//! made durable (`--crashes`), and checkers (safety, liveness, evidence, client results,
//! and across restarts: no vote on the wire beyond the durable guard, no conflicting
//! votes), all from one `u64` seed. See `docs/bft.md`, section "Simulator".
//!
//! Like [`crate::sim`], this module never reads a clock, uses a thread RNG or lets hash-map
//! order decide anything: the only randomness is [`crate::sim::rng::SimRng`].

pub mod world;

use percore_engine::bft::InjectedBug;

/// What a Byzantine replica does (drawn per replica from the seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Behaviour {
    /// Sends nothing at all from a time drawn per run (from the start in 30 % of runs,
    /// else within the first 2 s): a mute replica, or one that crashes mid-run.
    Silent,
    /// Leader: different proposals to different replicas, with matching votes for each;
    /// backup: different votes to different replicas.
    Equivocate,
    /// Validly signed votes for digests that are not the batch's; as leader, proposals
    /// whose digest does not match their batch.
    WrongDigest,
    /// Proposes and asks for view changes, but never sends Prepare, Commit or Checkpoint.
    Withhold,
    /// Behaves, and also replays old messages (its own and others', earlier views).
    Replay,
    /// Behaves, and also sends votes in other replicas' names and garbage signatures.
    Forge,
    /// As leader, adds to each proposal a request no client signed (a client's request
    /// with a record changed and a new request number, carrying the original signature).
    ForgeRequest,
    /// Behaves, and also floods the replicas it sends to with `StateRequest`s for the
    /// oldest ops ([`world::FLOOD_STATE_REQUESTS_PER_SEND`] per message it sends to each):
    /// the `serve-budget` checker bounds what each correct replica serves it. Only by
    /// `--behaviour flood-state`, never drawn.
    FloodState,
}

/// Every behaviour the seed picks from, in order. [`Behaviour::FloodState`] is not among
/// them: drawing from one more would change every seed's run, those of
/// `tests/seeds_bft.txt` included.
pub const BEHAVIOURS: [Behaviour; 7] = [
    Behaviour::Silent,
    Behaviour::Equivocate,
    Behaviour::WrongDigest,
    Behaviour::Withhold,
    Behaviour::Replay,
    Behaviour::Forge,
    Behaviour::ForgeRequest,
];

impl Behaviour {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Silent => "silent",
            Behaviour::Equivocate => "equivocate",
            Behaviour::WrongDigest => "wrong-digest",
            Behaviour::Withhold => "withhold",
            Behaviour::Replay => "replay",
            Behaviour::Forge => "forge",
            Behaviour::ForgeRequest => "forge-request",
            Behaviour::FloodState => "flood-state",
        }
    }

    /// Parses the command-line name.
    pub fn parse(name: &str) -> Option<Behaviour> {
        BEHAVIOURS
            .into_iter()
            .chain([Behaviour::FloodState])
            .find(|behaviour| behaviour.name() == name)
    }
}

/// How one run is shaped (everything else comes from the seed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Replicas (4 or 7; `f = (n − 1) / 3`).
    pub replicas: u8,
    /// Byzantine replicas (at most `f`).
    pub byzantine: u8,
    /// Correct replicas that crash and restart, any number of the correct ones: a restarted
    /// replica keeps its guard and its prepared certificates, so it is not a fault
    /// (`docs/bft.md` §10).
    pub crashes: u8,
    /// Every crash takes down all the crashing replicas together (within
    /// `CRASH_ALL_SPREAD_US` of each other), as a power loss of the whole group: each
    /// restarts from its own disk at its own commit point (`--crash-all`).
    pub crash_all: bool,
    /// Every link is slow for the whole run, the heal included: each message takes
    /// [`world::SLOW_LINK_US_MIN`] to [`world::SLOW_LINK_US_MAX`], so two hops take longer
    /// than the progress timeout and a new view's first commit (its plan's Prepares and
    /// Commits) always comes after it (`--slow-links`): a synchronous network whose delay
    /// bound the timeouts do not know, where PBFT's doubling timeouts must still commit.
    pub slow_links: bool,
    /// Allow more than `f` Byzantine replicas (experiments: the protocol promises nothing
    /// then).
    pub beyond_budget: bool,
    /// Force one behaviour for every Byzantine replica (else drawn per replica).
    pub behaviour: Option<Behaviour>,
    /// Events of the faulty phase; then the network heals and the run must converge.
    pub steps: u64,
    /// Network faults: drops, duplicates, slow links, partitions.
    pub faults: bool,
    /// A protocol bug injected into every replica.
    pub bug: Option<InjectedBug>,
    /// A driver bug: journal writes do not wait for the prepared certificates of the ops
    /// they make durable (so a restarted replica can hold an op it committed with its own,
    /// never sent, Commit and no prepared certificate for it).
    pub journal_before_prepared: bool,
    /// A driver bug: prepared certificate writes do not wait for the guard asked for before
    /// them (so a crash can keep a certificate holding a vote its durable guard does not
    /// cover).
    pub prepared_before_guard: bool,
    /// A client bug: a client accepts a result on `f` matching replies instead of `f + 1`
    /// (so one Byzantine replica's answer is enough).
    pub client_weak_quorum: bool,
    /// Every core's `BftConfig::commits_undurable_ops_max` (`--commits-undurable-max`):
    /// a small one holds execution back behind every journal write, as a disk that lags
    /// does. `None`: the core's default.
    pub commits_undurable_max: Option<u64>,
    /// Keep and print the whole trace.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            replicas: 4,
            byzantine: 1,
            crashes: 0,
            crash_all: false,
            slow_links: false,
            beyond_budget: false,
            journal_before_prepared: false,
            prepared_before_guard: false,
            client_weak_quorum: false,
            commits_undurable_max: None,
            behaviour: None,
            steps: STEPS_DEFAULT,
            faults: true,
            bug: None,
            verbose: false,
        }
    }
}

/// Default events of the faulty phase, and a checker's failure: as the crash-fault
/// simulator's (`checker` is `safety`, `auth`, `liveness`, `evidence`, `client`, `guard`,
/// `conflicting-votes`, `prepared-report`, `serve-budget` or `driver` here).
pub use crate::sim::{Failure, STEPS_DEFAULT};

/// What a passing run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events processed.
    pub steps: u64,
    /// Simulated time at the end (µs).
    pub time_us: u64,
    /// Highest op committed by every correct replica.
    pub ops_committed: u64,
    /// Client requests accepted (f + 1 matching replies).
    pub requests_accepted: u64,
    /// View changes started, summed over correct replicas.
    pub view_changes: u64,
    /// Highest view reached by a correct replica.
    pub view_max: u64,
    /// Stable checkpoints, summed over correct replicas.
    pub checkpoints: u64,
    /// State transfers, summed over correct replicas.
    pub state_transfers: u64,
    /// Times a correct core held execution back for undurable commits
    /// (`commits_undurable_ops_max`; current incarnations).
    pub commits_held_for_durability: u64,
    /// Equivocations detected, summed over correct replicas.
    pub equivocations_detected: u64,
    /// `(view, op)` pairs where correct replicas accepted conflicting proposals.
    pub equivocations_accepted: u64,
    /// Messages refused by correct replicas (bad signatures, views, windows, …).
    pub messages_refused: u64,
    /// Of which bad signatures.
    pub bad_signatures: u64,
    /// Proposals correct replicas refused to vote for: a request without a valid client
    /// signature.
    pub proposals_refused: u64,
    /// Of which by replicas since their last restart (a restored core's counters start at
    /// zero): their proposal check was installed again.
    pub proposals_refused_restarted: u64,
    /// Messages dropped by the network.
    pub messages_dropped: u64,
    /// Restarts of crashed replicas.
    pub restarts: u64,
    /// Vote guard writes started.
    pub guard_writes: u64,
    /// Sends held back until a guard or prepared certificate write was durable (or lost in
    /// a crash).
    pub sends_held: u64,
    /// Sends of the core that left at once while a Commit of the same replica was held for
    /// its prepared certificate (only Commits wait for that write).
    pub sends_past_held_commits: u64,
    /// Prepared certificates written (in group writes of their own).
    pub prepared_persisted: u64,
    /// Prepared certificates handed to `BftReplica::restore`.
    pub prepared_restored: u64,
    /// Peers' `StateRequest`s correct replicas refused for want of serve budget (across
    /// restarts).
    pub state_serves_refused: u64,
    /// Of which asked by correct replicas (an honest state transfer slowed).
    pub state_serves_refused_to_correct: u64,
    /// Ops correct replicas served (`ServeState`) to Byzantine replicas.
    pub state_ops_served_to_byzantine: u64,
    /// Whether a Byzantine replica led view 0.
    pub byzantine_first_leader: bool,
}

impl Summary {
    /// Adds `other` into `self` (sweeps).
    pub fn add(&mut self, other: &Summary) {
        self.steps += other.steps;
        self.ops_committed += other.ops_committed;
        self.requests_accepted += other.requests_accepted;
        self.view_changes += other.view_changes;
        self.view_max = self.view_max.max(other.view_max);
        self.checkpoints += other.checkpoints;
        self.state_transfers += other.state_transfers;
        self.commits_held_for_durability += other.commits_held_for_durability;
        self.equivocations_detected += other.equivocations_detected;
        self.equivocations_accepted += other.equivocations_accepted;
        self.messages_refused += other.messages_refused;
        self.bad_signatures += other.bad_signatures;
        self.proposals_refused += other.proposals_refused;
        self.proposals_refused_restarted += other.proposals_refused_restarted;
        self.messages_dropped += other.messages_dropped;
        self.restarts += other.restarts;
        self.guard_writes += other.guard_writes;
        self.sends_held += other.sends_held;
        self.sends_past_held_commits += other.sends_past_held_commits;
        self.prepared_persisted += other.prepared_persisted;
        self.prepared_restored += other.prepared_restored;
        self.state_serves_refused += other.state_serves_refused;
        self.state_serves_refused_to_correct += other.state_serves_refused_to_correct;
        self.state_ops_served_to_byzantine += other.state_ops_served_to_byzantine;
    }
}

/// Parses the command line (without the program name) into options and a seed range.
pub fn parse_args<I: IntoIterator<Item = String>>(
    args: I,
) -> Result<(Options, std::ops::Range<u64>), String> {
    let mut options = Options::default();
    let mut byzantine = None;
    let mut crashes = 0;
    let mut seeds = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-v" || arg == "--verbose" {
            options.verbose = true;
            continue;
        }
        if arg == "--beyond-budget" {
            options.beyond_budget = true;
            continue;
        }
        if arg == "--crash-all" {
            options.crash_all = true;
            continue;
        }
        if arg == "--slow-links" {
            options.slow_links = true;
            continue;
        }
        if arg == "--journal-before-prepared" {
            options.journal_before_prepared = true;
            continue;
        }
        if arg == "--client-weak-quorum" {
            options.client_weak_quorum = true;
            continue;
        }
        if arg == "--prepared-before-guard" {
            options.prepared_before_guard = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
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
                replicas @ (4 | 7) => options.replicas = replicas as u8,
                _ => return Err("--replicas is 4 or 7".to_string()),
            },
            "--byzantine" => byzantine = Some(number()?),
            "--crashes" => crashes = number()?,
            "--behaviour" => {
                options.behaviour =
                    Some(Behaviour::parse(&value).ok_or(format!("unknown behaviour {value:?}"))?);
            }
            "--steps" => options.steps = number()?,
            "--commits-undurable-max" => match number()? {
                0 => return Err("--commits-undurable-max is at least 1".to_string()),
                max => options.commits_undurable_max = Some(max),
            },
            "--faults" => match value.as_str() {
                "on" => options.faults = true,
                "off" => options.faults = false,
                _ => return Err("--faults is on or off".to_string()),
            },
            "--bug" => options.bug = Some(parse_bug(&value)?),
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let replicas = u64::from(options.replicas);
    let faults_max = (replicas - 1) / 3;
    // Only Byzantine replicas count against f: a crashing replica is a correct one that
    // restarts from its guard and its prepared certificates. Without `--byzantine`, f
    // less the crashing replicas are Byzantine (as before crashes stopped counting).
    let byzantine = byzantine.unwrap_or(faults_max.saturating_sub(crashes));
    if byzantine > faults_max && !options.beyond_budget {
        return Err(format!(
            "--byzantine is at most f = {faults_max} (or use --beyond-budget)"
        ));
    }
    if byzantine >= replicas || crashes > replicas - byzantine {
        return Err(format!(
            "--crashes is at most the {} correct replicas",
            replicas.saturating_sub(byzantine)
        ));
    }
    if options.crash_all && crashes < 2 {
        return Err("--crash-all needs --crashes 2 or more".to_string());
    }
    options.crashes = crashes as u8;
    options.byzantine = byzantine as u8;
    let seeds = seeds.ok_or("--seed S or --seeds A..B is required")?;
    Ok((options, seeds))
}

fn parse_bug(name: &str) -> Result<InjectedBug, String> {
    match name {
        "quorum-minus-one" => Ok(InjectedBug::QuorumMinusOne),
        "new-view-ignores-prepared" => Ok(InjectedBug::NewViewIgnoresPrepared),
        "votes-without-proposal-check" => Ok(InjectedBug::VotesWithoutProposalCheck),
        "restore-ignores-guard" => Ok(InjectedBug::RestoreIgnoresGuard),
        "restore-drops-prepared" => Ok(InjectedBug::RestoreDropsPrepared),
        _ => Err(format!("unknown bug {name:?}")),
    }
}

fn bug_name(bug: InjectedBug) -> &'static str {
    match bug {
        InjectedBug::QuorumMinusOne => "quorum-minus-one",
        InjectedBug::NewViewIgnoresPrepared => "new-view-ignores-prepared",
        InjectedBug::VotesWithoutProposalCheck => "votes-without-proposal-check",
        InjectedBug::RestoreIgnoresGuard => "restore-ignores-guard",
        InjectedBug::RestoreDropsPrepared => "restore-drops-prepared",
    }
}

/// The arguments that rebuild `options`.
pub fn options_args(options: &Options) -> Vec<String> {
    let mut args = vec![
        "--replicas".to_string(),
        options.replicas.to_string(),
        "--byzantine".to_string(),
        options.byzantine.to_string(),
        "--crashes".to_string(),
        options.crashes.to_string(),
        "--steps".to_string(),
        options.steps.to_string(),
        "--faults".to_string(),
        if options.faults { "on" } else { "off" }.to_string(),
    ];
    if let Some(behaviour) = options.behaviour {
        args.push("--behaviour".to_string());
        args.push(behaviour.name().to_string());
    }
    if let Some(bug) = options.bug {
        args.push("--bug".to_string());
        args.push(bug_name(bug).to_string());
    }
    if let Some(max) = options.commits_undurable_max {
        args.push("--commits-undurable-max".to_string());
        args.push(max.to_string());
    }
    if options.crash_all {
        args.push("--crash-all".to_string());
    }
    if options.slow_links {
        args.push("--slow-links".to_string());
    }
    if options.beyond_budget {
        args.push("--beyond-budget".to_string());
    }
    if options.journal_before_prepared {
        args.push("--journal-before-prepared".to_string());
    }
    if options.prepared_before_guard {
        args.push("--prepared-before-guard".to_string());
    }
    if options.client_weak_quorum {
        args.push("--client-weak-quorum".to_string());
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
