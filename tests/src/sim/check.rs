//! The checkers: run after every event (`World::check_step`) and once everything has
//! converged (`World::check_end`). Each returns the checker's name and what is wrong.
//!
//! The checkers read the simulated disks (what survives a crash), the live cores, and a
//! reference ledger per group that applies the group's committed log in op order (the
//! "committed prefix" of `docs/protocol.md` section 12).
//!
//! Linearizability of the client history is [`super::linearizability`]'s; it reads the same
//! reference ledgers.

use std::collections::BTreeMap;

use percore_engine::checksum::Digest256;
use percore_engine::journal::{self, JournalChecksum};
use percore_engine::ledger::{Ledger, LedgerOperation};
use percore_engine::record::{CreateTransferResult, RecordResult, RecordSlot};
use percore_engine::session::{Disposition, Sessioned};
use percore_engine::state_machine::StateMachine;

use super::disk::Disk;
use super::linearizability::Linearizability;
use super::world::{BATCH_RECORDS_MAX, LEDGER_HASH_SEED, Request, World, descriptors, sessioned};

/// A checker's verdict: `Err((checker, what is wrong))`.
pub type Verdict = Result<(), (&'static str, String)>;

/// Digests are compared at every op that is a multiple of this (a digest hashes the whole
/// transfer window; every op would dominate the run time in debug builds).
pub const DIGEST_EVERY_OPS: u64 = 4;

/// Whether replicas record their digest after applying `op`.
pub fn digest_sampled(op: u64) -> bool {
    op.is_multiple_of(DIGEST_EVERY_OPS)
}

/// Replica index the reference ledger reports digests as.
const REFERENCE: u8 = u8::MAX;

/// What the checkers remember between events.
#[derive(Debug)]
pub struct CheckState {
    body_bytes_max: usize,
    /// Per group: highest op known committed (the length of `committed`).
    pub group_commit: Vec<u64>,
    /// Per group: the checksum of every committed op, `committed[g][op - 1]`: what a leader
    /// counted committed, or what a replica applied (or may apply: `apply_limit`), the
    /// first time it was seen. Every later sighting must agree.
    committed: Vec<Vec<JournalChecksum>>,
    /// Per group: the checksum of `group_commit` when it was committed.
    committed_checksum: Vec<JournalChecksum>,
    /// Per group: a ledger that applies the committed log, and the op it is at.
    reference: Vec<Option<Sessioned<Ledger>>>,
    reference_op: Vec<u64>,
    /// Per group: a ledger that applies the leader's durable log (in the fixed view, every
    /// op durable on the leader commits eventually), and the op it is at.
    log_reference: Vec<Option<Sessioned<Ledger>>>,
    log_reference_op: Vec<u64>,
    /// Times each transfer id was applied with `Ok` in the committed logs.
    applied_ok: BTreeMap<u128, u32>,
    /// First digest seen for `(group, op)`, and who reported it.
    digests: BTreeMap<(u32, u64), (Digest256, u8)>,
    pub(super) problem: Option<(&'static str, String)>,
    /// Entries a follower's journal refused (bad chain or bytes).
    pub refused: u64,
    /// Crashes that lost or tore unsynced bytes, per group.
    pub crash_losses: Vec<u64>,
    /// View-change actions the fixed-view driver dropped (not modelled yet).
    pub view_change_actions: u64,
    /// A core asked to truncate its journal: `(replica, group, op kept)`.
    pub truncated: Option<(u8, u32, u64)>,
    /// Linearizability of the client history.
    pub linearizability: Linearizability,
}

impl CheckState {
    /// Fresh state for `groups` groups.
    pub fn new(groups: u32, body_bytes_max: usize) -> CheckState {
        let linearizability = Linearizability::new(groups);
        let groups = groups as usize;
        CheckState {
            body_bytes_max,
            group_commit: vec![0; groups],
            committed: vec![Vec::new(); groups],
            committed_checksum: vec![journal::JOURNAL_CHAIN_ROOT; groups],
            reference: (0..groups).map(|_| None).collect(),
            reference_op: vec![0; groups],
            log_reference: (0..groups).map(|_| None).collect(),
            log_reference_op: vec![0; groups],
            applied_ok: BTreeMap::new(),
            digests: BTreeMap::new(),
            problem: None,
            refused: 0,
            crash_losses: vec![0; groups],
            view_change_actions: 0,
            truncated: None,
            linearizability,
        }
    }

    /// Fixed view: the leader left recovering with its journal at `op`, below entries it
    /// held before damage that no other replica held (never committed, so dropped): the
    /// log reference and the digests recorded past `op` described that lost log.
    pub fn log_dropped(&mut self, group: u32, op: u64) {
        let g = group as usize;
        self.digests
            .retain(|(digest_group, digest_op), _| *digest_group != group || *digest_op <= op);
        self.log_reference[g] = None;
        self.log_reference_op[g] = 0;
    }

    /// A replica (or the reference) applied `op` of `group` and its state has `digest`.
    pub fn digest_observed(&mut self, group: u32, op: u64, digest: Digest256, replica: u8) {
        match self.digests.get(&(group, op)) {
            None => {
                self.digests.insert((group, op), (digest, replica));
            }
            Some((first, first_replica)) if *first != digest && self.problem.is_none() => {
                self.problem = Some((
                    "state-agreement",
                    format!(
                        "group {group} op {op}: replica {} has digest {:02x?}…, replica {} {:02x?}… (255 = reference)",
                        first_replica,
                        &first[..4],
                        replica,
                        &digest[..4]
                    ),
                ));
            }
            Some(_) => {}
        }
    }

    /// A client got its first reply: every record must have succeeded (`Ok`), or have
    /// succeeded before (`Exists`, a retry); and the reply must be linearizable.
    pub fn client_acknowledged(&mut self, request: usize, state: &Request) {
        // Every record of a client request is new (ids are never reused) and every retry is
        // answered from the client's session with the first application's results, so the
        // only code a client may see is `Ok`: `Exists` would be a retry applied again.
        let ok = CreateTransferResult::Ok as u32;
        if let Some(code) = state.results.iter().find(|code| **code != ok)
            && self.problem.is_none()
        {
            let why = if *code == CreateTransferResult::Exists as u32 {
                " (a retry applied again, not answered from its session)"
            } else {
                ""
            };
            self.problem = Some((
                "client-result",
                format!(
                    "request {request} ({:?}, group {}, client {:#x} number {}) answered with \
                     result code {code}{why}",
                    state.operation, state.group, state.client_id, state.request_number
                ),
            ));
        }
        if let Err((checker, message)) = self.linearizability.answered(request, state) {
            self.problem_set(checker, message);
        }
    }

    /// Reports a problem found while driving (the first one wins).
    pub fn problem_set(&mut self, checker: &'static str, message: String) {
        if self.problem.is_none() {
            self.problem = Some((checker, message));
        }
    }

    /// The checksum of committed op `op` of `group`, if known.
    pub fn committed_checksum(&self, group: u32, op: u64) -> Option<JournalChecksum> {
        let index = usize::try_from(op).ok()?.checked_sub(1)?;
        self.committed[group as usize].get(index).copied()
    }

    /// A replica is about to cut its journal above `op`: no committed entry that it
    /// acknowledged or voted for (`acked_op`, its highest) may go.
    pub fn truncation_observed(
        &mut self,
        replica: u8,
        group: u32,
        op: u64,
        disk: &Disk,
        acked_op: u64,
    ) {
        let next = op + 1;
        // Only an entry this replica acknowledged or voted for counts: one it never did was
        // not part of any quorum, and a crash may drop it just the same (it fetches it
        // again). A replica that leads a view change with its own log cuts its staged tail
        // this way, even when a later view it has not heard of has committed those entries
        // (seed 3097 with --view-change).
        if next > disk.op_head().min(acked_op) {
            return;
        }
        if let Some(committed) = self.committed_checksum(group, next)
            && disk.checksum(next) == Some(committed)
        {
            self.problem_set(
                "truncate-committed",
                format!(
                    "replica {replica} group {group} truncates above op {op}, but its op {next} is committed (group committed {})",
                    self.group_commit[group as usize]
                ),
            );
        }
    }

    /// A crash lost or tore unsynced bytes of `group`.
    pub fn note_crash_loss(&mut self, group: u32) {
        self.crash_losses[group as usize] += 1;
    }
}

impl World {
    /// Every per-event checker, cheapest first.
    pub(super) fn check_step(&mut self) -> Verdict {
        if let Some(problem) = self.check.problem.take() {
            return Err(problem);
        }
        if let Some((replica, group, op)) = self.check.truncated {
            return Err((
                "agreement",
                format!(
                    "replica {replica} group {group} truncates its journal to op {op} in the fixed view"
                ),
            ));
        }
        for group in 0..self.options.groups {
            if self.options.view_change {
                self.check_committed(group)?;
                self.check_committed_durable(group)?;
            } else {
                // The fixed view's leader is known: its journal is the group's log.
                self.check_commit_durable(group)?;
                self.check_committed_durable(group)?;
                self.check_agreement(group)?;
                self.check_committed(group)?;
            }
        }
        self.check_cores()?;
        let mut advanced = false;
        for group in 0..self.options.groups {
            advanced |= self.reference_advance(group, false)?;
            if !self.options.view_change {
                advanced |= self.reference_advance(group, true)?;
            }
        }
        if advanced {
            self.check_conservation()?;
        }
        if let Some(problem) = self.check.problem.take() {
            return Err(problem);
        }
        Ok(())
    }

    fn quorum(&self) -> usize {
        usize::from(self.options.replicas) / 2 + 1
    }

    /// Replicas whose durable journal holds `op` with `checksum` (so, by the hash chain,
    /// the whole committed prefix up to it).
    fn holders(&self, group: u32, op: u64, checksum: JournalChecksum) -> usize {
        (0..self.options.replicas)
            .filter(|replica| {
                let disk = &self.nodes[self.node_index(*replica, group)].disk;
                disk.holds(op, checksum)
            })
            .count()
    }

    /// Durability: an op the leader counts as committed is durable on a quorum at that
    /// moment, and stays so after any sequence of crashes.
    fn check_commit_durable(&mut self, group: u32) -> Verdict {
        let g = group as usize;
        let leader = self.node_index(self.leader_of(group), group);
        if let Some(live) = self.nodes[leader].live.as_ref() {
            let commit = live.replica.commit_max();
            if commit > self.check.group_commit[g] {
                let checksum = self.nodes[leader].disk.checksum(commit).ok_or_else(|| {
                    (
                        "durability",
                        format!("group {group}: leader commits op {commit} it does not hold"),
                    )
                })?;
                let holders = self.holders(group, commit, checksum);
                if holders < self.quorum() {
                    return Err((
                        "durability",
                        format!(
                            "group {group}: leader committed op {commit} while only {holders} replicas hold it durably (quorum {})",
                            self.quorum()
                        ),
                    ));
                }
                let disk = &self.nodes[leader].disk;
                for op in self.check.group_commit[g] + 1..=commit {
                    let checksum = disk.checksum(op).expect("the leader holds what it commits");
                    self.check.committed[g].push(checksum);
                }
                self.check.group_commit[g] = commit;
                self.check.committed_checksum[g] = checksum;
                self.summary.ops_committed = self.check.group_commit.iter().sum();
            }
        }
        Ok(())
    }

    /// Agreement over committed ops (fixed view and view change): every replica's ops up to
    /// its `apply_limit` (committed, held, in the current view's log) match the committed
    /// log, so two replicas agree on every op both have committed. Ops past the committed
    /// log extend it, and the new highest committed op must then be durable on a quorum.
    fn check_committed(&mut self, group: u32) -> Verdict {
        let g = group as usize;
        for replica in 0..self.options.replicas {
            let index = self.node_index(replica, group);
            let node = &self.nodes[index];
            let Some(live) = node.live.as_ref() else {
                continue;
            };
            // Without view change a restart replays (and counts applied) its whole journal,
            // committed or not (docs/simulator.md, known issue 2): only ops a leader counted
            // committed are compared there.
            let limit = if self.options.view_change {
                live.replica.apply_limit()
            } else {
                live.replica.apply_limit().min(self.check.group_commit[g])
            };
            let from = live.agreed_upto;
            if limit <= from {
                continue;
            }
            let mut extended = false;
            for op in from + 1..=limit {
                let Some(checksum) = node.disk.checksum(op) else {
                    return Err((
                        "durability",
                        format!(
                            "group {group}: replica {replica} may apply op {op} (apply_limit {limit}) but its journal ends at {}",
                            node.disk.op_head()
                        ),
                    ));
                };
                match self.check.committed_checksum(group, op) {
                    Some(committed) if committed != checksum => {
                        return Err((
                            "agreement",
                            format!(
                                "group {group}: replica {replica} holds op {op} as committed (apply_limit {limit}, view {}) with another checksum than the committed log",
                                live.replica.view()
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        debug_assert_eq!(self.check.committed[g].len() as u64, op - 1);
                        self.check.committed[g].push(checksum);
                        extended = true;
                    }
                }
            }
            self.nodes[index].live.as_mut().expect("up").agreed_upto = limit;
            if extended {
                let commit = self.check.committed[g].len() as u64;
                let checksum = self.check.committed[g][commit as usize - 1];
                let holders = self.holders(group, commit, checksum);
                if holders < self.quorum() {
                    return Err((
                        "durability",
                        format!(
                            "group {group}: replica {replica} counts op {commit} committed while only {holders} replicas hold it durably (quorum {})",
                            self.quorum()
                        ),
                    ));
                }
                self.check.group_commit[g] = commit;
                self.check.committed_checksum[g] = checksum;
                self.summary.ops_committed = self.check.group_commit.iter().sum();
            }
        }
        Ok(())
    }

    /// Durability: the highest committed op (so, through the chain, all of them) stays
    /// durable on a quorum after any sequence of crashes and truncations.
    fn check_committed_durable(&self, group: u32) -> Verdict {
        let g = group as usize;
        let commit = self.check.group_commit[g];
        if commit > 0 {
            let holders = self.holders(group, commit, self.check.committed_checksum[g]);
            if holders < self.quorum() {
                return Err((
                    "durability",
                    format!(
                        "group {group}: committed op {commit} is now durable on only {holders} replicas (quorum {})",
                        self.quorum()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Agreement: every replica's journal is a prefix of the leader's (fixed view), checked
    /// at its head through the hash chain; so every op held twice has one checksum.
    fn check_agreement(&self, group: u32) -> Verdict {
        let leader = &self.nodes[self.node_index(self.leader_of(group), group)].disk;
        if leader.promised() > 0 {
            // The leader lost entries and is repairing them from its followers: their
            // journals are ahead of its own until it has.
            return Ok(());
        }
        for replica in 0..self.options.replicas {
            let disk = &self.nodes[self.node_index(replica, group)].disk;
            let head = disk.op_head();
            if head > leader.op_head() {
                return Err((
                    "agreement",
                    format!(
                        "group {group}: replica {replica} holds op {head} but the leader's journal ends at {} (not a prefix)",
                        leader.op_head()
                    ),
                ));
            }
            if disk.checksum(head) != leader.checksum(head) {
                return Err((
                    "agreement",
                    format!(
                        "group {group}: replica {replica} and the leader hold different entries at op {head} (durable here: {})",
                        disk.op_durable() >= head
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Monotonic commit while up; a follower never believes more committed than the leader
    /// ever did; a core never believes more durable than its disk holds.
    fn check_cores(&mut self) -> Verdict {
        let quorum_commit = self.check.group_commit.clone();
        for node in self.nodes.iter_mut() {
            let Some(live) = node.live.as_mut() else {
                continue;
            };
            let name = format!("replica {} group {}", node.replica, node.group);
            let (commit_max, commit_min) = (live.replica.commit_max(), live.replica.commit_min());
            if commit_max < live.seen_commit_max || commit_min < live.seen_commit_min {
                return Err((
                    "commit-monotonic",
                    format!(
                        "{name}: commit_max {} -> {commit_max}, commit_min {} -> {commit_min}",
                        live.seen_commit_max, live.seen_commit_min
                    ),
                ));
            }
            live.seen_commit_max = commit_max;
            live.seen_commit_min = commit_min;
            if commit_max > quorum_commit[node.group as usize] {
                return Err((
                    "commit-monotonic",
                    format!(
                        "{name}: commit_max {commit_max} above anything a leader committed ({})",
                        quorum_commit[node.group as usize]
                    ),
                ));
            }
            if self.options.view_change && live.replica.is_ready_leader() {
                let view = live.replica.view();
                if live.replica.config().leader_of(view) != node.replica {
                    return Err((
                        "one-leader-per-view",
                        format!("{name} is a ready leader of view {view}, led by another"),
                    ));
                }
                match self.view_leaders.get(&(node.group, view)) {
                    None => {
                        self.view_leaders
                            .insert((node.group, view), (node.replica, node.epoch));
                    }
                    Some((replica, _)) if *replica != node.replica => {
                        return Err((
                            "one-leader-per-view",
                            format!("{name} and replica {replica} both led view {view}"),
                        ));
                    }
                    Some((_, epoch)) if *epoch != node.epoch => {
                        // A restarted replica is a ready leader of a view it led before: it
                        // may not have sent anything in it then (a new leader becomes ready
                        // before its view is recorded, and seals only after). Sealing again
                        // in a view is what breaks P4; `World::sealed_in_view` checks that.
                        self.view_leaders
                            .insert((node.group, view), (node.replica, node.epoch));
                    }
                    Some(_) => {}
                }
            }
            if live.replica.op_durable() > node.disk.op_durable() {
                return Err((
                    "durable-before-ack",
                    format!(
                        "{name}: the core counts op {} durable, the disk holds {} durably",
                        live.replica.op_durable(),
                        node.disk.op_durable()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies newly committed ops to the group's reference ledger (from a journal that
    /// holds them durably), checking transfer-level exactly-once and handing each op and its
    /// results to the linearizability checker; or, with
    /// `log`, newly durable ops of the leader to the group's log reference.
    fn reference_advance(&mut self, group: u32, log: bool) -> Result<bool, (&'static str, String)> {
        let g = group as usize;
        let leader = self.node_index(self.leader_of(group), group);
        let target = if log {
            self.nodes[leader].disk.op_durable()
        } else {
            self.check.group_commit[g]
        };
        let at = if log {
            self.check.log_reference_op[g]
        } else {
            self.check.reference_op[g]
        };
        if at >= target {
            return Ok(false);
        }
        let first = self.node_index(0, group);
        let config = self.nodes[first]
            .live
            .as_ref()
            .map(|live| *live.ledger.inner().config());
        let slot = if log {
            &mut self.check.log_reference[g]
        } else {
            &mut self.check.reference[g]
        };
        if slot.is_none() {
            let Some(config) = config else {
                return Ok(false);
            };
            *slot = Some(sessioned(Ledger::with_hash_seed(config, LEDGER_HASH_SEED)));
        }
        let mut results = [<RecordResult as bytemuck::Zeroable>::zeroed(); BATCH_RECORDS_MAX];
        for op in at + 1..=target {
            // The committed entry, from any journal holding it (the log reference follows
            // the fixed view's leader).
            let source = if log {
                Some(leader)
            } else {
                let committed = self.check.committed_checksum(group, op);
                (0..self.options.replicas)
                    .map(|replica| self.node_index(replica, group))
                    .find(|index| {
                        // A journal that a state sync started at `op` knows its checksum but
                        // holds no entry for it.
                        let disk = &self.nodes[*index].disk;
                        committed.is_some()
                            && disk.checksum(op) == committed
                            && disk.entry(op).is_some()
                    })
            };
            let entry = source
                .and_then(|index| self.nodes[index].disk.entry(op))
                .ok_or_else(|| {
                    (
                        "durability",
                        format!("group {group}: committed op {op} is in no journal"),
                    )
                })?;
            let decoded = journal::decode_entry(entry, self.check.body_bytes_max)
                .map_err(|error| ("durability", format!("group {group} op {op}: {error}")))?;
            let operation =
                LedgerOperation::try_from(decoded.meta.operation).expect("ledger operation");
            let records: Vec<RecordSlot> = bytemuck::pod_collect_to_vec(decoded.records());
            let requests = descriptors(decoded.requests());
            let reference = if log {
                self.check.log_reference_op[g] = op;
                self.check.log_reference[g].as_mut().expect("built")
            } else {
                self.check.reference_op[g] = op;
                self.check.reference[g].as_mut().expect("built")
            };
            reference.apply_requests(
                op,
                operation,
                &records,
                &requests,
                &mut results[..records.len()],
            );
            // Records of retries the sessions answered without applying them again.
            let mut replayed = vec![false; records.len()];
            for (request, disposition) in requests.iter().zip(reference.last_dispositions()) {
                if matches!(
                    disposition,
                    Disposition::Replay { .. } | Disposition::ReplayInEntry { .. }
                ) {
                    let start = request.record_start as usize;
                    replayed[start..start + request.record_count as usize].fill(true);
                }
            }
            while reference.poll_outbound().is_some() {}
            let digest = digest_sampled(op).then(|| reference.digest());
            if let Some(digest) = digest {
                self.check.digest_observed(group, op, digest, REFERENCE);
            }
            if log {
                continue;
            }
            if operation == LedgerOperation::CreateTransfers {
                for ((record, result), replayed) in records.iter().zip(&results).zip(&replayed) {
                    if result.code != CreateTransferResult::Ok as u32 || *replayed {
                        continue;
                    }
                    let id = record.as_transfer().id;
                    let count = self.check.applied_ok.entry(id).or_insert(0);
                    *count += 1;
                    if *count > 1 {
                        return Err((
                            "exactly-once",
                            format!(
                                "transfer {id:#x} applied Ok {count} times (group {group} op {op})"
                            ),
                        ));
                    }
                }
            }
            let checksum = self.check.committed_checksum(group, op).expect("committed");
            self.check.linearizability.applied(
                &self.history,
                group,
                (op, checksum),
                operation,
                &records,
                &results[..records.len()],
            )?;
        }
        Ok(true)
    }

    /// Conservation: balances + suspense of every group, plus the legs emitted and not yet
    /// applied at their credit group, sum to zero, over the leaders' durable logs (or, with
    /// `strict_legs`, over the committed prefixes).
    fn check_conservation(&self) -> Verdict {
        let strict = self.options.strict_legs || self.options.view_change;
        let (prefixes, at) = if strict {
            (&self.check.reference, &self.check.reference_op)
        } else {
            (&self.check.log_reference, &self.check.log_reference_op)
        };
        let references: Vec<&Ledger> = prefixes.iter().flatten().map(Sessioned::inner).collect();
        if references.len() != self.options.groups as usize {
            return Ok(());
        }
        let mut sum: i128 = 0;
        let mut unapplied: i128 = 0;
        for reference in &references {
            sum = sum.wrapping_add(reference.conservation_sum());
            for leg in reference.credit_legs_unacked() {
                let transfer = leg.record.as_transfer();
                if !references[leg.shard as usize].credit_leg_applied(transfer) {
                    unapplied = unapplied.wrapping_add(transfer.amount as i128);
                }
            }
        }
        if sum.wrapping_add(unapplied) != 0 {
            return Err((
                "conservation",
                format!(
                    "{} (ops {at:?}): balances + suspense = {sum}, legs not yet applied = {unapplied}",
                    if strict {
                        "committed prefixes"
                    } else {
                        "leaders' durable logs"
                    }
                ),
            ));
        }
        Ok(())
    }

    /// Every acknowledged request's op is in the committed log with the checksum it was
    /// applied with, and in every replica's journal (after all crashes and view changes).
    fn check_acknowledged_durable(&self) -> Verdict {
        for (index, request) in self.history.iter().enumerate() {
            let Some((op, checksum)) = request.acked_op else {
                continue;
            };
            let group = request.group;
            if self.check.committed_checksum(group, op) != Some(checksum) {
                return Err((
                    "durability",
                    format!(
                        "acknowledged request {index} (group {group} op {op}) is not in the committed log"
                    ),
                ));
            }
            for replica in 0..self.options.replicas {
                let disk = &self.nodes[self.node_index(replica, group)].disk;
                if !disk.holds_durably(op, checksum) {
                    return Err((
                        "durability",
                        format!(
                            "acknowledged request {index} (group {group} op {op}) is not in replica {replica}'s journal"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// At the end, everything converged: each transfer applied exactly once, balances are
    /// what the acknowledged transfers say, every replica has the same state.
    pub(super) fn check_end(&mut self) -> Verdict {
        for group in 0..self.options.groups {
            self.reference_advance(group, false)?;
            if !self.options.view_change {
                self.reference_advance(group, true)?;
            }
        }
        self.check_conservation()?;
        self.check_acknowledged_durable()?;
        self.check.linearizability.check_end(&self.history)?;
        let mut debits: BTreeMap<u128, u128> = BTreeMap::new();
        let mut credits: BTreeMap<u128, u128> = BTreeMap::new();
        for (index, request) in self.history.iter().enumerate() {
            if request.operation != LedgerOperation::CreateTransfers {
                continue;
            }
            for record in &request.records {
                let transfer = record.as_transfer();
                let applied = self.check.applied_ok.get(&transfer.id).copied();
                if applied != Some(1) {
                    return Err((
                        "exactly-once",
                        format!(
                            "transfer {:#x} of acknowledged request {index} applied Ok {applied:?} times",
                            transfer.id
                        ),
                    ));
                }
                *debits.entry(transfer.debit_account_id).or_default() += transfer.amount;
                *credits.entry(transfer.credit_account_id).or_default() += transfer.amount;
            }
        }
        for node in &self.nodes {
            let live = node.live.as_ref().expect("converged: all up");
            for id in &self.accounts[node.group as usize] {
                let account = live.ledger.inner().lookup_account(*id).ok_or_else(|| {
                    (
                        "exactly-once",
                        format!("replica {} lacks account {id}", node.replica),
                    )
                })?;
                let expected = (
                    debits.get(id).copied().unwrap_or(0),
                    credits.get(id).copied().unwrap_or(0),
                );
                if (account.debits_posted, account.credits_posted) != expected {
                    return Err((
                        "exactly-once",
                        format!(
                            "replica {} group {} account {id}: debits/credits {:?}, acknowledged transfers say {expected:?}",
                            node.replica,
                            node.group,
                            (account.debits_posted, account.credits_posted)
                        ),
                    ));
                }
            }
            if live.ledger.inner().suspense() != 0 || live.ledger.inner().in_flight() != 0 {
                return Err((
                    "conservation",
                    format!(
                        "replica {} group {}: suspense {} in flight {} after convergence",
                        node.replica,
                        node.group,
                        live.ledger.inner().suspense(),
                        live.ledger.inner().in_flight()
                    ),
                ));
            }
        }
        for group in 0..self.options.groups {
            let digests: Vec<Digest256> = (0..self.options.replicas)
                .map(|replica| {
                    let node = &self.nodes[self.node_index(replica, group)];
                    node.live.as_ref().expect("up").ledger.digest()
                })
                .collect();
            if digests.iter().any(|digest| *digest != digests[0]) {
                return Err((
                    "state-agreement",
                    format!("group {group}: replicas end with different digests"),
                ));
            }
        }
        Ok(())
    }
}
