//! The BFT replica core: normal operation, checkpoints, catch-up, view change and evidence.
//! See the module documentation of [`crate::bft`] and `docs/bft.md`.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;

use super::message::{
    CHAIN_GENESIS, CheckpointCert, CommitCert, Committee, Digest, Evidence, Message, NewView,
    PreparedCert, PreparedEntry, SnapshotStatement, StateCert, ViewChange, Vote, VoteKind,
    batch_digest, chain_digest,
};
use super::request::ProposalCheck;
use super::serve_budget::ServeBudget;
use super::{
    Action, BftConfig, BftError, BftMetrics, CHECKPOINT_VOTES_KEPT_PER_REPLICA, EVIDENCE_KEPT_MAX,
    InjectedBug, REPLICA_COUNT_MAX, STATE_VOTES_KEPT_PER_REPLICA, VIEW_AHEAD_MAX,
};

/// Where a replica stands in its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Following (or leading) the view.
    Normal,
    /// Left the view; waiting for the next leader's NewView.
    ViewChange,
}

/// What a replica may have signed, made durable by the driver before anything it covers is
/// sent ([`Action::PersistGuard`]): every PrePrepare, Prepare and Commit of a view below
/// `vote_view`, those of `vote_view` for ops up to `vote_op_max`, and ViewChanges for views
/// up to `view_change_view`. A replica restored with a guard ([`BftReplica::restore`]) signs
/// none of these again, so it cannot contradict what it signed before a crash. The zero
/// guard covers nothing (ops start at 1, view changes at view 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VoteGuard {
    /// The highest view with a PrePrepare, Prepare or Commit signed (or reserved).
    pub vote_view: u64,
    /// In `vote_view`, the highest op voted for or reserved.
    pub vote_op_max: u64,
    /// The highest view a ViewChange was signed for.
    pub view_change_view: u64,
}

impl VoteGuard {
    /// Whether a PrePrepare, Prepare or Commit for `(view, op)` may have been signed.
    pub fn covers_vote(&self, view: u64, op: u64) -> bool {
        view < self.vote_view || (view == self.vote_view && op <= self.vote_op_max)
    }

    /// The view a replica restored with this guard starts in.
    pub fn view(&self) -> u64 {
        self.vote_view.max(self.view_change_view)
    }
}

/// What a restarted replica's driver read back from its disk ([`BftReplica::restore`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The last stable checkpoint journaled (`None`: genesis).
    pub low_cert: Option<CheckpointCert>,
    /// The digest of every op executed after it, in op order (null ops included): the
    /// committed ops that are durable here.
    pub digests: Vec<Digest>,
    /// The last guard persisted.
    pub guard: VoteGuard,
    /// The prepared certificates made durable ([`Action::PersistPrepared`]), in any order;
    /// those at or below the checkpoint, or outside the log window above it, are ignored,
    /// and of two for one op the higher view is kept.
    pub prepared: Vec<PreparedEntry>,
}

/// A committed op's proof, kept to help replicas that are behind.
#[derive(Debug, Clone)]
struct CommitRecord {
    pre_prepare: Vote,
    cert: CommitCert,
}

/// One op of the log window. Votes are kept for one view (`votes_view`) and at most one per
/// replica and kind, so a slot is bounded whatever peers send.
#[derive(Debug, Clone)]
struct Slot {
    /// The op this slot holds now (0: unused).
    op: u64,
    /// The proposal accepted, with its batch.
    pre_prepare: Option<Vote>,
    batch: Vec<u8>,
    /// The view the vote arrays belong to.
    votes_view: u64,
    /// Each replica's Prepare and the leader's proposal it carried.
    prepares: [Option<(Vote, Vote)>; REPLICA_COUNT_MAX],
    commits: [Option<Vote>; REPLICA_COUNT_MAX],
    /// The prepared certificate of the highest view, and its batch (view changes carry it).
    prepared: Option<PreparedEntry>,
    committed: Option<CommitRecord>,
    /// Chain digest after this op executed.
    chain: Option<Digest>,
    /// The digest this replica executed at this op (also known after a restart, when the
    /// commit certificate is not held): a conflicting proposal is refused.
    executed: Option<Digest>,
    /// The last proposal for this op the [`ProposalCheck`] refused: its resends are
    /// dropped without checking the batch again.
    refused: Option<Vote>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            op: 0,
            pre_prepare: None,
            batch: Vec::new(),
            votes_view: 0,
            prepares: [None; REPLICA_COUNT_MAX],
            commits: [None; REPLICA_COUNT_MAX],
            prepared: None,
            committed: None,
            chain: None,
            executed: None,
            refused: None,
        }
    }

    /// Clears the vote arrays if they belong to an older view.
    fn votes_for(&mut self, view: u64) {
        if self.votes_view != view {
            self.votes_view = view;
            self.prepares = [None; REPLICA_COUNT_MAX];
            self.commits = [None; REPLICA_COUNT_MAX];
        }
    }

    fn prepared_in(&self, view: u64) -> Option<Digest> {
        self.prepared
            .as_ref()
            .filter(|entry| entry.cert.pre_prepare.view == view)
            .map(|entry| entry.cert.pre_prepare.digest)
    }
}

/// What a NewView must contain, computed from its view changes (the leader and every
/// verifier compute the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewViewPlan {
    /// The highest stable checkpoint among the view changes.
    pub checkpoint: Option<CheckpointCert>,
    /// For each op above it up to the highest prepared op: the digest and batch to
    /// re-propose (the prepared certificate of the highest view, or the null op).
    pub entries: Vec<(u64, Digest, Vec<u8>)>,
}

/// The plan of a new view from `view_changes` (already verified).
pub fn new_view_plan(view_changes: &[ViewChange], bug: Option<InjectedBug>) -> NewViewPlan {
    let checkpoint = view_changes
        .iter()
        .max_by_key(|view_change| view_change.checkpoint_op())
        .and_then(|view_change| view_change.checkpoint.clone());
    let op_min = checkpoint.as_ref().map_or(0, CheckpointCert::op);
    // For each op, the prepared certificate of the highest view (ties, impossible with at
    // most f faults, go to the smaller digest so that everyone picks the same).
    let mut best: BTreeMap<u64, (u64, Digest, &Vec<u8>)> = BTreeMap::new();
    for entry in view_changes
        .iter()
        .flat_map(|view_change| &view_change.prepared)
    {
        let head = &entry.cert.pre_prepare;
        if head.op <= op_min {
            continue;
        }
        let candidate = (head.view, head.digest, &entry.batch);
        let better = match best.get(&head.op) {
            None => true,
            Some((view, digest, _)) => {
                head.view > *view || (head.view == *view && head.digest < *digest)
            }
        };
        if better {
            best.insert(head.op, candidate);
        }
    }
    let op_max = best.keys().next_back().copied().unwrap_or(op_min);
    let null = batch_digest(&[]);
    let entries = (op_min + 1..=op_max)
        .map(|op| match best.get(&op) {
            Some((_, digest, batch)) if bug != Some(InjectedBug::NewViewIgnoresPrepared) => {
                (op, *digest, (*batch).clone())
            }
            _ => (op, null, Vec::new()),
        })
        .collect();
    NewViewPlan {
        checkpoint,
        entries,
    }
}

/// The BFT replica core of one group on one replica.
#[derive(Debug)]
pub struct BftReplica {
    config: BftConfig,
    committee: Committee,
    key: SigningKey,
    view: u64,
    status: Status,
    /// Low watermark: the stable checkpoint's op, and its certificate.
    low: u64,
    low_cert: Option<CheckpointCert>,
    /// Highest op executed, and the chain digest through it.
    commit_op: u64,
    commit_chain: Digest,
    /// Leader: the next op to propose.
    next_op: u64,
    /// Highest op with an accepted proposal in this view.
    op_accepted_max: u64,
    /// The last op of the NewView plan installed (0 in view 0): leading, this replica
    /// proposes only once it executed every op through it, because the driver stamps a
    /// batch (client timestamps) from the state executed so far plus its own proposals,
    /// and the plan's ops are neither.
    plan_op_max: u64,
    slots: Vec<Slot>,
    checkpoint_votes: Vec<[Option<Vote>; CHECKPOINT_VOTES_KEPT_PER_REPLICA]>,
    /// A stable checkpoint above `commit_op`, adopted once execution reaches it.
    stable_ahead: Option<CheckpointCert>,
    /// Each replica's latest view change (for a view at or above this replica's).
    view_changes: Vec<Option<ViewChange>>,
    /// The NewView of the current view, once installed (answers laggards).
    new_view: Option<NewView>,
    /// Both timeouts double with each view change (PBFT's liveness rule: a group whose
    /// messages take longer than the first timeouts still gets a view to commit in), and
    /// halve again with each `checkpoint_interval_ops` ops executed in a normal view.
    view_change_attempts: u32,
    /// Ops executed in a normal view since the last view change or halving.
    ops_since_backoff_step: u64,
    pending: bool,
    progress_deadline_us: Option<u64>,
    view_change_deadline_us: Option<u64>,
    resend_at_us: u64,
    status_at_us: u64,
    status_answered_us: Vec<u64>,
    /// Peers heard from since this replica started (a message that was not refused as
    /// unsigned or forged, or a `Status`): it suspects no leader before `f + 1` of them.
    peers_heard: Vec<bool>,
    /// Each peer's latest reported `commit_op` (its `Status`).
    peer_commit_op: Vec<u64>,
    /// Each peer's latest reported view (its `Status`; `None` before the first since this
    /// replica started). A replica awaiting a NewView reports the view before its own.
    peer_view: Vec<Option<u64>>,
    state_transfer: Option<CheckpointCert>,
    /// Snapshot checkpoint votes kept per replica (the highest ops above `state_cert`).
    state_votes: Vec<[Option<(Vote, SnapshotStatement)>; STATE_VOTES_KEPT_PER_REPLICA]>,
    /// The highest state certificate formed or received (what this replica offers).
    state_cert: Option<StateCert>,
    /// The op of the snapshot the driver is fetching ([`Action::FetchSnapshot`]): no
    /// `StateRequest` and no `StateOps` meanwhile.
    snapshot_fetch: Option<u64>,
    /// State transfer: the peer asked for the next ops (rotates on each retry, so a silent
    /// or lying peer costs one retry interval), and when to ask again.
    transfer_peer: u8,
    transfer_retry_at_us: Option<u64>,
    /// Per replica: the committed ops this replica may still serve its `StateRequest`s
    /// (`state_serve_ops_per_s`; allocated here, never per message).
    serve_budgets: Vec<ServeBudget>,
    evidence: Vec<Evidence>,
    metrics: BftMetrics,
    /// What the driver has been asked to persist: covers everything signed.
    guard: VoteGuard,
    /// What was persisted before a restart: never signed again.
    guard_restored: VoteGuard,
    /// Restarted into a view whose NewView it does not hold: reports the view before it in
    /// `Status`, so that peers in this view send their NewView.
    awaiting_new_view: bool,
    /// Highest executed op the driver reported durable (see
    /// [`BftConfig::durability_reported`]).
    durable_op: u64,
    /// What a backup checks in a batch before it votes for it (none: every batch).
    proposal_check: ProposalCheckSlot,
    /// Highest op of this view whose proposal the check refused: work the leader owes, so
    /// the progress timer runs until it is committed (by someone) or the view changes.
    refused_op_max: u64,
}

/// The driver's [`ProposalCheck`], if any (a newtype for `Debug`).
struct ProposalCheckSlot(Option<Box<dyn ProposalCheck>>);

impl std::fmt::Debug for ProposalCheckSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProposalCheck"
        } else {
            "None"
        })
    }
}

impl BftReplica {
    /// A fresh replica in view 0 with an empty log. `key` must be the committee's key for
    /// `config.replica`.
    pub fn new(
        config: BftConfig,
        committee: Committee,
        key: SigningKey,
        now_us: u64,
    ) -> Result<Self, BftError> {
        config.validate(&committee)?;
        if committee.key(config.replica) != Some(&key.verifying_key()) {
            return Err(BftError::KeyMismatch(config.replica));
        }
        let replica_count = usize::from(committee.replica_count());
        Ok(Self {
            slots: vec![Slot::empty(); config.log_window_ops as usize],
            checkpoint_votes: vec![[None; CHECKPOINT_VOTES_KEPT_PER_REPLICA]; replica_count],
            view_changes: vec![None; replica_count],
            status_answered_us: vec![0; replica_count],
            peers_heard: vec![false; replica_count],
            peer_commit_op: vec![0; replica_count],
            peer_view: vec![None; replica_count],
            config,
            committee,
            key,
            view: 0,
            status: Status::Normal,
            low: 0,
            low_cert: None,
            commit_op: 0,
            commit_chain: CHAIN_GENESIS,
            next_op: 1,
            op_accepted_max: 0,
            plan_op_max: 0,
            stable_ahead: None,
            new_view: None,
            view_change_attempts: 0,
            ops_since_backoff_step: 0,
            pending: false,
            progress_deadline_us: None,
            view_change_deadline_us: None,
            resend_at_us: now_us + config.resend_interval_us,
            status_at_us: now_us + config.status_interval_us,
            state_transfer: None,
            state_votes: vec![[None; STATE_VOTES_KEPT_PER_REPLICA]; replica_count],
            state_cert: None,
            snapshot_fetch: None,
            transfer_peer: (config.replica + 1) % replica_count as u8,
            transfer_retry_at_us: None,
            serve_budgets: vec![
                ServeBudget::full(config.serve_budget_ops(), now_us);
                replica_count
            ],
            evidence: Vec::new(),
            metrics: BftMetrics::default(),
            guard: VoteGuard::default(),
            guard_restored: VoteGuard::default(),
            awaiting_new_view: false,
            durable_op: 0,
            proposal_check: ProposalCheckSlot(None),
            refused_op_max: 0,
        })
    }

    /// Installs the check a backup runs on every batch before it signs a Prepare for it
    /// (BFT mode: every client request's signature, [`super::request`]). A batch it refuses
    /// is the leader's misbehaviour: no vote, counted in
    /// [`BftMetrics::proposals_refused`], and the progress timer runs until the op is
    /// committed or the view changes. The leader's own proposals are not checked (its
    /// driver proposes only what it admitted).
    pub fn set_proposal_check(&mut self, check: Box<dyn ProposalCheck>) {
        self.proposal_check = ProposalCheckSlot(Some(check));
    }

    /// Runs the proposal check on `batch` (digest `digest`), proposed for `op`.
    fn check_proposal(&mut self, op: u64, batch: &[u8], digest: &Digest) -> Result<(), BftError> {
        let Some(check) = self.proposal_check.0.as_mut() else {
            return Ok(());
        };
        if self.config.bug == Some(InjectedBug::VotesWithoutProposalCheck) {
            return Ok(());
        }
        check.check_proposal(batch, digest).map_err(|error| {
            self.metrics.proposals_refused += 1;
            self.refused_op_max = self.refused_op_max.max(op);
            BftError::ProposalRefused { op, error }
        })
    }

    /// A replica restarted from what its driver persisted: the committed log's digests
    /// above the last stable checkpoint (the chain digest is recomputed from them), the
    /// last [`VoteGuard`] and its durable prepared certificates (reported in its
    /// ViewChanges as before the crash). It starts in the guard's view and never signs
    /// what the guard covers: in view 0 it follows at once (committing from its peers'
    /// votes and `CommitProof`s, voting again above the guard's ops); in a later view it
    /// waits for that view's NewView (or joins a later view change) as a replica changing
    /// views does. The checkpoint and prepared certificates are verified; the digests are
    /// trusted (this replica's own checksummed journal).
    pub fn restore(
        config: BftConfig,
        committee: Committee,
        key: SigningKey,
        now_us: u64,
        restored: Restored,
    ) -> Result<Self, BftError> {
        Self::restore_above(config, committee, key, now_us, None, restored)
    }

    /// [`Self::restore`] of a replica that installed a snapshot ([`Action::FetchSnapshot`])
    /// since its last stable checkpoint: `restored.digests` are the ops after the snapshot's
    /// op `base.0`, whose chain digest is `base.1` (its own journal's record of the state
    /// certificate it verified). Its low watermark stays at `restored.low_cert`, below, so
    /// it catches up by state transfer like any replica behind its peers' checkpoint.
    pub fn restore_above(
        config: BftConfig,
        committee: Committee,
        key: SigningKey,
        now_us: u64,
        base: Option<(u64, Digest)>,
        restored: Restored,
    ) -> Result<Self, BftError> {
        let mut replica = Self::new(config, committee, key, now_us)?;
        let (low, low_chain) = match &restored.low_cert {
            Some(cert) => {
                replica.committee.verify_checkpoint(cert)?;
                (cert.op(), cert.digest())
            }
            None => (0, CHAIN_GENESIS),
        };
        let (base_op, mut chain) = match base {
            Some((op, chain)) if op >= low => (op, chain),
            Some(_) => return Err(BftError::Limit("restore: snapshot below the checkpoint")),
            None => (low, low_chain),
        };
        let commit_op = base_op + restored.digests.len() as u64;
        // The last `log_window_ops` executed ops keep their chain digest (a peer's stable
        // checkpoint among them moves the low watermark) and digest.
        for (index, digest) in restored.digests.iter().enumerate() {
            let op = base_op + 1 + index as u64;
            chain = chain_digest(&chain, op, digest);
            if op + config.log_window_ops > commit_op {
                let slot_index = replica.slot_index(op);
                let slot = &mut replica.slots[slot_index];
                *slot = Slot::empty();
                slot.op = op;
                slot.chain = Some(chain);
                slot.executed = Some(*digest);
            }
        }
        replica.low = low;
        replica.low_cert = restored.low_cert;
        replica.commit_op = commit_op;
        replica.commit_chain = chain;
        replica.next_op = commit_op + 1;
        replica.op_accepted_max = commit_op;
        replica.durable_op = commit_op;
        let guard = match config.bug {
            Some(InjectedBug::RestoreIgnoresGuard) => VoteGuard::default(),
            _ => restored.guard,
        };
        replica.guard = guard;
        replica.guard_restored = guard;
        if config.bug != Some(InjectedBug::RestoreDropsPrepared) {
            replica.restore_prepared(restored.prepared)?;
        }
        replica.view = guard.view();
        if replica.view > 0 {
            replica.status = Status::ViewChange;
            replica.awaiting_new_view = true;
            replica.view_change_deadline_us = Some(now_us + config.view_change_timeout_us);
        }
        // The latest checkpoint vote above the watermark again (the same statement as
        // before the restart: the chain is deterministic), resent until stable.
        let checkpoint = commit_op - commit_op % config.checkpoint_interval_ops;
        if checkpoint > low
            && let Some(chain) = replica.slot(checkpoint).and_then(|slot| slot.chain)
        {
            let vote = replica.sign(VoteKind::Checkpoint, 0, checkpoint, chain);
            let _ = replica.record_checkpoint_vote(now_us, vote, &mut Vec::new());
        }
        debug_assert!(replica.commit_op >= replica.low);
        Ok(replica)
    }

    /// Puts the durable prepared certificates back into their slots, so that this
    /// replica's ViewChanges report them as if it had never crashed (section 7's argument
    /// needs `f + 1` correct replicas of a commit quorum to report a committed op). Each
    /// certificate and batch is checked: a damaged journal is refused, not trusted. An
    /// older view's certificate for an op that later committed another batch is kept, as
    /// the replica held it before its crash (the committed batch's certificate has a higher
    /// view, and the new leader takes the highest).
    fn restore_prepared(&mut self, prepared: Vec<PreparedEntry>) -> Result<(), BftError> {
        let prepares_needed = self.prepares_needed();
        for entry in prepared {
            let head = entry.cert.pre_prepare;
            if self.check_window(head.op).is_err() {
                continue;
            }
            self.committee
                .verify_prepared(&entry.cert, prepares_needed)?;
            if batch_digest(&entry.batch) != head.digest {
                return Err(BftError::InvalidCertificate(
                    "restore: prepared batch digest",
                ));
            }
            let slot = self.slot_mut(head.op);
            let newer = slot
                .prepared
                .as_ref()
                .is_none_or(|held| held.cert.pre_prepare.view < head.view);
            if newer {
                slot.prepared = Some(entry);
            }
        }
        Ok(())
    }

    /// What this replica has asked its driver to persist (it covers every statement
    /// signed).
    pub fn guard(&self) -> VoteGuard {
        self.guard
    }

    /// Whether a PrePrepare, Prepare or Commit for `(view, op)` may be signed: not if the
    /// guard restored at start covers it.
    fn vote_allowed(&self, view: u64, op: u64) -> bool {
        !self.guard_restored.covers_vote(view, op)
    }

    /// Before a PrePrepare, Prepare or Commit for `(view, op)` is sent: raises the guard to
    /// cover it if it does not, reserving two windows of ops ahead so that this is rare.
    fn guard_vote(&mut self, view: u64, op: u64, actions: &mut Vec<Action>) {
        debug_assert!(self.vote_allowed(view, op));
        if self.guard.covers_vote(view, op) {
            return;
        }
        let reserve = op.max(self.low + 2 * self.config.log_window_ops);
        self.guard.vote_op_max = if view == self.guard.vote_view {
            self.guard.vote_op_max.max(reserve)
        } else {
            reserve
        };
        self.guard.vote_view = view;
        debug_assert!(self.guard.covers_vote(view, op));
        actions.push(Action::PersistGuard { guard: self.guard });
    }

    /// Before a ViewChange for `view` is sent.
    fn guard_view_change(&mut self, view: u64, actions: &mut Vec<Action>) {
        debug_assert!(view > self.guard_restored.view_change_view);
        if self.guard.view_change_view < view {
            self.guard.view_change_view = view;
            actions.push(Action::PersistGuard { guard: self.guard });
        }
    }

    /// The driver made every executed op up to `op` durable: checkpoint votes held back
    /// for it are signed and sent (with [`BftConfig::durability_reported`]), and committed
    /// ops held back by [`BftConfig::commits_undurable_ops_max`] are handed over.
    pub fn on_durable(&mut self, now_us: u64, op: u64, actions: &mut Vec<Action>) {
        let durable = op.min(self.commit_op);
        if durable <= self.durable_op {
            return;
        }
        // A state transfer asks for its next ops once the last ones are on disk here (the
        // driver's commit queue stays bounded).
        let transferring = self.state_transfer.is_some() && durable >= self.commit_op;
        let interval = self.config.checkpoint_interval_ops;
        let mut checkpoint = (self.durable_op / interval + 1) * interval;
        self.durable_op = durable;
        while checkpoint <= durable {
            if let Some(chain) = self.slot(checkpoint).and_then(|slot| slot.chain) {
                self.sign_checkpoint(now_us, checkpoint, chain, actions);
            }
            checkpoint += interval;
        }
        if transferring {
            self.request_state_ops(now_us, actions);
        }
        // Ops committed while execution waited for durability.
        self.execute(now_us, actions);
    }

    fn sign_checkpoint(&mut self, now_us: u64, op: u64, chain: Digest, actions: &mut Vec<Action>) {
        let vote = self.sign(VoteKind::Checkpoint, 0, op, chain);
        actions.push(Action::Broadcast {
            message: Message::Checkpoint(vote),
        });
        // Our own vote is always fresh and consistent: it cannot fail.
        let _ = self.record_checkpoint_vote(now_us, vote, actions);
    }

    /// The highest state certificate this replica holds (it offers its snapshot to peers
    /// behind every log).
    pub fn state_cert(&self) -> Option<&StateCert> {
        self.state_cert.as_ref()
    }

    /// The driver wrote a snapshot of the state after executing op `statement.op` (durable:
    /// the file is synced): sign `StateCheckpoint(statement)` and broadcast it. The driver
    /// computed `statement.chain` from the ops this core handed it; a statement for an op
    /// not executed here, or below the state certificate held, is not signed.
    pub fn sign_snapshot(
        &mut self,
        now_us: u64,
        statement: SnapshotStatement,
        actions: &mut Vec<Action>,
    ) {
        if statement.op == 0
            || statement.op > self.commit_op
            || self.state_cert_op() >= statement.op
        {
            return;
        }
        if let Some(chain) = self.chain_at(statement.op) {
            assert_eq!(chain, statement.chain, "the driver's chain is the core's");
        }
        let vote = self.sign(
            VoteKind::StateCheckpoint,
            0,
            statement.op,
            statement.digest(),
        );
        actions.push(Action::Broadcast {
            message: Message::StateCheckpoint { vote, statement },
        });
        // Our own vote is fresh and consistent: it cannot fail.
        let _ = self.record_state_vote(now_us, vote, statement, actions);
    }

    fn state_cert_op(&self) -> u64 {
        self.state_cert.as_ref().map_or(0, StateCert::op)
    }

    /// This replica's chain digest at `op`, if it still knows it.
    fn chain_at(&self, op: u64) -> Option<Digest> {
        if op == self.commit_op {
            return Some(self.commit_chain);
        }
        self.slot(op).and_then(|slot| slot.chain)
    }

    /// The current view.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// Normal or between views.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The committee (keys, quorums, leaders).
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The configuration.
    pub fn config(&self) -> &BftConfig {
        &self.config
    }

    /// The leader of the current view.
    pub fn leader(&self) -> u8 {
        self.committee.leader_of(self.view)
    }

    /// The last op of the NewView plan installed (0 in view 0 and after a restart): a
    /// driver that applies committed ops after the core commits them proposes only once it
    /// applied through it ([`Self::is_ready_leader`] waits for the core to execute it).
    pub fn plan_op_max(&self) -> u64 {
        self.plan_op_max
    }

    /// Whether `propose` would be accepted now (window permitting).
    pub fn is_ready_leader(&self) -> bool {
        self.status == Status::Normal
            && self.leader() == self.config.replica
            && self.state_transfer.is_none()
            && self.commit_op >= self.plan_op_max
            && self.next_op <= self.low + self.config.log_window_ops
            && self.vote_allowed(self.view, self.next_op)
            && !self.op_committed(self.next_op)
    }

    /// Whether `op` holds a committed batch (a later view's `CommitProof` can arrive, ahead
    /// of the ops below it, while this replica still leads an older view): proposing there
    /// would replace the certified batch in the slot.
    fn op_committed(&self, op: u64) -> bool {
        self.slot(op)
            .is_some_and(|slot| slot.committed.is_some() || slot.executed.is_some())
    }

    /// Highest op executed.
    pub fn commit_op(&self) -> u64 {
        self.commit_op
    }

    /// Chain digest through `commit_op`.
    pub fn commit_chain(&self) -> Digest {
        self.commit_chain
    }

    /// The low watermark (stable checkpoint op).
    pub fn low(&self) -> u64 {
        self.low
    }

    /// Counters.
    pub fn metrics(&self) -> &BftMetrics {
        &self.metrics
    }

    /// Evidence of equivocation found (the first [`EVIDENCE_KEPT_MAX`]).
    pub fn evidence(&self) -> &[Evidence] {
        &self.evidence
    }

    /// The stable checkpoint certificate the low watermark stands on (`None`: genesis).
    pub fn low_cert(&self) -> Option<&CheckpointCert> {
        self.low_cert.as_ref()
    }

    /// The checkpoint a requested state transfer must reach, if one is under way.
    pub fn state_transfer(&self) -> Option<&CheckpointCert> {
        self.state_transfer.as_ref()
    }

    /// When `on_tick` must run next.
    pub fn poll_timeout(&self) -> u64 {
        let mut deadline = self.resend_at_us.min(self.status_at_us);
        for timer in [
            self.progress_deadline_us,
            self.view_change_deadline_us,
            self.transfer_retry_at_us,
        ]
        .into_iter()
        .flatten()
        {
            deadline = deadline.min(timer);
        }
        deadline
    }

    fn prepares_needed(&self) -> usize {
        let needed = self.committee.quorum() - 1;
        match self.config.bug {
            Some(InjectedBug::QuorumMinusOne) => needed.saturating_sub(1).max(1),
            _ => needed,
        }
    }

    fn commits_needed(&self) -> usize {
        let needed = self.committee.quorum();
        match self.config.bug {
            Some(InjectedBug::QuorumMinusOne) => needed - 1,
            _ => needed,
        }
    }

    fn sign(&self, kind: VoteKind, view: u64, op: u64, digest: Digest) -> Vote {
        Vote::sign(
            &self.key,
            self.committee.group,
            kind,
            self.config.replica,
            view,
            op,
            digest,
        )
    }

    fn slot_index(&self, op: u64) -> usize {
        (op % self.config.log_window_ops) as usize
    }

    fn check_window(&self, op: u64) -> Result<(), BftError> {
        let high = self.low + self.config.log_window_ops;
        if op <= self.low || op > high {
            return Err(BftError::OutOfWindow {
                op,
                low: self.low,
                high,
            });
        }
        Ok(())
    }

    /// The slot of `op` (in the window), reset if it held an older op.
    fn slot_mut(&mut self, op: u64) -> &mut Slot {
        debug_assert!(self.check_window(op).is_ok());
        let index = self.slot_index(op);
        let slot = &mut self.slots[index];
        if slot.op != op {
            *slot = Slot::empty();
            slot.op = op;
        }
        slot
    }

    fn slot(&self, op: u64) -> Option<&Slot> {
        let slot = &self.slots[self.slot_index(op)];
        (slot.op == op && op > self.low).then_some(slot)
    }

    fn check_normal_view(&self, view: u64) -> Result<(), BftError> {
        if self.status != Status::Normal || view != self.view {
            return Err(BftError::WrongView {
                view,
                current: self.view,
            });
        }
        Ok(())
    }

    fn has_work(&self) -> bool {
        self.pending
            || self.op_accepted_max > self.commit_op
            || self.refused_op_max > self.commit_op
    }

    fn arm_progress_timer(&mut self, now_us: u64) {
        // Not while fetching state: the replica makes no progress of its own then, and
        // must not blame the leader for it.
        if self.status == Status::Normal
            && self.state_transfer.is_none()
            && self.progress_deadline_us.is_none()
        {
            self.progress_deadline_us = Some(now_us + self.progress_timeout_us());
        }
    }

    /// The progress timeout, doubled per view change and halved per `checkpoint_interval_ops`
    /// ops executed in a normal view since (capped like the view-change timeout). A NewView
    /// does not reset it: a view whose first commit takes longer than the timeout (its
    /// plan's Prepares and Commits, the leader's applying them and its first proposal) would
    /// otherwise be left at the same timeout, and the next one too, without end. Nor does
    /// one op: where commits come further apart than the first timeout (a loaded host, a
    /// slow disk), every view would be left after its first commits.
    fn progress_timeout_us(&self) -> u64 {
        Self::backed_off_us(
            self.config.progress_timeout_us,
            self.view_change_attempts,
            self.progress_timeout_us_max(),
        )
    }

    fn progress_timeout_us_max(&self) -> u64 {
        self.config
            .view_change_timeout_us_max
            .max(self.config.progress_timeout_us)
    }

    /// `executed` ops were just executed: in a normal view (the view works; not ops caught
    /// up from peers' proofs while changing views), every `checkpoint_interval_ops` of them
    /// since the last view change halve the timeouts again, down to the first ones.
    fn backoff_step_down(&mut self, executed: u64) {
        if self.status != Status::Normal || self.view_change_attempts == 0 {
            self.ops_since_backoff_step = 0;
            return;
        }
        self.ops_since_backoff_step += executed;
        let step_ops = self.config.checkpoint_interval_ops;
        while self.ops_since_backoff_step >= step_ops && self.view_change_attempts > 0 {
            self.ops_since_backoff_step -= step_ops;
            self.view_change_attempts -= 1;
        }
    }

    /// The view-change timeout of the current attempt.
    fn view_change_timeout_us(&self) -> u64 {
        Self::backed_off_us(
            self.config.view_change_timeout_us,
            self.view_change_attempts,
            self.config.view_change_timeout_us_max,
        )
    }

    /// `base_us` doubled `attempts` times, at most `max_us`.
    fn backed_off_us(base_us: u64, attempts: u32, max_us: u64) -> u64 {
        base_us.saturating_mul(1 << attempts.min(16)).min(max_us)
    }

    /// The driver has (`true`) or no longer has client work waiting to commit: with work
    /// waiting and no commit progress for `progress_timeout_us`, the leader is suspected.
    pub fn set_pending(&mut self, now_us: u64, pending: bool) {
        self.pending = pending;
        if self.has_work() {
            self.arm_progress_timer(now_us);
        } else {
            self.progress_deadline_us = None;
        }
    }

    /// Leader: proposes `batch` at the next op. Returns the op.
    pub fn propose(
        &mut self,
        now_us: u64,
        batch: Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<u64, BftError> {
        if self.status != Status::Normal || self.leader() != self.config.replica {
            return Err(BftError::NotLeader);
        }
        if batch.is_empty() {
            return Err(BftError::EmptyBatch);
        }
        if batch.len() > self.config.batch_bytes_max {
            return Err(BftError::BatchTooLarge { bytes: batch.len() });
        }
        if self.op_committed(self.next_op) {
            return Err(BftError::NotLeader);
        }
        if !self.is_ready_leader() {
            return Err(BftError::WindowFull);
        }
        let op = self.next_op;
        self.next_op += 1;
        let vote = self.sign(VoteKind::PrePrepare, self.view, op, batch_digest(&batch));
        self.guard_vote(self.view, op, actions);
        actions.push(Action::Broadcast {
            message: Message::PrePrepare {
                vote,
                batch: batch.clone(),
            },
        });
        self.accept_pre_prepare(now_us, vote, batch, actions);
        Ok(op)
    }

    /// A message from replica `from` (the authenticated connection it came on; what is
    /// believed comes from signatures, not from `from`).
    pub fn on_message(
        &mut self,
        now_us: u64,
        from: u8,
        message: Message,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let result = match message {
            Message::PrePrepare { vote, batch } => {
                self.on_pre_prepare(now_us, vote, batch, actions)
            }
            Message::Prepare { vote, pre_prepare } => {
                self.on_prepare(now_us, vote, pre_prepare, actions)
            }
            Message::Commit(vote) => self.on_commit(now_us, vote, actions),
            Message::Checkpoint(vote) => self.on_checkpoint(now_us, vote, actions),
            Message::ViewChange(view_change) => {
                self.on_view_change(now_us, from, *view_change, actions)
            }
            Message::NewView(new_view) => self.on_new_view(now_us, *new_view, actions),
            Message::Status {
                view,
                commit_op,
                low,
            } => self.on_status(now_us, from, (view, commit_op, low), actions),
            Message::CommitProof {
                pre_prepare,
                cert,
                batch,
            } => self.on_commit_proof(now_us, pre_prepare, cert, batch, actions),
            Message::CheckpointProof(cert) => self.on_checkpoint_proof(now_us, cert, actions),
            Message::StateRequest { from_op, to_op } => {
                self.on_state_request(now_us, from, (from_op, to_op), actions)
            }
            Message::StateOps(ops) => self.on_state_ops(now_us, ops, actions),
            Message::StateCheckpoint { vote, statement } => {
                self.on_state_checkpoint(now_us, vote, statement, actions)
            }
            Message::StateSnapshot(cert) => self.on_state_snapshot(from, cert, actions),
            // File transfer between drivers: never handed to the core.
            Message::SnapshotRequest { .. } | Message::SnapshotChunk { .. } => Err(
                BftError::WrongSender("a driver's snapshot transfer message"),
            ),
        };
        let heard = !matches!(
            result,
            Err(BftError::BadSignature { .. } | BftError::UnknownSigner(_))
        );
        if heard
            && from != self.config.replica
            && let Some(peer) = self.peers_heard.get_mut(usize::from(from))
        {
            *peer = true;
        }
        if let Err(error) = &result {
            self.count_error(error);
        }
        result
    }

    /// Whether this replica may suspect its leader when its progress timer fires. Not
    /// before it has heard from `f + 1` peers since it started (a restarted replica has
    /// client work before its peers have redialled it: alone, it would move to the next
    /// view by itself and stop voting until the group follows), nor while it catches up
    /// (a state transfer, or `f + 1` peers, so at least one correct, report commits it
    /// has not executed: their proofs, not a new leader, bring its progress).
    fn may_suspect_leader(&self) -> bool {
        let weak_quorum = self.committee.weak_quorum();
        let heard = self.peers_heard.iter().filter(|heard| **heard).count();
        let ahead = self
            .peer_commit_op
            .iter()
            .filter(|op| **op > self.commit_op)
            .count();
        heard >= weak_quorum && self.state_transfer.is_none() && ahead < weak_quorum
    }

    fn count_error(&mut self, error: &BftError) {
        let metrics = &mut self.metrics;
        match error {
            BftError::BadSignature { .. } => metrics.bad_signatures += 1,
            BftError::UnknownSigner(_) => metrics.unknown_signers += 1,
            BftError::WrongView { .. } => metrics.wrong_view += 1,
            BftError::OutOfWindow { .. } => metrics.out_of_window += 1,
            BftError::ServeBudgetExhausted { .. } => metrics.state_serves_refused += 1,
            BftError::Stale | BftError::Equivocation(_) => {}
            _ => metrics.invalid += 1,
        }
    }

    fn on_pre_prepare(
        &mut self,
        now_us: u64,
        vote: Vote,
        batch: Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if vote.kind != VoteKind::PrePrepare || vote.replica != self.committee.leader_of(vote.view)
        {
            return Err(BftError::WrongSender(
                "proposal not signed by the view's leader",
            ));
        }
        self.check_normal_view(vote.view)?;
        self.check_window(vote.op)?;
        if batch.len() > self.config.batch_bytes_max {
            return Err(BftError::BatchTooLarge { bytes: batch.len() });
        }
        self.committee.verify_vote(&vote)?;
        if batch_digest(&batch) != vote.digest {
            return Err(BftError::BatchDigestMismatch { op: vote.op });
        }
        if vote.replica == self.config.replica {
            return Err(BftError::Stale);
        }
        let slot = self.slot_mut(vote.op);
        if let Some(refused) = slot.refused.filter(|refused| refused.view == vote.view) {
            if refused.digest == vote.digest {
                return Err(BftError::Stale);
            }
            // Two validly signed proposals for one op, whatever their batches hold.
            self.record_evidence(now_us, refused, vote, actions);
            return Err(BftError::Equivocation(vote.replica));
        }
        if let Some(held) = slot.pre_prepare.filter(|held| held.view == vote.view) {
            if held.digest == vote.digest {
                return Err(BftError::Stale);
            }
            self.record_evidence(now_us, held, vote, actions);
            return Err(BftError::Equivocation(vote.replica));
        }
        if slot
            .committed
            .as_ref()
            .is_some_and(|record| record.pre_prepare.digest != vote.digest)
            || slot.executed.is_some_and(|digest| digest != vote.digest)
        {
            return Err(BftError::InvalidCertificate(
                "proposal conflicts with a committed op",
            ));
        }
        // A backup votes only for batches whose every request a client signed.
        if let Err(error) = self.check_proposal(vote.op, &batch, &vote.digest) {
            self.slot_mut(vote.op).refused = Some(vote);
            self.arm_progress_timer(now_us);
            return Err(error);
        }
        self.accept_pre_prepare(now_us, vote, batch, actions);
        Ok(())
    }

    /// Takes a verified proposal of the current view into its slot; a backup signs and
    /// sends its Prepare.
    fn accept_pre_prepare(
        &mut self,
        now_us: u64,
        vote: Vote,
        batch: Vec<u8>,
        actions: &mut Vec<Action>,
    ) {
        debug_assert_eq!(vote.view, self.view);
        debug_assert_eq!(batch_digest(&batch), vote.digest);
        let replica = usize::from(self.config.replica);
        let is_leader = vote.replica == self.config.replica;
        // After a restart, a backup keeps proposals it may have voted on before but signs
        // nothing for them (its peers' votes can still prepare and commit them here).
        let prepare = (!is_leader && self.vote_allowed(vote.view, vote.op))
            .then(|| self.sign(VoteKind::Prepare, vote.view, vote.op, vote.digest));
        if prepare.is_some() {
            self.guard_vote(vote.view, vote.op, actions);
        }
        let slot = self.slot_mut(vote.op);
        slot.votes_for(vote.view);
        slot.pre_prepare = Some(vote);
        slot.batch = batch;
        if let Some(prepare) = prepare {
            slot.prepares[replica] = Some((prepare, vote));
            actions.push(Action::Broadcast {
                message: Message::Prepare {
                    vote: prepare,
                    pre_prepare: vote,
                },
            });
        }
        // Prepares that arrived first and carried a different proposal convict the leader.
        let headers: Vec<Vote> = slot
            .prepares
            .iter()
            .flatten()
            .filter(|(_, header)| header.digest != vote.digest)
            .map(|(_, header)| *header)
            .collect();
        for header in headers {
            self.check_foreign_proposal(now_us, header, actions);
        }
        self.op_accepted_max = self.op_accepted_max.max(vote.op);
        self.arm_progress_timer(now_us);
        self.try_prepare(now_us, vote.op, actions);
    }

    fn on_prepare(
        &mut self,
        now_us: u64,
        vote: Vote,
        header: Vote,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if vote.kind != VoteKind::Prepare || vote.replica == self.committee.leader_of(vote.view) {
            return Err(BftError::WrongSender("prepare not from a backup"));
        }
        self.check_normal_view(vote.view)?;
        self.check_window(vote.op)?;
        self.committee.verify_vote(&vote)?;
        let replica = usize::from(vote.replica);
        let slot = self.slot_mut(vote.op);
        slot.votes_for(vote.view);
        match slot.prepares.get(replica).copied().flatten() {
            Some((held, _)) if held.digest == vote.digest => return Err(BftError::Stale),
            Some((held, _)) => {
                self.record_evidence(now_us, held, vote, actions);
                return Err(BftError::Equivocation(vote.replica));
            }
            None => slot.prepares[replica] = Some((vote, header)),
        }
        let ours = slot.pre_prepare.filter(|held| held.view == vote.view);
        if ours.is_some_and(|held| held.digest != vote.digest) {
            self.check_foreign_proposal(now_us, header, actions);
        }
        self.try_prepare(now_us, vote.op, actions);
        Ok(())
    }

    /// A proposal someone else accepted (a Prepare's header, a certificate's proposal): if
    /// it is validly signed and conflicts with the one this replica holds for the same
    /// `(view, op)`, the leader equivocated.
    fn check_foreign_proposal(&mut self, now_us: u64, header: Vote, actions: &mut Vec<Action>) {
        if header.kind != VoteKind::PrePrepare || self.check_window(header.op).is_err() {
            return;
        }
        // A proposal this replica refused to vote for is still the leader's signed word.
        let Some(held) = self.slot(header.op).and_then(|slot| {
            [slot.pre_prepare, slot.refused]
                .into_iter()
                .flatten()
                .find(|held| held.same_slot(&header))
        }) else {
            return;
        };
        if held.same_slot(&header)
            && held.digest != header.digest
            && self.committee.verify_vote(&header).is_ok()
        {
            self.record_evidence(now_us, held, header, actions);
        }
    }

    fn record_evidence(
        &mut self,
        now_us: u64,
        first: Vote,
        second: Vote,
        actions: &mut Vec<Action>,
    ) {
        debug_assert!(first.same_slot(&second) && first.digest != second.digest);
        let known = self
            .evidence
            .iter()
            .any(|evidence| evidence.first.same_slot(&first));
        if known {
            return;
        }
        self.metrics.equivocations += 1;
        if self.evidence.len() < EVIDENCE_KEPT_MAX {
            self.evidence.push(Evidence { first, second });
        }
        // An equivocating leader of the current view is replaced at once.
        let offender = first.replica;
        if first.kind == VoteKind::PrePrepare
            && first.view == self.view
            && offender == self.leader()
            && self.status == Status::Normal
        {
            self.start_view_change(now_us, self.view + 1, actions);
        }
    }

    fn try_prepare(&mut self, now_us: u64, op: u64, actions: &mut Vec<Action>) {
        let view = self.view;
        let needed = self.prepares_needed();
        let Some(slot) = self.slot(op) else { return };
        let Some(head) = slot.pre_prepare.filter(|head| head.view == view) else {
            return;
        };
        if slot.prepared_in(view).is_some() || slot.votes_view != view {
            return;
        }
        let prepares: Vec<Vote> = slot
            .prepares
            .iter()
            .flatten()
            .map(|(vote, _)| *vote)
            .filter(|vote| vote.digest == head.digest)
            .take(needed)
            .collect();
        if prepares.len() < needed {
            return;
        }
        let commit = self
            .vote_allowed(view, op)
            .then(|| self.sign(VoteKind::Commit, view, op, head.digest));
        if commit.is_some() {
            self.guard_vote(view, op, actions);
        }
        let replica = usize::from(self.config.replica);
        let slot = self.slot_mut(op);
        let entry = PreparedEntry {
            cert: PreparedCert {
                pre_prepare: head,
                prepares,
            },
            batch: slot.batch.clone(),
        };
        slot.prepared = Some(entry.clone());
        if let Some(commit) = commit {
            // Durable before the Commit leaves (the driver holds it until then).
            actions.push(Action::PersistPrepared { entry });
            let slot = self.slot_mut(op);
            slot.commits[replica] = Some(commit);
            actions.push(Action::Broadcast {
                message: Message::Commit(commit),
            });
        }
        self.try_commit(now_us, op, actions);
    }

    fn on_commit(
        &mut self,
        now_us: u64,
        vote: Vote,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if vote.kind != VoteKind::Commit {
            return Err(BftError::WrongSender("not a commit"));
        }
        self.check_normal_view(vote.view)?;
        self.check_window(vote.op)?;
        self.committee.verify_vote(&vote)?;
        let slot = self.slot_mut(vote.op);
        slot.votes_for(vote.view);
        let replica = usize::from(vote.replica);
        match slot.commits.get(replica).copied().flatten() {
            Some(held) if held.digest == vote.digest => return Err(BftError::Stale),
            Some(held) => {
                self.record_evidence(now_us, held, vote, actions);
                return Err(BftError::Equivocation(vote.replica));
            }
            None => slot.commits[replica] = Some(vote),
        }
        self.try_commit(now_us, vote.op, actions);
        Ok(())
    }

    fn try_commit(&mut self, now_us: u64, op: u64, actions: &mut Vec<Action>) {
        let view = self.view;
        let needed = self.commits_needed();
        let Some(slot) = self.slot(op) else { return };
        let Some(digest) = slot.prepared_in(view) else {
            return;
        };
        if slot.committed.is_some() || slot.votes_view != view {
            return;
        }
        let commits: Vec<Vote> = slot
            .commits
            .iter()
            .flatten()
            .copied()
            .filter(|vote| vote.digest == digest)
            .collect();
        if commits.len() < needed {
            return;
        }
        let pre_prepare = slot
            .prepared
            .as_ref()
            .map(|entry| entry.cert.pre_prepare)
            .expect("prepared_in checked it");
        let batch = slot
            .prepared
            .as_ref()
            .map(|entry| entry.batch.clone())
            .unwrap_or_default();
        let slot = self.slot_mut(op);
        slot.batch = batch;
        slot.committed = Some(CommitRecord {
            pre_prepare,
            cert: CommitCert { commits },
        });
        self.execute(now_us, actions);
    }

    /// Hands every committed op after `commit_op` to the driver, in order; signs a
    /// checkpoint at every `checkpoint_interval_ops`.
    fn execute(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let mut progressed = false;
        let mut executed = 0;
        while self.state_transfer.is_none() {
            let op = self.commit_op + 1;
            if self.check_window(op).is_err() {
                break;
            }
            // Behind a disk that lags, hand over no more than the driver may hold
            // undurable; `on_durable` goes on from here.
            if self.config.durability_reported
                && op
                    > self
                        .durable_op
                        .saturating_add(self.config.commits_undurable_ops_max)
            {
                self.metrics.commits_held_for_durability += 1;
                break;
            }
            let Some(slot) = self.slot(op) else { break };
            let Some(record) = &slot.committed else { break };
            let (view, _, digest) = record
                .cert
                .statement()
                .expect("a commit certificate has votes");
            let batch = slot.batch.clone();
            let cert = record.cert.clone();
            debug_assert_eq!(batch_digest(&batch), digest);
            let chain = chain_digest(&self.commit_chain, op, &digest);
            let slot = self.slot_mut(op);
            slot.chain = Some(chain);
            slot.executed = Some(digest);
            self.commit_op = op;
            self.commit_chain = chain;
            self.metrics.ops_committed += 1;
            progressed = true;
            executed += 1;
            actions.push(Action::Commit {
                op,
                view,
                digest,
                batch,
                cert,
            });
            // A checkpoint vote says this state is held: with durability reported, only
            // once it is on disk (`on_durable`).
            if op.is_multiple_of(self.config.checkpoint_interval_ops)
                && (!self.config.durability_reported || op <= self.durable_op)
            {
                self.sign_checkpoint(now_us, op, chain, actions);
            }
        }
        self.next_op = self.next_op.max(self.commit_op + 1);
        if progressed {
            self.backoff_step_down(executed);
            self.progress_deadline_us = None;
            if self.has_work() {
                self.arm_progress_timer(now_us);
            }
        }
        if let Some(cert) = self.stable_ahead.take() {
            if cert.op() <= self.commit_op {
                self.adopt_stable(cert);
            } else {
                self.stable_ahead = Some(cert);
            }
        }
    }

    fn on_checkpoint(
        &mut self,
        now_us: u64,
        vote: Vote,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if vote.kind != VoteKind::Checkpoint
            || vote.view != 0
            || !vote.op.is_multiple_of(self.config.checkpoint_interval_ops)
        {
            return Err(BftError::WrongSender("not a checkpoint"));
        }
        if vote.op <= self.low {
            return Err(BftError::Stale);
        }
        self.committee.verify_vote(&vote)?;
        self.record_checkpoint_vote(now_us, vote, actions)
    }

    /// Keeps a verified checkpoint vote (at most a few per replica, the highest ops) and
    /// checks whether its `(op, digest)` became stable.
    fn record_checkpoint_vote(
        &mut self,
        now_us: u64,
        vote: Vote,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let kept = &self.checkpoint_votes[usize::from(vote.replica)];
        let index = match keep_vote(kept, &vote, |held| held) {
            Keep::Slot(index) => index,
            Keep::Stale => return Err(BftError::Stale),
            Keep::Conflict(held) => {
                self.record_evidence(now_us, held, vote, actions);
                return Err(BftError::Equivocation(vote.replica));
            }
        };
        self.checkpoint_votes[usize::from(vote.replica)][index] = Some(vote);
        let votes: Vec<Vote> = self
            .checkpoint_votes
            .iter()
            .flat_map(|kept| kept.iter().flatten())
            .filter(|held| held.op == vote.op && held.digest == vote.digest)
            .copied()
            .collect();
        if votes.len() >= self.committee.quorum() {
            let cert = CheckpointCert { votes };
            if cert.op() <= self.commit_op {
                self.adopt_stable(cert);
            } else if self
                .stable_ahead
                .as_ref()
                .is_none_or(|ahead| ahead.op() < cert.op())
            {
                self.stable_ahead = Some(cert);
            }
        }
        Ok(())
    }

    /// Moves the low watermark to `cert` (at or below `commit_op`, matching this replica's
    /// chain): slots at or below it are forgotten.
    fn adopt_stable(&mut self, cert: CheckpointCert) {
        let op = cert.op();
        if op <= self.low || op > self.commit_op {
            return;
        }
        let ours = if op == self.commit_op {
            Some(self.commit_chain)
        } else {
            self.slot(op).and_then(|slot| slot.chain)
        };
        if ours != Some(cert.digest()) {
            // A certified log that differs from ours: only possible past f faults.
            self.metrics.invalid += 1;
            return;
        }
        self.low = op;
        self.low_cert = Some(cert);
        self.metrics.checkpoints_stable += 1;
        for kept in &mut self.checkpoint_votes {
            for entry in kept.iter_mut() {
                if entry.is_some_and(|held| held.op <= op) {
                    *entry = None;
                }
            }
        }
    }

    fn on_checkpoint_proof(
        &mut self,
        now_us: u64,
        cert: CheckpointCert,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if cert.op() <= self.low {
            return Err(BftError::Stale);
        }
        self.committee.verify_checkpoint(&cert)?;
        if cert.op() <= self.commit_op {
            self.adopt_stable(cert);
            return Ok(());
        }
        self.request_state_transfer(now_us, cert, actions);
        Ok(())
    }

    /// Sets (or raises) the checkpoint a state transfer must reach and, unless one is
    /// under way, asks a peer for the first ops.
    fn request_state_transfer(
        &mut self,
        now_us: u64,
        cert: CheckpointCert,
        actions: &mut Vec<Action>,
    ) {
        debug_assert!(cert.op() > self.commit_op);
        if self
            .state_transfer
            .as_ref()
            .is_some_and(|asked| asked.op() >= cert.op())
        {
            return;
        }
        let under_way = self.state_transfer.is_some();
        self.progress_deadline_us = None;
        self.metrics.state_transfers += 1;
        self.state_transfer = Some(cert.clone());
        actions.push(Action::StateTransfer { cert });
        if !under_way {
            self.request_state_ops(now_us, actions);
        }
    }

    /// Asks the current transfer peer for the next committed ops toward the target (at
    /// most `catchup_ops_max`), and arms the retry timer.
    fn request_state_ops(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let Some(target) = self.state_transfer.as_ref().map(CheckpointCert::op) else {
            return;
        };
        debug_assert!(self.commit_op < target);
        debug_assert_ne!(self.transfer_peer, self.config.replica);
        let from_op = self.commit_op + 1;
        let to_op = target.min(self.commit_op + self.config.catchup_ops_max);
        self.metrics.state_requests += 1;
        actions.push(Action::Send {
            to: self.transfer_peer,
            message: Message::StateRequest { from_op, to_op },
        });
        self.transfer_retry_at_us = Some(now_us + self.config.state_transfer_retry_us);
    }

    /// The retry timer of a state transfer fired: ask the next peer (once the ops already
    /// received are durable here, when durability is reported).
    fn state_transfer_retry(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.state_transfer.is_none() || self.snapshot_fetch.is_some() {
            self.transfer_retry_at_us = None;
            return;
        }
        if self.config.durability_reported && self.durable_op < self.commit_op {
            self.transfer_retry_at_us = Some(now_us + self.config.state_transfer_retry_us);
            return;
        }
        let replica_count = self.committee.replica_count();
        self.transfer_peer = (self.transfer_peer + 1) % replica_count;
        if self.transfer_peer == self.config.replica {
            self.transfer_peer = (self.transfer_peer + 1) % replica_count;
        }
        self.request_state_ops(now_us, actions);
    }

    /// A peer asks for committed ops: the driver serves those durable here, at most
    /// `catchup_ops_max` of them, from its journals ([`Action::ServeState`]), if the peer's
    /// serve budget holds them (else nothing is served: an authenticated peer cannot make
    /// this replica read and send its log faster than `state_serve_ops_per_s`).
    fn on_state_request(
        &mut self,
        now_us: u64,
        from: u8,
        (from_op, to_op): (u64, u64),
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if from == self.config.replica || from >= self.committee.replica_count() {
            return Err(BftError::UnknownSigner(from));
        }
        let held = if self.config.durability_reported {
            self.durable_op
        } else {
            self.commit_op
        };
        if from_op == 0 || from_op > to_op || from_op > held {
            return Err(BftError::Stale);
        }
        let to_op = to_op
            .min(held)
            .min(from_op.saturating_add(self.config.catchup_ops_max - 1));
        let ops = to_op - from_op + 1;
        let rate = (
            self.config.state_serve_ops_per_s,
            self.config.serve_budget_ops(),
        );
        if !self.serve_budgets[usize::from(from)].try_spend(now_us, ops, rate) {
            return Err(BftError::ServeBudgetExhausted { peer: from, ops });
        }
        actions.push(Action::ServeState {
            to: from,
            from_op,
            to_op,
        });
        Ok(())
    }

    /// A peer's answer to a `StateRequest`: each op after `commit_op`, in order, is
    /// executed once its commit certificate (`quorum` Commits for the batch's digest) is
    /// verified — that alone proves it committed, whoever relays it. Reaching the target,
    /// the chain digest must be the checkpoint certificate's; the low watermark moves
    /// there and normal execution resumes.
    fn on_state_ops(
        &mut self,
        now_us: u64,
        ops: Vec<(CommitCert, Vec<u8>)>,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let Some(target) = self.state_transfer.as_ref().map(CheckpointCert::op) else {
            return self.on_catchup_ops(now_us, ops, actions);
        };
        if self.snapshot_fetch.is_some() {
            return Err(BftError::Stale);
        }
        let commit_op_before = self.commit_op;
        let next = |replica: &Self, op: u64| {
            if op != replica.commit_op + 1 || op > target {
                return Err(BftError::InvalidCertificate("state ops out of order"));
            }
            Ok(())
        };
        let mut result = self.execute_relayed(now_us, ops, next, actions);
        if self.commit_op == target {
            self.finish_state_transfer(now_us, actions);
        } else if self.commit_op > commit_op_before {
            if !self.config.durability_reported {
                self.request_state_ops(now_us, actions);
            }
        } else if result.is_ok() {
            result = Err(BftError::Stale);
        }
        result
    }

    /// Executes relayed committed ops (state transfer or catch-up) in order, skipping those
    /// already executed; stops at the first that `next` refuses (it must be `commit_op + 1`,
    /// and whatever else the caller requires) or whose certificate or batch does not check.
    fn execute_relayed(
        &mut self,
        now_us: u64,
        ops: Vec<(CommitCert, Vec<u8>)>,
        next: impl Fn(&Self, u64) -> Result<(), BftError>,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        for (cert, batch) in ops {
            let Some((view, op, digest)) = cert.statement() else {
                return Err(BftError::InvalidCertificate("empty commit certificate"));
            };
            if op <= self.commit_op {
                continue;
            }
            next(self, op)?;
            self.check_relayed_op(op, &batch, digest, &cert)?;
            self.execute_transferred(now_us, (op, view, digest), batch, cert, actions);
        }
        Ok(())
    }

    /// A committed op relayed by a peer (state transfer or catch-up): its batch hashes to
    /// the certificate's digest, and the certificate holds `q` valid Commits.
    fn check_relayed_op(
        &self,
        op: u64,
        batch: &[u8],
        digest: Digest,
        cert: &CommitCert,
    ) -> Result<(), BftError> {
        if batch_digest(batch) != digest {
            return Err(BftError::BatchDigestMismatch { op });
        }
        self.committee.verify_commit(cert, self.commits_needed())
    }

    /// `StateOps` outside a state transfer: a peer served ops it restored from its journal
    /// in answer to this replica's `Status` ([`Self::serve_catchup`]). Believed as a
    /// `CommitProof` is, op by op: the next op (`commit_op + 1`), inside the window, whose
    /// batch hashes to the digest of a commit certificate holding `q` valid Commits — the
    /// committed predicate, whoever relays it. Ops past the window come by state transfer
    /// once a stable checkpoint covers them.
    fn on_catchup_ops(
        &mut self,
        now_us: u64,
        ops: Vec<(CommitCert, Vec<u8>)>,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let commit_op_before = self.commit_op;
        let next = |replica: &Self, op: u64| {
            if op != replica.commit_op + 1 {
                return Err(BftError::InvalidCertificate("catch-up ops out of order"));
            }
            replica.check_window(op)
        };
        let result = self.execute_relayed(now_us, ops, next, actions);
        self.metrics.catchup_ops_applied += self.commit_op - commit_op_before;
        if self.commit_op == commit_op_before {
            return result.and(Err(BftError::Stale));
        }
        self.next_op = self.next_op.max(self.commit_op + 1);
        self.op_accepted_max = self.op_accepted_max.max(self.commit_op);
        self.progress_deadline_us = None;
        if self.has_work() {
            self.arm_progress_timer(now_us);
        }
        // Ops above, committed here from their votes or proofs, execute now.
        self.execute(now_us, actions);
        result
    }

    /// Executes op `commit_op + 1`, fetched by state transfer with a verified certificate.
    fn execute_transferred(
        &mut self,
        now_us: u64,
        (op, view, digest): (u64, u64, Digest),
        batch: Vec<u8>,
        cert: CommitCert,
        actions: &mut Vec<Action>,
    ) {
        debug_assert_eq!(op, self.commit_op + 1);
        debug_assert_eq!(batch_digest(&batch), digest);
        let chain = chain_digest(&self.commit_chain, op, &digest);
        let in_window = self.check_window(op).is_ok();
        if in_window {
            let slot = self.slot_mut(op);
            slot.chain = Some(chain);
            slot.executed = Some(digest);
        }
        self.commit_op = op;
        self.commit_chain = chain;
        self.metrics.ops_committed += 1;
        self.metrics.state_ops_applied += 1;
        actions.push(Action::Commit {
            op,
            view,
            digest,
            batch,
            cert,
        });
        if in_window
            && op.is_multiple_of(self.config.checkpoint_interval_ops)
            && (!self.config.durability_reported || op <= self.durable_op)
        {
            self.sign_checkpoint(now_us, op, chain, actions);
        }
    }

    /// The transferred log reached the target checkpoint: adopt it as the low watermark
    /// (its certificate must match the chain) and resume normal execution.
    fn finish_state_transfer(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        let Some(cert) = self.state_transfer.take() else {
            return;
        };
        debug_assert_eq!(cert.op(), self.commit_op);
        self.transfer_retry_at_us = None;
        if self.commit_chain != cert.digest() {
            // Every op carried `quorum` Commits, yet the chain is not the certified one:
            // only possible past f faults. Counted; the window stays put.
            self.metrics.invalid += 1;
            self.metrics.state_transfers_mismatched += 1;
            return;
        }
        // Our own checkpoint vote at the target may already have made it stable here.
        self.adopt_stable(cert);
        debug_assert_eq!(self.low, self.commit_op);
        self.metrics.state_transfers_completed += 1;
        self.next_op = self.next_op.max(self.commit_op + 1);
        self.op_accepted_max = self.op_accepted_max.max(self.commit_op);
        if self
            .stable_ahead
            .as_ref()
            .is_some_and(|ahead| ahead.op() <= self.commit_op)
        {
            self.stable_ahead = None;
        }
        self.progress_deadline_us = None;
        if self.has_work() {
            self.arm_progress_timer(now_us);
        }
        self.execute(now_us, actions);
    }

    /// The driver installed the committed log through `op`, whose chain digest is `chain`
    /// (it must be the requested checkpoint's).
    pub fn on_state_transferred(
        &mut self,
        now_us: u64,
        op: u64,
        chain: Digest,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let Some(cert) = self.state_transfer.take() else {
            return Err(BftError::Stale);
        };
        self.transfer_retry_at_us = None;
        if cert.op() != op || cert.digest() != chain {
            self.state_transfer = Some(cert);
            return Err(BftError::InvalidCertificate(
                "state does not match the checkpoint",
            ));
        }
        if op <= self.commit_op {
            self.adopt_stable(cert);
            self.execute(now_us, actions);
            return Ok(());
        }
        self.commit_op = op;
        self.commit_chain = chain;
        self.low = op;
        self.low_cert = Some(cert);
        self.next_op = self.next_op.max(op + 1);
        self.op_accepted_max = self.op_accepted_max.max(op);
        if self
            .stable_ahead
            .as_ref()
            .is_some_and(|ahead| ahead.op() <= op)
        {
            self.stable_ahead = None;
        }
        self.execute(now_us, actions);
        Ok(())
    }

    /// The driver could not fetch the state: the next `CheckpointProof` asks again.
    pub fn on_state_transfer_failed(&mut self) {
        self.state_transfer = None;
        self.transfer_retry_at_us = None;
        self.snapshot_fetch = None;
    }

    fn on_state_checkpoint(
        &mut self,
        now_us: u64,
        vote: Vote,
        statement: SnapshotStatement,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if vote.kind != VoteKind::StateCheckpoint
            || vote.view != 0
            || vote.op != statement.op
            || vote.digest != statement.digest()
        {
            return Err(BftError::WrongSender("not a state checkpoint"));
        }
        if vote.op <= self.state_cert_op() {
            return Err(BftError::Stale);
        }
        self.committee.verify_vote(&vote)?;
        self.record_state_vote(now_us, vote, statement, actions)
    }

    /// Keeps a verified state vote (the highest few per replica) and checks whether its
    /// statement is certified. Two different statements signed by one replica for one op
    /// are evidence.
    fn record_state_vote(
        &mut self,
        now_us: u64,
        vote: Vote,
        statement: SnapshotStatement,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        debug_assert_eq!(vote.digest, statement.digest());
        let kept = &self.state_votes[usize::from(vote.replica)];
        let index = match keep_vote(kept, &vote, |(held, _)| held) {
            Keep::Slot(index) => index,
            Keep::Stale => return Err(BftError::Stale),
            Keep::Conflict(held) => {
                self.record_evidence(now_us, held, vote, actions);
                return Err(BftError::Equivocation(vote.replica));
            }
        };
        self.state_votes[usize::from(vote.replica)][index] = Some((vote, statement));
        let votes: Vec<Vote> = self
            .state_votes
            .iter()
            .flat_map(|kept| kept.iter().flatten())
            .filter(|(held, _)| held.op == vote.op && held.digest == vote.digest)
            .map(|(held, _)| *held)
            .collect();
        if votes.len() >= self.committee.quorum() {
            self.metrics.state_certs += 1;
            self.state_cert = Some(StateCert { statement, votes });
            for kept in &mut self.state_votes {
                for entry in kept.iter_mut() {
                    if entry.is_some_and(|(held, _)| held.op <= vote.op) {
                        *entry = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// A peer answered a `StateRequest` with a state certificate instead of ops: it no
    /// longer holds them in its log. If the certificate is valid and skips ops this
    /// transfer needs, the driver fetches and verifies the snapshot.
    fn on_state_snapshot(
        &mut self,
        from: u8,
        cert: StateCert,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let Some(target) = self.state_transfer.as_ref().map(CheckpointCert::op) else {
            return Err(BftError::Stale);
        };
        if self.snapshot_fetch.is_some() || cert.op() <= self.commit_op || cert.op() > target {
            return Err(BftError::Stale);
        }
        if from == self.config.replica || from >= self.committee.replica_count() {
            return Err(BftError::UnknownSigner(from));
        }
        self.committee.verify_state(&cert)?;
        if cert.op() > self.state_cert_op() {
            self.state_cert = Some(cert.clone());
        }
        self.metrics.snapshot_fetches += 1;
        self.snapshot_fetch = Some(cert.op());
        // The driver reports the outcome; it has its own timeouts.
        self.transfer_retry_at_us = None;
        actions.push(Action::FetchSnapshot { from, cert });
        Ok(())
    }

    /// The driver installed the snapshot of [`Action::FetchSnapshot`]: its restored state
    /// had the certified digest and is durable. The log continues from the snapshot's op
    /// (its certified chain digest); the rest of the transfer goes by log.
    pub fn on_snapshot_installed(
        &mut self,
        now_us: u64,
        statement: &SnapshotStatement,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        if self.snapshot_fetch != Some(statement.op) || self.state_transfer.is_none() {
            return Err(BftError::Stale);
        }
        debug_assert!(statement.op > self.commit_op);
        self.snapshot_fetch = None;
        self.metrics.snapshot_installs += 1;
        self.commit_op = statement.op;
        self.commit_chain = statement.chain;
        self.durable_op = statement.op;
        self.next_op = self.next_op.max(statement.op + 1);
        self.op_accepted_max = self.op_accepted_max.max(statement.op);
        if self
            .state_transfer
            .as_ref()
            .is_some_and(|target| target.op() == self.commit_op)
        {
            self.finish_state_transfer(now_us, actions);
        } else {
            self.request_state_ops(now_us, actions);
        }
        Ok(())
    }

    /// The driver could not fetch or verify the snapshot (a silent peer, or one serving
    /// bytes that are not the certified state): ask the next peer.
    pub fn on_snapshot_failed(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.snapshot_fetch.take().is_none() {
            return;
        }
        self.metrics.snapshot_fetches_failed += 1;
        self.state_transfer_retry(now_us, actions);
    }

    fn on_status(
        &mut self,
        now_us: u64,
        from: u8,
        (view, commit_op, low): (u64, u64, u64),
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let from_index = usize::from(from);
        if from == self.config.replica || from_index >= self.status_answered_us.len() {
            return Err(BftError::UnknownSigner(from));
        }
        self.peer_commit_op[from_index] = commit_op;
        self.peer_view[from_index] = Some(view);
        if now_us < self.status_answered_us[from_index] + self.config.status_interval_us / 2 {
            return Err(BftError::Stale);
        }
        self.status_answered_us[from_index] = now_us;
        if view < self.view
            && let Some(new_view) = &self.new_view
        {
            actions.push(Action::Send {
                to: from,
                message: Message::NewView(Box::new(new_view.clone())),
            });
        }
        // A peer whose stable checkpoint is behind ours gets ours: it moves its window (or,
        // if it has not executed that far, fetches state), else it could not take the
        // proofs of ops above its window.
        if low < self.low
            && let Some(cert) = &self.low_cert
        {
            actions.push(Action::Send {
                to: from,
                message: Message::CheckpointProof(cert.clone()),
            });
        }
        if commit_op >= self.commit_op || commit_op < self.low {
            return Ok(());
        }
        let op_last = self.commit_op.min(commit_op + self.config.catchup_ops_max);
        // Ops executed here whose commit certificate is not in memory (restored from the
        // journal after a restart): the driver serves them from its certificate journal.
        let mut journal_ops: Option<(u64, u64)> = None;
        for op in commit_op + 1..=op_last {
            let held = self
                .slot(op)
                .and_then(|slot| Some((slot, slot.committed.as_ref()?)));
            let Some((slot, record)) = held else {
                journal_ops = Some(journal_ops.map_or((op, op), |(first, _)| (first, op)));
                continue;
            };
            actions.push(Action::Send {
                to: from,
                message: Message::CommitProof {
                    pre_prepare: record.pre_prepare,
                    cert: record.cert.clone(),
                    batch: slot.batch.clone(),
                },
            });
        }
        if let Some((from_op, to_op)) = journal_ops {
            self.serve_catchup(from, from_op, to_op, actions);
        }
        Ok(())
    }

    /// A peer behind this replica needs ops `from_op..=to_op` that this replica executed
    /// but holds no commit certificate for in memory (it restored them from its journal):
    /// its driver sends them from the certificate journal as `StateOps`, each with its
    /// commit certificate, which the peer believes op by op ([`Self::on_state_ops`]).
    /// Without it, after every replica of a group restarted at different commit points,
    /// the ones behind wait for proofs no peer can send. Only ops durable here are served.
    fn serve_catchup(&mut self, to: u8, from_op: u64, to_op: u64, actions: &mut Vec<Action>) {
        debug_assert!(from_op <= to_op && to_op <= self.commit_op);
        let held = if self.config.durability_reported {
            self.durable_op
        } else {
            self.commit_op
        };
        let to_op = to_op.min(held);
        if from_op > to_op {
            return;
        }
        self.metrics.catchup_serves += 1;
        actions.push(Action::ServeState { to, from_op, to_op });
    }

    fn on_commit_proof(
        &mut self,
        now_us: u64,
        pre_prepare: Vote,
        cert: CommitCert,
        batch: Vec<u8>,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let (view, op, digest) = cert
            .statement()
            .ok_or(BftError::InvalidCertificate("empty commit certificate"))?;
        if op <= self.commit_op {
            return Err(BftError::Stale);
        }
        self.check_window(op)?;
        if pre_prepare.kind != VoteKind::PrePrepare
            || pre_prepare.replica != self.committee.leader_of(view)
            || (pre_prepare.view, pre_prepare.op, pre_prepare.digest) != (view, op, digest)
        {
            return Err(BftError::InvalidCertificate(
                "commit proof: proposal does not match",
            ));
        }
        if batch_digest(&batch) != digest {
            return Err(BftError::BatchDigestMismatch { op });
        }
        if self.slot(op).is_some_and(|slot| slot.committed.is_some()) {
            return Err(BftError::Stale);
        }
        self.committee.verify_commit(&cert, self.commits_needed())?;
        self.committee.verify_vote(&pre_prepare)?;
        self.check_foreign_proposal(now_us, pre_prepare, actions);
        let slot = self.slot_mut(op);
        slot.batch = batch;
        if slot.pre_prepare.is_some_and(|held| held.digest != digest) {
            slot.pre_prepare = Some(pre_prepare);
        }
        slot.committed = Some(CommitRecord { pre_prepare, cert });
        self.metrics.commit_proofs_applied += 1;
        self.execute(now_us, actions);
        Ok(())
    }

    /// Leaves the current view for `view` (higher): signs and sends a view change with the
    /// stable checkpoint and every prepared certificate above it.
    fn start_view_change(&mut self, now_us: u64, view: u64, actions: &mut Vec<Action>) {
        debug_assert!(view > self.view);
        self.view = view;
        self.status = Status::ViewChange;
        self.new_view = None;
        self.awaiting_new_view = false;
        self.progress_deadline_us = None;
        self.metrics.view_changes += 1;
        let timeout = self.view_change_timeout_us();
        // Past both caps, a further attempt would only make the way back down longer.
        if timeout < self.config.view_change_timeout_us_max
            || self.progress_timeout_us() < self.progress_timeout_us_max()
        {
            self.view_change_attempts += 1;
        }
        self.ops_since_backoff_step = 0;
        self.view_change_deadline_us = Some(now_us + timeout);
        let view_change = self.build_view_change();
        self.view_changes[usize::from(self.config.replica)] = Some(view_change.clone());
        self.guard_view_change(view, actions);
        actions.push(Action::Broadcast {
            message: Message::ViewChange(Box::new(view_change)),
        });
        self.try_new_view(now_us, actions);
    }

    fn build_view_change(&self) -> ViewChange {
        let prepared: Vec<PreparedEntry> = (self.low + 1..=self.low + self.config.log_window_ops)
            .filter_map(|op| self.slot(op).and_then(|slot| slot.prepared.clone()))
            .collect();
        let mut view_change = ViewChange {
            vote: self.sign(VoteKind::ViewChange, self.view, self.low, [0; 32]),
            checkpoint: self.low_cert.clone(),
            prepared,
        };
        let digest = view_change.content_digest();
        view_change.vote = self.sign(VoteKind::ViewChange, self.view, self.low, digest);
        view_change
    }

    fn on_view_change(
        &mut self,
        now_us: u64,
        from: u8,
        view_change: ViewChange,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let view = view_change.vote.view;
        let sender = view_change.vote.replica;
        if view < self.view || sender == self.config.replica {
            return Err(BftError::Stale);
        }
        if view == self.view && self.status == Status::Normal {
            // A replica still changing into the view this one already runs: help it. Nothing
            // of the message is verified yet, so the answer goes to the connection's
            // authenticated sender, never to the signer index the message names (a forged
            // index would address a replica that does not exist, or make this one send its
            // NewView, up to a whole message's size, to a replica that did not ask), and at
            // most once per half status interval per peer, as Status answers are.
            let from_index = usize::from(from);
            if sender != from
                || from_index >= self.status_answered_us.len()
                || now_us < self.status_answered_us[from_index] + self.config.status_interval_us / 2
            {
                return Err(BftError::Stale);
            }
            if let Some(new_view) = &self.new_view {
                self.status_answered_us[from_index] = now_us;
                actions.push(Action::Send {
                    to: from,
                    message: Message::NewView(Box::new(new_view.clone())),
                });
            }
            return Err(BftError::Stale);
        }
        if view > self.view + VIEW_AHEAD_MAX {
            return Err(BftError::WrongView {
                view,
                current: self.view,
            });
        }
        let held = self
            .view_changes
            .get(usize::from(sender))
            .ok_or(BftError::UnknownSigner(sender))?;
        if held.as_ref().is_some_and(|held| held.vote.view >= view) {
            return Err(BftError::Stale);
        }
        self.committee.verify_view_change(
            &view_change,
            self.prepares_needed(),
            self.config.log_window_ops,
        )?;
        for entry in &view_change.prepared {
            self.check_foreign_proposal(now_us, entry.cert.pre_prepare, actions);
        }
        self.view_changes[usize::from(sender)] = Some(view_change);
        // f + 1 replicas ask for later views: at least one correct does; join the smallest.
        let later: Vec<u64> = self
            .view_changes
            .iter()
            .flatten()
            .map(|held| held.vote.view)
            .filter(|held| *held > self.view)
            .collect();
        if later.len() >= self.committee.weak_quorum() {
            let view_min = later.iter().copied().min().expect("not empty");
            self.start_view_change(now_us, view_min, actions);
        }
        if self.status == Status::ViewChange && view == self.view {
            self.try_new_view(now_us, actions);
        }
        Ok(())
    }

    /// New leader: with `quorum` view changes for its view, computes the plan, signs its
    /// proposals and starts the view.
    fn try_new_view(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        if self.status != Status::ViewChange || self.leader() != self.config.replica {
            return;
        }
        let view = self.view;
        if self.guard_restored.vote_view >= view {
            // Restarted in a view it may have proposed in: it cannot lead it again.
            return;
        }
        let chosen: Vec<ViewChange> = self
            .view_changes
            .iter()
            .flatten()
            .filter(|held| held.vote.view == view)
            .take(self.committee.quorum())
            .cloned()
            .collect();
        if chosen.len() < self.committee.quorum() {
            return;
        }
        let plan = new_view_plan(&chosen, self.config.bug);
        let pre_prepares = plan
            .entries
            .iter()
            .map(|(op, digest, batch)| {
                (
                    self.sign(VoteKind::PrePrepare, view, *op, *digest),
                    batch.clone(),
                )
            })
            .collect();
        let new_view = NewView {
            view,
            view_changes: chosen,
            pre_prepares,
        };
        let op_last = plan.entries.last().map_or(self.low + 1, |(op, _, _)| *op);
        self.guard_vote(view, op_last, actions);
        actions.push(Action::Broadcast {
            message: Message::NewView(Box::new(new_view.clone())),
        });
        self.install_new_view(now_us, new_view, plan, actions);
    }

    fn on_new_view(
        &mut self,
        now_us: u64,
        new_view: NewView,
        actions: &mut Vec<Action>,
    ) -> Result<(), BftError> {
        let view = new_view.view;
        if view < self.view || (view == self.view && self.status == Status::Normal) {
            return Err(BftError::Stale);
        }
        if view > self.view + VIEW_AHEAD_MAX {
            return Err(BftError::WrongView {
                view,
                current: self.view,
            });
        }
        let plan = self.verify_new_view(&new_view)?;
        for view_change in &new_view.view_changes {
            for entry in &view_change.prepared {
                self.check_foreign_proposal(now_us, entry.cert.pre_prepare, actions);
            }
        }
        self.install_new_view(now_us, new_view, plan, actions);
        Ok(())
    }

    /// Checks a NewView: `quorum` valid view changes for its view from distinct replicas,
    /// and exactly the proposals their plan calls for, signed by the view's leader.
    fn verify_new_view(&self, new_view: &NewView) -> Result<NewViewPlan, BftError> {
        let view = new_view.view;
        let count = new_view.view_changes.len();
        if count < self.committee.quorum() || count > usize::from(self.committee.replica_count()) {
            return Err(BftError::InvalidCertificate(
                "new view: wrong number of view changes",
            ));
        }
        let mut seen = 0u8;
        for view_change in &new_view.view_changes {
            let sender = view_change.vote.replica;
            if view_change.vote.view != view
                || sender >= self.committee.replica_count()
                || seen & (1 << sender) != 0
            {
                return Err(BftError::InvalidCertificate(
                    "new view: view changes do not match",
                ));
            }
            seen |= 1 << sender;
            self.committee.verify_view_change(
                view_change,
                self.prepares_needed(),
                self.config.log_window_ops,
            )?;
        }
        let plan = new_view_plan(&new_view.view_changes, self.config.bug);
        if plan.entries.len() != new_view.pre_prepares.len() {
            return Err(BftError::InvalidCertificate(
                "new view: proposals do not follow the plan",
            ));
        }
        let leader = self.committee.leader_of(view);
        for ((op, digest, _), (vote, batch)) in plan.entries.iter().zip(&new_view.pre_prepares) {
            if vote.kind != VoteKind::PrePrepare
                || vote.replica != leader
                || (vote.view, vote.op, vote.digest) != (view, *op, *digest)
            {
                return Err(BftError::InvalidCertificate(
                    "new view: proposals do not follow the plan",
                ));
            }
            if batch_digest(batch) != *digest {
                return Err(BftError::BatchDigestMismatch { op: *op });
            }
            self.committee.verify_vote(vote)?;
        }
        Ok(plan)
    }

    fn install_new_view(
        &mut self,
        now_us: u64,
        new_view: NewView,
        plan: NewViewPlan,
        actions: &mut Vec<Action>,
    ) {
        self.view = new_view.view;
        self.status = Status::Normal;
        self.awaiting_new_view = false;
        // `view_change_attempts` stays: only ops executed in this view bring it down.
        self.view_change_deadline_us = None;
        self.progress_deadline_us = None;
        self.metrics.new_views += 1;
        for held in &mut self.view_changes {
            if held
                .as_ref()
                .is_some_and(|held| held.vote.view <= new_view.view)
            {
                *held = None;
            }
        }
        if let Some(cert) = plan.checkpoint.filter(|cert| cert.op() > self.low) {
            if cert.op() <= self.commit_op {
                self.adopt_stable(cert);
            } else {
                self.request_state_transfer(now_us, cert, actions);
            }
        }
        let op_max = plan.entries.last().map_or(0, |(op, _, _)| *op);
        self.plan_op_max = op_max;
        self.op_accepted_max = self.commit_op;
        self.refused_op_max = 0;
        let is_leader = self.leader() == self.config.replica;
        for (vote, batch) in &new_view.pre_prepares {
            if self.check_window(vote.op).is_err() {
                continue;
            }
            let slot = self.slot(vote.op);
            let committed = slot.and_then(|slot| slot.committed.as_ref());
            let executed = slot.and_then(|slot| slot.executed);
            if committed.is_some_and(|record| record.pre_prepare.digest != vote.digest)
                || executed.is_some_and(|digest| digest != vote.digest)
            {
                // Only possible past f faults (or with an injected bug): keep ours.
                self.metrics.invalid += 1;
                continue;
            }
            // A re-proposed batch was prepared by at least one correct backup, which
            // checked it; a backup still checks what it votes for (null ops aside).
            if !is_leader
                && !batch.is_empty()
                && self.check_proposal(vote.op, batch, &vote.digest).is_err()
            {
                continue;
            }
            self.accept_pre_prepare(now_us, *vote, batch.clone(), actions);
        }
        self.next_op = self.next_op.max(op_max + 1).max(self.commit_op + 1);
        if self.leader() == self.config.replica {
            self.next_op = (op_max + 1).max(self.commit_op + 1).max(self.low + 1);
        }
        self.new_view = Some(new_view);
        if self.has_work() {
            self.arm_progress_timer(now_us);
        }
        self.execute(now_us, actions);
    }

    /// Timers: leader suspicion, view-change timeout, resends and status reports.
    pub fn on_tick(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        match self.status {
            Status::Normal => {
                if self
                    .progress_deadline_us
                    .is_some_and(|deadline| now_us >= deadline)
                {
                    if self.may_suspect_leader() {
                        self.start_view_change(now_us, self.view + 1, actions);
                    } else {
                        // Not yet: looks again one timeout later.
                        self.metrics.suspicions_deferred += 1;
                        self.progress_deadline_us = Some(now_us + self.progress_timeout_us());
                    }
                }
            }
            Status::ViewChange => {
                if self
                    .view_change_deadline_us
                    .is_some_and(|deadline| now_us >= deadline)
                {
                    self.view_change_timeout(now_us, actions);
                }
            }
        }
        if self
            .transfer_retry_at_us
            .is_some_and(|deadline| now_us >= deadline)
        {
            self.state_transfer_retry(now_us, actions);
        }
        if now_us >= self.resend_at_us {
            self.resend_at_us = now_us + self.config.resend_interval_us;
            self.resend(actions);
        }
        if now_us >= self.status_at_us {
            self.status_at_us = now_us + self.config.status_interval_us;
            // Awaiting the NewView of its view after a restart: peers in this view answer
            // a report of the view before with their NewView.
            let view = if self.awaiting_new_view {
                self.view.saturating_sub(1)
            } else {
                self.view
            };
            actions.push(Action::Broadcast {
                message: Message::Status {
                    view,
                    commit_op: self.commit_op,
                    low: self.low,
                },
            });
        }
    }

    /// The NewView did not come in time. With `f + 1` view changes for this view (so at
    /// least one correct replica is changing too) try the next view; alone, stay: a replica
    /// cut off from the group must not run ahead through views the others never reach (a
    /// view change it signed cannot be taken back), it rejoins when they time out too.
    fn view_change_timeout(&mut self, now_us: u64, actions: &mut Vec<Action>) {
        // A replica restarted between views left its view before its crash but holds no
        // ViewChange of its own (it cannot sign that one again): it counts itself, or
        // with every correct replica needed (`f` Byzantine ones silent) the correct ones
        // could wait in different views for each other forever.
        let replica = usize::from(self.config.replica);
        let restarted = self.awaiting_new_view && self.view_changes[replica].is_none();
        let restarted_changing = if restarted {
            1 + self.peers_without_new_view()
        } else {
            0
        };
        let changing = self
            .view_changes
            .iter()
            .flatten()
            .filter(|held| held.vote.view >= self.view)
            .count()
            + restarted_changing;
        if changing >= self.committee.weak_quorum() {
            self.start_view_change(now_us, self.view + 1, actions);
        } else {
            self.view_change_deadline_us = Some(now_us + self.view_change_timeout_us());
        }
    }

    /// Peers that hold no NewView of this replica's view and send no ViewChange for it or
    /// a later one: their latest `Status` reports an older view (a replica awaiting a
    /// NewView after its restart reports the view before its own). After every replica
    /// of a group restarted between views, none holds a NewView and none may sign its
    /// ViewChange again, so each waits for the others: counted with the restarted replica
    /// itself, `f + 1` of them move it to the next view, where it signs a ViewChange the
    /// others join. Counted only while this replica awaits the NewView of the view it
    /// restarted in: `Status` is not signed, so `f` lying peers can move it one view past
    /// its guard's, once; from there only `f + 1` ViewChanges move it, as before.
    fn peers_without_new_view(&self) -> usize {
        let replica = usize::from(self.config.replica);
        (0..self.peer_view.len())
            .filter(|peer| *peer != replica)
            .filter(|peer| {
                let changing = self.view_changes[*peer]
                    .as_ref()
                    .is_some_and(|held| held.vote.view >= self.view);
                !changing && self.peer_view[*peer].is_some_and(|view| view < self.view)
            })
            .count()
    }

    /// Sends again what peers may have lost: this view's proposals and votes of ops not
    /// yet committed, the pending view change, the latest checkpoint vote.
    fn resend(&self, actions: &mut Vec<Action>) {
        let replica = usize::from(self.config.replica);
        if self.status == Status::ViewChange {
            if let Some(view_change) = &self.view_changes[replica] {
                actions.push(Action::Broadcast {
                    message: Message::ViewChange(Box::new(view_change.clone())),
                });
            }
        } else {
            for op in self.commit_op.max(self.low) + 1..=self.low + self.config.log_window_ops {
                let Some(slot) = self.slot(op) else { continue };
                if slot.committed.is_some() || slot.votes_view != self.view {
                    continue;
                }
                let Some(head) = slot.pre_prepare.filter(|head| head.view == self.view) else {
                    continue;
                };
                if head.replica == self.config.replica {
                    actions.push(Action::Broadcast {
                        message: Message::PrePrepare {
                            vote: head,
                            batch: slot.batch.clone(),
                        },
                    });
                }
                if let Some((vote, header)) = slot.prepares[replica] {
                    actions.push(Action::Broadcast {
                        message: Message::Prepare {
                            vote,
                            pre_prepare: header,
                        },
                    });
                }
                if let Some(vote) = slot.commits[replica] {
                    actions.push(Action::Broadcast {
                        message: Message::Commit(vote),
                    });
                }
            }
        }
        let latest = self.checkpoint_votes[replica]
            .iter()
            .flatten()
            .filter(|vote| vote.op > self.low)
            .max_by_key(|vote| vote.op);
        if let Some(vote) = latest {
            actions.push(Action::Broadcast {
                message: Message::Checkpoint(*vote),
            });
        }
        let state_cert_op = self.state_cert_op();
        let latest = self.state_votes[replica]
            .iter()
            .flatten()
            .filter(|(vote, _)| vote.op > state_cert_op)
            .max_by_key(|(vote, _)| vote.op);
        if let Some((vote, statement)) = latest {
            actions.push(Action::Broadcast {
                message: Message::StateCheckpoint {
                    vote: *vote,
                    statement: *statement,
                },
            });
        }
    }
}

/// Where a verified vote goes among one replica's kept votes (the highest few ops).
enum Keep {
    /// Into this entry: a free one, or the lowest op's (this vote's op is higher).
    Slot(usize),
    /// A repeat of a kept vote, or an op below every kept one.
    Stale,
    /// The replica's kept vote for the same op, with another digest: evidence.
    Conflict(Vote),
}

/// Decides where `vote` goes among `kept` (entries holding a vote, read by `vote_of`).
fn keep_vote<T>(kept: &[Option<T>], vote: &Vote, vote_of: impl Fn(&T) -> &Vote) -> Keep {
    if let Some(held) = kept
        .iter()
        .flatten()
        .map(&vote_of)
        .find(|held| held.op == vote.op)
    {
        return if held.digest == vote.digest {
            Keep::Stale
        } else {
            Keep::Conflict(*held)
        };
    }
    let (index, lowest) = kept
        .iter()
        .enumerate()
        .min_by_key(|(_, held)| held.as_ref().map_or(0, |held| vote_of(held).op))
        .expect("at least one entry");
    if lowest
        .as_ref()
        .is_some_and(|held| vote_of(held).op >= vote.op)
    {
        Keep::Stale
    } else {
        Keep::Slot(index)
    }
}
