//! Unit tests of the BFT core: a lossless in-memory group of 4 replicas, messages delivered
//! in FIFO order, time advanced by hand. The simulator (`tests/src/bft_sim/`) does the rest.

use std::collections::{BTreeMap, VecDeque};

use super::*;

const GROUP: u32 = 0;

fn keys(count: u8) -> Vec<SigningKey> {
    (0..count)
        .map(|replica| SigningKey::from_bytes(&[replica + 1; 32]))
        .collect()
}

fn committee(count: u8, faults_max: u8) -> Committee {
    let keys = keys(count).iter().map(SigningKey::verifying_key).collect();
    Committee::new(GROUP, faults_max, keys).expect("committee")
}

struct Group {
    replicas: Vec<BftReplica>,
    /// (from, to, message)
    queue: VecDeque<(u8, u8, Message)>,
    committed: Vec<Vec<(u64, Digest)>>,
    /// Each replica's last persisted vote guard.
    guards: Vec<VoteGuard>,
    /// Every statement each replica signed and sent, across restarts: a second, different
    /// one for the same `(kind, view, op)` fails the test.
    signed: Vec<BTreeMap<(VoteKind, u64, u64), Digest>>,
    /// PrePrepares, Prepares and Commits each replica sent (cleared by `restart`).
    votes_sent: Vec<Vec<Vote>>,
    errors: Vec<BftError>,
    /// Replicas whose messages are dropped (crashed or silent).
    silent: Vec<u8>,
    now_us: u64,
    /// Each replica's committed ops with certificate and batch: what its driver serves
    /// state transfers from.
    store: Vec<BTreeMap<u64, (CommitCert, Vec<u8>)>>,
    /// Per replica: the prepared certificates its driver made durable, by op.
    prepared: Vec<BTreeMap<u64, PreparedEntry>>,
    /// State transfers are expected (otherwise one fails the test).
    transfers_allowed: bool,
    /// A replica whose `StateOps` answers are forged: one Commit short of a quorum.
    lying_server: Option<u8>,
    /// Per replica: ops at or below this are gone from its driver's log; a request for
    /// them is answered with its state certificate (`StateSnapshot`), if it holds one.
    log_floor: Vec<u64>,
    /// `(replica, peer, cert)` of every `FetchSnapshot` asked for, in order.
    fetches: Vec<(u8, u8, StateCert)>,
    /// A replica that gets no Prepare, Commit or proof of an op (it still gets proposals,
    /// view changes and the rest).
    votes_withheld_from: Option<u8>,
}

impl Group {
    fn new(count: u8, faults_max: u8) -> Group {
        let replicas = keys(count)
            .into_iter()
            .enumerate()
            .map(|(replica, key)| {
                BftReplica::new(
                    BftConfig::new(GROUP, replica as u8),
                    committee(count, faults_max),
                    key,
                    0,
                )
                .expect("replica")
            })
            .collect();
        Group {
            replicas,
            queue: VecDeque::new(),
            committed: vec![Vec::new(); usize::from(count)],
            guards: vec![VoteGuard::default(); usize::from(count)],
            signed: vec![BTreeMap::new(); usize::from(count)],
            votes_sent: vec![Vec::new(); usize::from(count)],
            errors: Vec::new(),
            silent: Vec::new(),
            now_us: 0,
            store: vec![BTreeMap::new(); usize::from(count)],
            prepared: vec![BTreeMap::new(); usize::from(count)],
            transfers_allowed: false,
            lying_server: None,
            log_floor: vec![0; usize::from(count)],
            fetches: Vec::new(),
            votes_withheld_from: None,
        }
    }

    /// Checks that `from` never signs two different statements for one `(kind, view, op)`,
    /// and that what it sends is covered by its persisted guard.
    fn check_signed(&mut self, from: u8, message: &Message) {
        let vote = match message {
            Message::PrePrepare { vote, .. }
            | Message::Prepare { vote, .. }
            | Message::Commit(vote)
            | Message::Checkpoint(vote) => *vote,
            Message::ViewChange(view_change) => view_change.vote,
            Message::StateCheckpoint { vote, .. } => *vote,
            _ => return,
        };
        if vote.replica != from {
            return;
        }
        let index = usize::from(from);
        let held = self.signed[index]
            .entry((vote.kind, vote.view, vote.op))
            .or_insert(vote.digest);
        assert_eq!(
            *held, vote.digest,
            "replica {from} contradicts itself: {vote:?}"
        );
        let guard = self.guards[index];
        match vote.kind {
            VoteKind::PrePrepare | VoteKind::Prepare | VoteKind::Commit => {
                assert!(
                    guard.covers_vote(vote.view, vote.op),
                    "{vote:?} not guarded"
                );
                self.votes_sent[index].push(vote);
            }
            VoteKind::ViewChange => assert!(guard.view_change_view >= vote.view),
            VoteKind::Checkpoint | VoteKind::StateCheckpoint => {}
        }
    }

    /// Restarts `replica` from what its driver persisted: its guard and the digests of the
    /// ops it executed up to `durable_op` (the rest of its log was lost).
    fn restart(&mut self, replica: u8, durable_op: u64) {
        self.restart_with(replica, durable_op, None);
    }

    /// [`Group::restart`] with a bug injected into the restarted core.
    fn restart_with(&mut self, replica: u8, durable_op: u64, bug: Option<InjectedBug>) {
        let index = usize::from(replica);
        let low_cert = self.replicas[index].low_cert().cloned();
        let low = low_cert.as_ref().map_or(0, CheckpointCert::op);
        assert!(durable_op >= low);
        self.committed[index].retain(|(op, _)| *op <= durable_op);
        let digests = self.committed[index]
            .iter()
            .filter(|(op, _)| *op > low)
            .map(|(_, digest)| *digest)
            .collect();
        self.prepared[index].retain(|op, _| *op > low);
        let restored = Restored {
            low_cert,
            digests,
            guard: self.guards[index],
            prepared: self.prepared[index].values().cloned().collect(),
        };
        self.replicas[index] = BftReplica::restore(
            BftConfig {
                bug,
                ..BftConfig::new(GROUP, replica)
            },
            committee(self.replicas.len() as u8, 1),
            keys(self.replicas.len() as u8)[index].clone(),
            self.now_us,
            restored,
        )
        .expect("restore");
        self.queue
            .retain(|(from, to, _)| *from != replica && *to != replica);
        self.votes_sent[index].clear();
    }

    fn absorb(&mut self, from: u8, actions: Vec<Action>) {
        for action in actions {
            if let Action::Send { message, .. } | Action::Broadcast { message } = &action {
                self.check_signed(from, message);
            }
            match action {
                Action::Send { to, message } => self.queue.push_back((from, to, message)),
                Action::Broadcast { message } => {
                    for to in 0..self.replicas.len() as u8 {
                        if to != from {
                            self.queue.push_back((from, to, message.clone()));
                        }
                    }
                }
                Action::Commit {
                    op,
                    digest,
                    batch,
                    cert,
                    ..
                } => {
                    self.committed[usize::from(from)].push((op, digest));
                    self.store[usize::from(from)].insert(op, (cert, batch));
                }
                Action::StateTransfer { .. } => {
                    assert!(self.transfers_allowed, "no state transfer expected here");
                }
                Action::ServeState { to, from_op, .. }
                    if from_op <= self.log_floor[usize::from(from)] =>
                {
                    let message = match self.replicas[usize::from(from)].state_cert() {
                        Some(cert) if cert.op() >= from_op => Message::StateSnapshot(cert.clone()),
                        _ => Message::StateOps(Vec::new()),
                    };
                    self.queue.push_back((from, to, message));
                }
                Action::FetchSnapshot { from: peer, cert } => {
                    self.fetches.push((from, peer, cert));
                }
                Action::ServeState { to, from_op, to_op } => {
                    let mut ops: Vec<(CommitCert, Vec<u8>)> = self.store[usize::from(from)]
                        .range(from_op..=to_op)
                        .map(|(_, op)| op.clone())
                        .collect();
                    if self.lying_server == Some(from) {
                        for (cert, _) in &mut ops {
                            cert.commits.pop();
                        }
                    }
                    self.queue.push_back((from, to, Message::StateOps(ops)));
                }
                Action::PersistGuard { guard } => {
                    let persisted = &mut self.guards[usize::from(from)];
                    assert!(
                        guard.vote_view >= persisted.vote_view
                            && guard.view_change_view >= persisted.view_change_view,
                        "a guard never goes back"
                    );
                    *persisted = guard;
                }
                Action::PersistPrepared { entry } => {
                    let op = entry.cert.pre_prepare.op;
                    self.prepared[usize::from(from)].insert(op, entry);
                }
            }
        }
    }

    fn deliver_all(&mut self) {
        while let Some((from, to, message)) = self.queue.pop_front() {
            if self.silent.contains(&from) || self.silent.contains(&to) {
                continue;
            }
            let vote_or_proof = matches!(
                message,
                Message::Prepare { .. }
                    | Message::Commit(_)
                    | Message::CommitProof { .. }
                    | Message::StateOps(_)
            );
            if vote_or_proof && self.votes_withheld_from == Some(to) {
                continue;
            }
            let mut actions = Vec::new();
            if let Err(error) =
                self.replicas[usize::from(to)].on_message(self.now_us, from, message, &mut actions)
            {
                self.errors.push(error);
            }
            self.absorb(to, actions);
        }
    }

    fn propose(&mut self, leader: u8, batch: &[u8]) -> u64 {
        let mut actions = Vec::new();
        let op = self.replicas[usize::from(leader)]
            .propose(self.now_us, batch.to_vec(), &mut actions)
            .expect("propose");
        self.absorb(leader, actions);
        self.deliver_all();
        op
    }

    fn tick_all(&mut self, step_us: u64) {
        self.now_us += step_us;
        for replica in 0..self.replicas.len() as u8 {
            if self.silent.contains(&replica) {
                continue;
            }
            let mut actions = Vec::new();
            self.replicas[usize::from(replica)].on_tick(self.now_us, &mut actions);
            self.absorb(replica, actions);
        }
        self.deliver_all();
    }
}

#[test]
fn bft_config_refuses_too_few_replicas() {
    let keys: Vec<VerifyingKey> = keys(3).iter().map(SigningKey::verifying_key).collect();
    let error = Committee::new(GROUP, 1, keys).unwrap_err();
    assert_eq!(
        error,
        BftError::TooFewReplicas {
            replica_count: 3,
            faults_max: 1
        }
    );
    assert_eq!(
        error.to_string(),
        "n = 3 replicas cannot tolerate f = 1 Byzantine faults: BFT needs n >= 3f + 1 = 4 replicas"
    );
    assert!(check_fault_model(7, 2).is_ok());
    assert!(check_fault_model(6, 2).is_err());
    assert_eq!(committee(4, 1).quorum(), 3);
    assert_eq!(committee(7, 2).quorum(), 5);
    assert_eq!(
        committee(5, 1).quorum(),
        4,
        "quorums of 5 replicas must share f + 1 = 2"
    );
    let wrong_key = BftReplica::new(
        BftConfig::new(GROUP, 0),
        committee(4, 1),
        SigningKey::from_bytes(&[9; 32]),
        0,
    );
    assert_eq!(wrong_key.unwrap_err(), BftError::KeyMismatch(0));
}

#[test]
fn bft_commits_in_order_with_one_signature_per_vote() {
    let mut group = Group::new(4, 1);
    for round in 0..40u8 {
        let op = group.propose(0, &[round; 100]);
        assert_eq!(op, u64::from(round) + 1);
    }
    for (replica, committed) in group.committed.iter().enumerate() {
        assert_eq!(committed.len(), 40, "replica {replica}");
        for (index, (op, digest)) in committed.iter().enumerate() {
            assert_eq!(*op, index as u64 + 1);
            assert_eq!(*digest, batch_digest(&[index as u8; 100]));
        }
    }
    // Checkpoints at 16 and 32 became stable; the window moved.
    for replica in &group.replicas {
        assert_eq!(replica.low(), 32);
        assert_eq!(replica.commit_op(), 40);
        assert_eq!(replica.metrics().checkpoints_stable, 2);
    }
    assert!(
        group.errors.iter().all(|error| *error == BftError::Stale),
        "{:?}",
        group.errors
    );
}

#[test]
fn bft_refuses_forged_replayed_and_far_future_messages() {
    let mut group = Group::new(4, 1);
    group.propose(0, b"one");
    let committee = committee(4, 1);
    let digest = batch_digest(b"x");
    let mut actions = Vec::new();
    // A commit "from replica 2" signed with replica 3's key.
    let forged = Vote::sign(&keys(4)[3], GROUP, VoteKind::Commit, 2, 0, 2, digest);
    let result = group.replicas[1].on_message(0, 3, Message::Commit(forged), &mut actions);
    assert_eq!(
        result,
        Err(BftError::BadSignature {
            replica: 2,
            kind: VoteKind::Commit
        })
    );
    // Garbage signature.
    let mut garbage = Vote::sign(&keys(4)[2], GROUP, VoteKind::Commit, 2, 0, 2, digest);
    garbage.signature = Signature::from_bytes(&[0x5a; 64]);
    assert!(matches!(
        group.replicas[1].on_message(0, 2, Message::Commit(garbage), &mut actions),
        Err(BftError::BadSignature { .. })
    ));
    // Unknown signer.
    let stranger = Vote::sign(&keys(4)[2], GROUP, VoteKind::Commit, 6, 0, 2, digest);
    assert_eq!(
        group.replicas[1].on_message(0, 2, Message::Commit(stranger), &mut actions),
        Err(BftError::UnknownSigner(6))
    );
    // Far beyond the window: refused before any state is touched.
    let far = Vote::sign(
        &keys(4)[2],
        GROUP,
        VoteKind::Prepare,
        2,
        0,
        1_000_000,
        digest,
    );
    assert!(matches!(
        group.replicas[1].on_message(
            0,
            2,
            Message::Prepare {
                vote: far,
                pre_prepare: far
            },
            &mut actions
        ),
        Err(BftError::OutOfWindow { .. })
    ));
    // Another group's statement does not verify here.
    let other_group = Vote::sign(&keys(4)[2], GROUP + 1, VoteKind::Commit, 2, 0, 2, digest);
    assert!(committee.verify_vote(&other_group).is_err());
    // A proposal from a replica that does not lead view 0.
    let usurper = Vote::sign(&keys(4)[1], GROUP, VoteKind::PrePrepare, 1, 0, 2, digest);
    assert!(matches!(
        group.replicas[2].on_message(
            0,
            1,
            Message::PrePrepare {
                vote: usurper,
                batch: b"x".to_vec()
            },
            &mut actions
        ),
        Err(BftError::WrongSender(_))
    ));
    // A proposal whose batch does not hash to its digest.
    let lying = Vote::sign(&keys(4)[0], GROUP, VoteKind::PrePrepare, 0, 0, 2, digest);
    assert_eq!(
        group.replicas[2].on_message(
            0,
            0,
            Message::PrePrepare {
                vote: lying,
                batch: b"y".to_vec()
            },
            &mut actions
        ),
        Err(BftError::BatchDigestMismatch { op: 2 })
    );
    assert!(
        actions.is_empty(),
        "nothing refused produced an action: {actions:?}"
    );
    assert_eq!(group.replicas[1].metrics().bad_signatures, 2);
    assert_eq!(group.replicas[1].metrics().out_of_window, 1);
}

#[test]
fn bft_detects_an_equivocating_leader_and_changes_view() {
    let mut group = Group::new(4, 1);
    let keys = keys(4);
    let first = Vote::sign(
        &keys[0],
        GROUP,
        VoteKind::PrePrepare,
        0,
        0,
        1,
        batch_digest(b"a"),
    );
    let second = Vote::sign(
        &keys[0],
        GROUP,
        VoteKind::PrePrepare,
        0,
        0,
        1,
        batch_digest(b"b"),
    );
    // Replicas 1 and 2 get "a", replica 3 gets "b"; the leader stays silent afterwards.
    group.silent.push(0);
    let mut actions = Vec::new();
    for (to, vote, batch) in [(1u8, first, b"a"), (2, first, b"a"), (3, second, b"b")] {
        group.replicas[usize::from(to)]
            .on_message(
                0,
                0,
                Message::PrePrepare {
                    vote,
                    batch: batch.to_vec(),
                },
                &mut actions,
            )
            .expect("accepted");
        group.absorb(to, std::mem::take(&mut actions));
    }
    group.deliver_all();
    // Replica 3 saw Prepares carrying the other proposal: evidence, and a view change.
    let replica = &group.replicas[3];
    assert_eq!(replica.metrics().equivocations, 1);
    let evidence = &replica.evidence()[0];
    assert_eq!(evidence.replica(), 0);
    evidence
        .verify(&committee(4, 1))
        .expect("the evidence is a proof");
    // Replicas 1 and 2 saw replica 3's Prepare with "b": they convict the leader too.
    assert_eq!(group.replicas[1].metrics().equivocations, 1);
    // Everyone moved to view 1 (led by replica 1), "a" was prepared by 1 and 2 only
    // (2 prepares < quorum − 1 = 2 from backups? 1 and 2 are 2 backups: prepared), so the
    // new view re-proposes whichever is certified and the group goes on.
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    for replica in 1..4 {
        assert!(
            group.replicas[replica].view() >= 1,
            "replica {replica} changed view"
        );
        assert_eq!(group.replicas[replica].status(), Status::Normal);
    }
    let leader = group.replicas[1].leader();
    assert_ne!(leader, 0);
    group.propose(leader, b"after");
    let expected = &group.committed[1];
    assert!(
        expected
            .iter()
            .any(|(_, digest)| *digest == batch_digest(b"after"))
    );
    for replica in 2..4 {
        assert_eq!(
            &group.committed[replica], expected,
            "replica {replica} agrees"
        );
    }
}

#[test]
fn bft_view_change_keeps_a_prepared_batch() {
    let mut group = Group::new(4, 1);
    group.propose(0, b"committed");
    // Leader 0 proposes; everyone prepares, but the commits are lost, then 0 goes silent.
    let mut actions = Vec::new();
    group.replicas[0]
        .propose(0, b"prepared".to_vec(), &mut actions)
        .expect("propose");
    group.absorb(0, actions);
    let mut kept = VecDeque::new();
    while let Some((from, to, message)) = group.queue.pop_front() {
        if matches!(message, Message::Commit(_)) {
            continue;
        }
        let mut actions = Vec::new();
        let _ = group.replicas[usize::from(to)].on_message(0, from, message, &mut actions);
        for action in actions {
            match action {
                Action::Broadcast {
                    message: Message::Commit(_),
                } => {}
                other => kept.push_back((to, other)),
            }
        }
        for (from, action) in kept.drain(..) {
            group.absorb(from, vec![action]);
        }
    }
    assert_eq!(group.replicas[1].commit_op(), 1);
    group.silent.push(0);
    group.replicas[1].set_pending(group.now_us, true);
    group.replicas[2].set_pending(group.now_us, true);
    group.replicas[3].set_pending(group.now_us, true);
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    for replica in 1..4 {
        let committed = &group.committed[replica];
        assert_eq!(committed.len(), 2, "replica {replica}: {committed:?}");
        assert_eq!(committed[1], (2, batch_digest(b"prepared")));
        assert!(group.replicas[replica].view() >= 1);
    }
}

/// Section 10's counter-example with two crashes and no Byzantine replica: replicas 1, 2
/// and 3 prepare op 2 and send their Commits, only replica 2 commits it (the leader sees
/// no Prepare), replicas 1 and 3 crash before op 2 is in their journals and replica 2 is
/// cut off. The view change of 0, 1 and 3 keeps op 2's batch only because 1 and 3 restore
/// their durable prepared certificates; restored without them, the new view fills op 2 with
/// a null op, and replica 2 executed "prepared" there.
fn restarts_after_commits_before_journal(bug: Option<InjectedBug>) -> Group {
    let mut group = Group::new(4, 1);
    group.propose(0, b"committed");
    let mut actions = Vec::new();
    group.replicas[0]
        .propose(0, b"prepared".to_vec(), &mut actions)
        .expect("propose");
    group.absorb(0, actions);
    while let Some((from, to, message)) = group.queue.pop_front() {
        let lost = match &message {
            Message::Prepare { .. } => to == 0,
            Message::Commit(_) => to != 2,
            _ => false,
        };
        if lost {
            continue;
        }
        let mut actions = Vec::new();
        let _ = group.replicas[usize::from(to)].on_message(0, from, message, &mut actions);
        group.absorb(to, actions);
    }
    assert_eq!(group.replicas[2].commit_op(), 2);
    for replica in [0, 1, 3] {
        assert_eq!(group.replicas[replica].commit_op(), 1);
    }
    assert!(group.prepared[1].contains_key(&2) && group.prepared[3].contains_key(&2));
    group.restart_with(1, 1, bug);
    group.restart_with(3, 1, bug);
    group.silent.push(2);
    for replica in [0, 1, 3] {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    let settled = |group: &Group| {
        let view = group.replicas[1].view();
        view >= 1
            && [0, 1, 3].iter().all(|replica| {
                let core = &group.replicas[*replica];
                core.view() == view && core.status() == Status::Normal
            })
    };
    for _ in 0..200 {
        if settled(&group) {
            break;
        }
        group.tick_all(50_000);
    }
    assert!(settled(&group), "replicas 0, 1 and 3 agree on a new view");
    // The new leader proposes the next batch: above op 2 if the view kept it, at op 2
    // otherwise.
    let leader = group.replicas[1].leader();
    group.propose(leader, b"next");
    group
}

#[test]
fn bft_restarted_replicas_report_their_durable_prepared_certificates() {
    let group = restarts_after_commits_before_journal(None);
    for replica in [0, 1, 3] {
        let committed = &group.committed[replica];
        assert_eq!(committed.get(1), Some(&(2, batch_digest(b"prepared"))));
        assert_eq!(committed.get(2), Some(&(3, batch_digest(b"next"))));
    }
}

#[test]
fn bft_restore_without_prepared_certificates_loses_a_committed_batch() {
    let group = restarts_after_commits_before_journal(Some(InjectedBug::RestoreDropsPrepared));
    for replica in [0, 1, 3] {
        // Replica 2 executed "prepared" at op 2.
        let committed = &group.committed[replica];
        assert_eq!(committed.get(1), Some(&(2, batch_digest(b"next"))));
    }
}

#[test]
fn bft_new_view_plan_fills_gaps_with_null_ops() {
    let keys = keys(4);
    let committee = committee(4, 1);
    let prepared = |op: u64, view: u64, batch: &[u8]| {
        let digest = batch_digest(batch);
        let leader = committee.leader_of(view);
        let pre_prepare = Vote::sign(
            &keys[usize::from(leader)],
            GROUP,
            VoteKind::PrePrepare,
            leader,
            view,
            op,
            digest,
        );
        let prepares = (0..4u8)
            .filter(|replica| *replica != leader)
            .take(2)
            .map(|replica| {
                Vote::sign(
                    &keys[usize::from(replica)],
                    GROUP,
                    VoteKind::Prepare,
                    replica,
                    view,
                    op,
                    digest,
                )
            })
            .collect();
        PreparedEntry {
            cert: PreparedCert {
                pre_prepare,
                prepares,
            },
            batch: batch.to_vec(),
        }
    };
    let view_change = |replica: u8, entries: Vec<PreparedEntry>| {
        let mut view_change = ViewChange {
            vote: Vote::sign(
                &keys[usize::from(replica)],
                GROUP,
                VoteKind::ViewChange,
                replica,
                2,
                0,
                [0; 32],
            ),
            checkpoint: None,
            prepared: entries,
        };
        let digest = view_change.content_digest();
        view_change.vote = Vote::sign(
            &keys[usize::from(replica)],
            GROUP,
            VoteKind::ViewChange,
            replica,
            2,
            0,
            digest,
        );
        committee
            .verify_view_change(&view_change, 2, LOG_WINDOW_OPS_DEFAULT)
            .expect("valid");
        view_change
    };
    let view_changes = vec![
        view_change(0, vec![prepared(1, 0, b"old"), prepared(3, 0, b"three")]),
        view_change(1, vec![prepared(1, 1, b"new")]),
        view_change(2, vec![]),
    ];
    let plan = new_view_plan(&view_changes, None);
    assert_eq!(plan.checkpoint, None);
    let digests: Vec<(u64, Digest)> = plan
        .entries
        .iter()
        .map(|(op, digest, _)| (*op, *digest))
        .collect();
    assert_eq!(
        digests,
        vec![
            (1, batch_digest(b"new")),
            (2, batch_digest(&[])),
            (3, batch_digest(b"three"))
        ],
        "highest view wins, gaps are null ops"
    );
    // A tampered view change (contents changed after signing) is refused.
    let mut tampered = view_changes[2].clone();
    tampered.prepared.push(prepared(5, 0, b"smuggled"));
    assert!(
        committee
            .verify_view_change(&tampered, 2, LOG_WINDOW_OPS_DEFAULT)
            .is_err()
    );
}

/// A leader cut off in view 0 gets a view-1 `CommitProof` for op 2 before the one for op
/// 1 (found by the simulator): it must not propose at op 2, which would replace the
/// certified batch in the slot and execute a batch that is not the committed one.
#[test]
fn bft_stale_leader_does_not_propose_over_an_op_a_later_view_committed() {
    let mut group = Group::new(4, 1);
    let keys = keys(4);
    let proof = |op: u64, batch: &[u8]| {
        let digest = batch_digest(batch);
        let pre_prepare = Vote::sign(&keys[1], GROUP, VoteKind::PrePrepare, 1, 1, op, digest);
        let commits = (1..4u8)
            .map(|replica| {
                let key = &keys[usize::from(replica)];
                Vote::sign(key, GROUP, VoteKind::Commit, replica, 1, op, digest)
            })
            .collect();
        Message::CommitProof {
            pre_prepare,
            cert: CommitCert { commits },
            batch: batch.to_vec(),
        }
    };
    let leader = &mut group.replicas[0];
    let mut actions = Vec::new();
    leader
        .on_message(0, 1, proof(2, b"two"), &mut actions)
        .expect("kept until op 1 is executed");
    assert_eq!(leader.commit_op(), 0);
    assert_eq!(
        leader.propose(0, b"one, view 0".to_vec(), &mut actions),
        Ok(1)
    );
    assert!(!leader.is_ready_leader(), "op 2 is committed (view 1)");
    assert_eq!(
        leader.propose(0, b"mine".to_vec(), &mut actions),
        Err(BftError::NotLeader)
    );
    actions.clear();
    leader
        .on_message(0, 1, proof(1, b"one"), &mut actions)
        .expect("proof of op 1");
    let executed: Vec<(u64, Digest, Vec<u8>)> = actions
        .iter()
        .filter_map(|action| match action {
            Action::Commit {
                op, digest, batch, ..
            } => Some((*op, *digest, batch.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        executed,
        vec![
            (1, batch_digest(b"one"), b"one".to_vec()),
            (2, batch_digest(b"two"), b"two".to_vec()),
        ]
    );
}

#[test]
fn bft_restarted_replica_never_signs_a_conflicting_vote() {
    let mut group = Group::new(4, 1);
    for round in 0..5u8 {
        group.propose(0, &[round; 10]);
    }
    // Votes reserve two windows of ops ahead (one guard write for all of them).
    let reserved = 2 * LOG_WINDOW_OPS_DEFAULT;
    let guard = VoteGuard {
        vote_view: 0,
        vote_op_max: reserved,
        view_change_view: 0,
    };
    assert_eq!(group.guards[2], guard);
    // Replica 2 executed and voted for 5 ops; only 3 reached its disk.
    group.restart(2, 3);
    assert_eq!(group.replicas[2].commit_op(), 3);
    assert_eq!(group.replicas[2].view(), 0);
    assert_eq!(group.replicas[2].status(), Status::Normal);
    assert_eq!(group.replicas[2].guard(), guard);
    // A Byzantine leader now proposes another batch at op 4 to replica 2 alone: it keeps the
    // proposal (it convicts the leader if it meets the other one) but signs nothing.
    let other = Vote::sign(
        &keys(4)[0],
        GROUP,
        VoteKind::PrePrepare,
        0,
        0,
        4,
        batch_digest(b"other"),
    );
    let mut actions = Vec::new();
    group.replicas[2]
        .on_message(
            group.now_us,
            0,
            Message::PrePrepare {
                vote: other,
                batch: b"other".to_vec(),
            },
            &mut actions,
        )
        .expect("accepted, not voted on");
    assert!(actions.is_empty(), "{actions:?}");
    // (Holding that proposal, it would convict the leader once it sees the committed one
    // and ask for a view change alone.) It crashes again before anything else, then
    // catches up: its Status reports bring CommitProofs of ops 4 and 5.
    group.restart(2, 3);
    for _ in 0..3 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    assert_eq!(group.replicas[2].commit_op(), 5);
    assert_eq!(
        group.replicas[2].commit_chain(),
        group.replicas[1].commit_chain()
    );
    // Up to the reserved op it commits from its peers' votes and signs none; above it, it
    // votes again (the guard goes up first).
    for round in 5..=reserved as u8 + 6 {
        group.propose(0, &[round; 10]);
    }
    let op_last = reserved + 7;
    for replica in 0..4 {
        assert_eq!(group.replicas[replica].commit_op(), op_last, "{replica}");
    }
    assert!(
        group.votes_sent[2]
            .iter()
            .all(|vote| vote.op > reserved && vote.kind != VoteKind::PrePrepare),
        "{:?}",
        group.votes_sent[2]
    );
    assert!(!group.votes_sent[2].is_empty(), "it votes again");
    assert!(group.guards[2].vote_op_max > reserved);
    // It counts in quorums again: with replica 3 silent, the group still commits.
    group.silent.push(3);
    group.propose(0, b"needs replica 2");
    assert_eq!(group.replicas[1].commit_op(), op_last + 1);
    assert_eq!(group.replicas[2].commit_op(), op_last + 1);
}

#[test]
fn bft_restarted_replica_rejoins_a_later_view_without_signing_a_second_view_change() {
    let mut group = Group::new(4, 1);
    group.propose(0, b"view 0");
    // Leader 0 goes silent; the others change to a later view.
    group.silent.push(0);
    for replica in 1..4 {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    let view = group.replicas[1].view();
    assert!(view >= 1);
    // A backup of that view restarts (its leader could not propose again in a view its
    // guard covers).
    let restarted = (1..4u8)
        .find(|replica| group.replicas[1].committee().leader_of(view) != *replica)
        .expect("two backups besides replica 0");
    let index = usize::from(restarted);
    assert_eq!(group.replicas[index].view(), view);
    assert_eq!(group.guards[index].view_change_view, view);
    group.silent.retain(|replica| *replica != 0);
    // It must neither sign a ViewChange for its view again nor wait for another view
    // change; it asks its peers for their NewView.
    group.restart(restarted, group.replicas[index].commit_op());
    assert_eq!(group.replicas[index].view(), view);
    assert_eq!(group.replicas[index].status(), Status::ViewChange);
    for _ in 0..3 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    assert_eq!(group.replicas[index].status(), Status::Normal);
    assert_eq!(group.replicas[index].view(), view);
    let leader = group.replicas[1].leader();
    let op = group.propose(leader, b"a later view");
    for replica in 1..4 {
        assert_eq!(group.replicas[replica].commit_op(), op, "{replica}");
    }
    // It prepared the NewView's re-proposal of op 1 in this view before the crash, so its
    // guard reserves this view's ops up to two windows: it commits from its peers' votes.
    assert_eq!(group.guards[index].vote_view, view);
    assert!(
        group.votes_sent[index].is_empty(),
        "{:?}",
        group.votes_sent[index]
    );
}

/// Ticks `group` in steps of `step_us` until `done` holds (at most `limit_us`); returns
/// the time it took.
fn ticks_until(
    group: &mut Group,
    step_us: u64,
    limit_us: u64,
    done: impl Fn(&Group) -> bool,
) -> u64 {
    let started_us = group.now_us;
    while !done(group) {
        assert!(
            group.now_us - started_us < limit_us,
            "not within {limit_us} us"
        );
        group.tick_all(step_us);
    }
    group.now_us - started_us
}

/// PBFT's liveness rule: each view change doubles the next timeouts, and a NewView does
/// not reset them; only ops executed in a view bring them down again, one halving per
/// checkpoint interval of ops. Reset at each NewView (or after one op), a group whose new
/// views take longer than the progress timeout to commit (slow links, a loaded host or a
/// slow disk after a whole group restarted) changes views without end: every backup
/// suspects each new leader while its NewView's ops are still being prepared or applied.
#[test]
fn bft_progress_timeout_doubles_per_view_change_until_the_view_executes_ops() {
    const STEP_US: u64 = 10_000;
    let in_view_one = |group: &Group| {
        (1..4).all(|replica| {
            group.replicas[replica].view() == 1
                && group.replicas[replica].status() == Status::Normal
        })
    };
    let left_view_one = |group: &Group| (2..4).all(|replica| group.replicas[replica].view() > 1);
    for (ops_in_view_one, expected_us) in [
        (0, 2 * PROGRESS_TIMEOUT_US_DEFAULT),
        (1, 2 * PROGRESS_TIMEOUT_US_DEFAULT),
        (CHECKPOINT_INTERVAL_OPS_DEFAULT, PROGRESS_TIMEOUT_US_DEFAULT),
    ] {
        let mut group = Group::new(4, 1);
        group.propose(0, b"view 0");
        // Leader 0 goes silent with work waiting: the others move to view 1 (led by 1).
        group.silent.push(0);
        for replica in 1..4 {
            group.replicas[replica].set_pending(group.now_us, true);
        }
        ticks_until(&mut group, STEP_US, 2_000_000, in_view_one);
        for round in 0..ops_in_view_one {
            let op = group.propose(1, &round.to_le_bytes());
            assert!((1..4).all(|replica| group.replicas[replica].commit_op() == op));
        }
        // Leader 1 goes silent too, work still waiting.
        group.silent.push(1);
        let suspected_after_us = ticks_until(&mut group, STEP_US, 2_000_000, left_view_one);
        assert!(
            suspected_after_us >= expected_us && suspected_after_us <= expected_us + STEP_US,
            "{ops_in_view_one} ops executed in view 1: suspected after {suspected_after_us} us"
        );
    }
}

/// After a long outage (two replicas silent: the other two change views again and again,
/// never with a quorum) the timeouts are at their caps, and the attempts stop counting
/// there: once the group works again, four checkpoint intervals of ops (200 ms doubled
/// four times is the 3.2 s cap) bring the progress timeout back to its first value.
#[test]
fn bft_timeouts_come_back_down_after_a_long_outage() {
    const STEP_US: u64 = 10_000;
    let mut group = Group::new(4, 1);
    group.propose(0, b"view 0");
    group.silent.extend([0, 1]);
    for replica in 0..4 {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    for _ in 0..3_000 {
        group.tick_all(STEP_US);
    }
    assert!(group.replicas[2].view() > 8, "{}", group.replicas[2].view());
    group.silent.clear();
    let normal_together = |group: &Group| {
        let view = group.replicas[0].view();
        (0..4).all(|replica| {
            group.replicas[replica].view() == view
                && group.replicas[replica].status() == Status::Normal
        })
    };
    ticks_until(&mut group, STEP_US, 30_000_000, normal_together);
    let leader = group.replicas[0].leader();
    let backups: Vec<usize> = (0..4)
        .filter(|replica| *replica != usize::from(leader))
        .collect();
    for round in 0..4 * CHECKPOINT_INTERVAL_OPS_DEFAULT {
        let op = group.propose(leader, &round.to_le_bytes());
        assert!(
            backups
                .iter()
                .all(|replica| group.replicas[*replica].commit_op() == op)
        );
    }
    group.silent.push(leader);
    let view = group.replicas[0].view();
    let suspected_after_us = ticks_until(&mut group, STEP_US, 10_000_000, |group| {
        backups
            .iter()
            .all(|replica| group.replicas[*replica].view() > view)
    });
    assert!(
        (PROGRESS_TIMEOUT_US_DEFAULT..=PROGRESS_TIMEOUT_US_DEFAULT + STEP_US)
            .contains(&suspected_after_us),
        "suspected after {suspected_after_us} us"
    );
}

#[test]
fn bft_restarted_replica_suspects_no_leader_before_it_hears_its_peers() {
    let mut group = Group::new(4, 1);
    for round in 0..3u8 {
        group.propose(0, &[round; 10]);
    }
    group.restart(2, group.replicas[2].commit_op());
    let signed_view_change = |group: &Group| {
        group.signed[2]
            .keys()
            .any(|(kind, _, _)| *kind == VoteKind::ViewChange)
    };
    // Clients send it work at once, before any peer has redialled it: its progress timer
    // fires again and again, and it stays in view 0 without a ViewChange.
    group.silent = vec![0, 1, 3];
    group.replicas[2].set_pending(group.now_us, true);
    for _ in 0..10 {
        group.tick_all(PROGRESS_TIMEOUT_US_DEFAULT);
    }
    assert!(!signed_view_change(&group));
    assert_eq!(group.replicas[2].view(), 0);
    assert_eq!(group.replicas[2].status(), Status::Normal);
    assert!(group.replicas[2].metrics().suspicions_deferred >= 5);
    // Replicas 1 and 3 (f + 1) are heard again, the leader stays silent: it is suspected.
    group.silent = vec![0];
    for _ in 0..10 {
        group.tick_all(PROGRESS_TIMEOUT_US_DEFAULT);
    }
    assert!(signed_view_change(&group));
    assert!(group.replicas[2].view() >= 1);
    assert_eq!(group.guards[2].view_change_view, group.replicas[2].view());
}

/// Every replica restarts at once, two of them behind the other two, in view 0. The two
/// ahead restored ops 3..=5 from their journals, so they hold digests, not commit
/// certificates, for them: they serve them from the journal (`StateOps` in answer to a
/// `Status`), and the replicas behind believe each op by its commit certificate. Before,
/// the ones behind waited for `CommitProof`s no peer could send.
#[test]
fn bft_whole_group_restart_serves_restored_ops_to_the_replicas_behind() {
    let mut group = Group::new(4, 1);
    for round in 0..5u8 {
        group.propose(0, &[round; 10]);
    }
    for replica in 0..4 {
        assert_eq!(group.replicas[replica].commit_op(), 5);
    }
    let commit_chain = group.replicas[1].commit_chain();
    for (replica, durable_op) in [(0u8, 2u64), (1, 5), (2, 5), (3, 2)] {
        group.restart(replica, durable_op);
    }
    assert_eq!(group.replicas[3].commit_op(), 2);
    for _ in 0..3 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    for replica in 0..4 {
        let core = &group.replicas[replica];
        assert_eq!(core.commit_op(), 5, "replica {replica}");
        assert_eq!(core.commit_chain(), commit_chain, "replica {replica}");
    }
    for replica in [0, 3] {
        let metrics = group.replicas[replica].metrics();
        assert_eq!(
            metrics.catchup_ops_applied, 3,
            "replica {replica}: ops 3..=5"
        );
        assert_eq!(metrics.commit_proofs_applied, 0, "no peer held a proof");
    }
    let served: u64 = [1, 2]
        .iter()
        .map(|replica| group.replicas[*replica].metrics().catchup_serves)
        .sum();
    assert!(served > 0);
    // A forged catch-up op (one Commit short of a quorum) is refused.
    group.restart(3, 2);
    group.lying_server = Some(1);
    group.silent = vec![0, 2];
    group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    assert_eq!(
        group.replicas[3].commit_op(),
        2,
        "a lying server moves nothing"
    );
}

/// Every replica restarts between views (each in the view its guard names, awaiting a
/// NewView none of them holds, and none may sign its lost ViewChange again). Each counts
/// the peers whose `Status` reports an older view as changing too, so they move on to the
/// next view together and commit again. Before, each waited for the others forever.
#[test]
fn bft_group_restarted_between_views_moves_to_the_next_view() {
    let mut group = Group::new(4, 1);
    group.propose(0, b"view 0");
    group.silent.push(0);
    for replica in 1..4 {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    let view = group.replicas[1].view();
    assert!(view >= 1);
    let leader = group.replicas[1].leader();
    group.propose(leader, b"in the new view");
    group.silent.clear();
    for replica in 0..4u8 {
        let durable_op = group.replicas[usize::from(replica)].commit_op();
        group.restart(replica, durable_op);
    }
    for replica in 1..4 {
        assert_eq!(group.replicas[replica].status(), Status::ViewChange);
        assert_eq!(group.replicas[replica].view(), view);
    }
    for _ in 0..20 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    let moved_on = group.replicas[1].view();
    assert!(moved_on > view, "the group left view {view}");
    for replica in 0..4 {
        assert_eq!(
            group.replicas[replica].status(),
            Status::Normal,
            "{replica}"
        );
        assert_eq!(group.replicas[replica].view(), moved_on, "{replica}");
    }
    let leader = group.replicas[1].leader();
    let op = group.propose(leader, b"after the restart");
    for replica in 0..4 {
        assert_eq!(group.replicas[replica].commit_op(), op, "replica {replica}");
    }
}

/// A new leader that has not executed the ops of its NewView's plan proposes nothing: its
/// driver stamps client batches from the state executed so far (plus its own proposals),
/// and the plan's ops are neither, so a batch proposed then could carry timestamps below
/// theirs (found by the whole-cluster restart test, where timestamps after a restart come
/// from the ledger's last one, not the clock).
#[test]
fn bft_new_leader_proposes_only_once_it_executed_the_plan() {
    let mut group = Group::new(4, 1);
    // Replica 1, the next leader, misses ops 1..=3.
    group.silent = vec![1];
    for round in 0..3u8 {
        group.propose(0, &[round; 10]);
    }
    assert_eq!(group.replicas[1].commit_op(), 0);
    // The leader goes silent; replica 1 hears the view change but no vote or proof.
    group.silent = vec![0];
    group.votes_withheld_from = Some(1);
    for replica in 1..4 {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    for _ in 0..20 {
        group.tick_all(50_000);
        if group.replicas[1].view() == 1 && group.replicas[1].status() == Status::Normal {
            break;
        }
    }
    let leader = &mut group.replicas[1];
    assert_eq!((leader.view(), leader.status()), (1, Status::Normal));
    assert_eq!(leader.leader(), 1);
    assert_eq!(
        leader.commit_op(),
        0,
        "the plan's ops 1..=3 are not executed here"
    );
    assert!(!leader.is_ready_leader());
    let mut actions = Vec::new();
    assert_eq!(
        leader.propose(group.now_us, b"too early".to_vec(), &mut actions),
        Err(BftError::WindowFull)
    );
    // The votes arrive: the plan's ops execute, then it proposes.
    group.votes_withheld_from = None;
    for _ in 0..3 {
        group.tick_all(RESEND_INTERVAL_US_DEFAULT);
    }
    assert_eq!(group.replicas[1].commit_op(), 3);
    assert!(group.replicas[1].is_ready_leader());
    let op = group.propose(1, b"after the plan");
    assert_eq!(op, 4);
    for replica in 1..4 {
        assert_eq!(group.replicas[replica].commit_op(), 4, "replica {replica}");
    }
}

#[test]
fn bft_checkpoint_votes_wait_for_durability_when_it_is_reported() {
    let mut config = BftConfig::new(GROUP, 1);
    config.durability_reported = true;
    let keys = keys(4);
    let mut replica = BftReplica::new(config, committee(4, 1), keys[1].clone(), 0).expect("ok");
    let interval = config.checkpoint_interval_ops;
    let mut checkpoints = Vec::new();
    for op in 1..=interval {
        let batch = [op as u8; 8];
        let digest = batch_digest(&batch);
        let pre_prepare = Vote::sign(&keys[0], GROUP, VoteKind::PrePrepare, 0, 0, op, digest);
        let commits = [0u8, 2, 3]
            .iter()
            .map(|signer| {
                Vote::sign(
                    &keys[usize::from(*signer)],
                    GROUP,
                    VoteKind::Commit,
                    *signer,
                    0,
                    op,
                    digest,
                )
            })
            .collect();
        let mut actions = Vec::new();
        replica
            .on_message(
                0,
                0,
                Message::CommitProof {
                    pre_prepare,
                    cert: CommitCert { commits },
                    batch: batch.to_vec(),
                },
                &mut actions,
            )
            .expect("commit proof");
        checkpoints.extend(
            actions
                .iter()
                .filter(|action| {
                    matches!(
                        action,
                        Action::Broadcast {
                            message: Message::Checkpoint(_)
                        }
                    )
                })
                .cloned(),
        );
    }
    assert_eq!(replica.commit_op(), interval);
    assert!(checkpoints.is_empty(), "not durable yet: {checkpoints:?}");
    let mut actions = Vec::new();
    replica.on_durable(0, interval - 1, &mut actions);
    assert!(actions.is_empty());
    replica.on_durable(0, interval, &mut actions);
    assert!(matches!(
        actions.as_slice(),
        [Action::Broadcast { message: Message::Checkpoint(vote) }]
            if vote.op == interval && vote.digest == replica.commit_chain()
    ));
}

/// A disk that lags: the core hands the driver at most `commits_undurable_ops_max`
/// committed ops not yet reported durable, and goes on as they become durable. Without the
/// bound every committed op in the window went out at once, and a window moved by other
/// replicas' checkpoint certificates kept the driver's queue growing.
#[test]
fn bft_execution_waits_for_durability_beyond_the_undurable_bound() {
    const BOUND: u64 = 4;
    let mut config = BftConfig::new(GROUP, 1);
    config.durability_reported = true;
    config.commits_undurable_ops_max = BOUND;
    let keys = keys(4);
    let mut replica = BftReplica::new(config, committee(4, 1), keys[1].clone(), 0).expect("ok");
    let commits = |actions: &[Action]| -> Vec<u64> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Commit { op, .. } => Some(*op),
                _ => None,
            })
            .collect()
    };
    let mut handed = Vec::new();
    for op in 1..=10u64 {
        let batch = [op as u8; 8];
        let digest = batch_digest(&batch);
        let pre_prepare = Vote::sign(&keys[0], GROUP, VoteKind::PrePrepare, 0, 0, op, digest);
        let cert = CommitCert {
            commits: [0u8, 2, 3]
                .iter()
                .map(|signer| {
                    let key = &keys[usize::from(*signer)];
                    Vote::sign(key, GROUP, VoteKind::Commit, *signer, 0, op, digest)
                })
                .collect(),
        };
        let mut actions = Vec::new();
        let proof = Message::CommitProof {
            pre_prepare,
            cert,
            batch: batch.to_vec(),
        };
        replica
            .on_message(0, 0, proof, &mut actions)
            .expect("commit proof");
        handed.extend(commits(&actions));
    }
    assert_eq!(
        handed,
        (1..=BOUND).collect::<Vec<_>>(),
        "nothing durable yet"
    );
    assert_eq!(replica.commit_op(), BOUND);
    assert!(replica.metrics().commits_held_for_durability > 0);
    let mut actions = Vec::new();
    replica.on_durable(0, 2, &mut actions);
    assert_eq!(
        commits(&actions),
        vec![5, 6],
        "two durable, two more handed over"
    );
    let mut actions = Vec::new();
    replica.on_durable(0, 6, &mut actions);
    assert_eq!(commits(&actions), vec![7, 8, 9, 10]);
    assert_eq!(replica.commit_op(), 10);
}

/// Replica 3 is down while the others commit past several checkpoints (beyond its window):
/// its peers answer its Status with their stable checkpoint, it fetches the missing ops
/// from one peer by `StateRequest`, verifies each commit certificate, reaches the
/// checkpoint's chain digest, then catches up the rest by CommitProofs and votes again.
#[test]
fn bft_replica_behind_the_window_catches_up_by_state_transfer() {
    let mut group = Group::new(4, 1);
    group.transfers_allowed = true;
    group.silent.push(3);
    let interval = CHECKPOINT_INTERVAL_OPS_DEFAULT;
    let ops = 3 * interval + 5;
    for round in 0..ops {
        group.propose(0, &round.to_le_bytes());
    }
    assert_eq!(group.replicas[0].commit_op(), ops);
    assert_eq!(group.replicas[0].low(), 3 * interval);
    assert_eq!(group.replicas[3].commit_op(), 0);
    group.silent.clear();
    for _ in 0..4 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    let caught_up = &group.replicas[3];
    assert_eq!(caught_up.commit_op(), ops);
    assert_eq!(caught_up.commit_chain(), group.replicas[0].commit_chain());
    assert_eq!(caught_up.low(), 3 * interval);
    assert!(caught_up.state_transfer().is_none());
    let metrics = *caught_up.metrics();
    assert_eq!(metrics.state_transfers_completed, 1);
    assert_eq!(metrics.state_ops_applied, 3 * interval);
    assert_eq!(
        metrics.state_requests,
        3 * interval / CATCHUP_OPS_MAX_DEFAULT,
        "one request per chunk: the first peer answered each"
    );
    assert_eq!(
        metrics.commit_proofs_applied, 5,
        "the rest from CommitProofs"
    );
    assert_eq!(
        group.committed[3], group.committed[0],
        "every op once, in order"
    );
    // It votes again: with replica 2 silent, the group commits only with it.
    group.silent.push(2);
    let op = group.propose(0, b"needs replica 3");
    assert_eq!(group.replicas[3].commit_op(), op);
    assert_eq!(group.replicas[0].commit_op(), op);
}

/// The first peer asked lies (certificates one Commit short of a quorum): nothing of its answer is executed, and after the retry interval the
/// transfer asks the next peer and completes.
#[test]
fn bft_state_transfer_refuses_forged_ops_and_asks_another_peer() {
    let mut group = Group::new(4, 1);
    group.transfers_allowed = true;
    group.silent.push(3);
    let interval = CHECKPOINT_INTERVAL_OPS_DEFAULT;
    for round in 0..3 * interval {
        group.propose(0, &round.to_le_bytes());
    }
    group.silent.clear();
    group.lying_server = Some(0);
    group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    assert_eq!(
        group.replicas[3].commit_op(),
        0,
        "nothing forged is executed"
    );
    assert!(group.replicas[3].state_transfer().is_some());
    assert!(
        group
            .errors
            .contains(&BftError::InvalidCertificate("wrong number of votes")),
        "{:?}",
        group.errors
    );
    group.tick_all(STATE_TRANSFER_RETRY_US_DEFAULT);
    let caught_up = &group.replicas[3];
    assert_eq!(caught_up.commit_op(), 3 * interval);
    assert_eq!(caught_up.commit_chain(), group.replicas[1].commit_chain());
    assert_eq!(caught_up.low(), 3 * interval);
    assert_eq!(caught_up.metrics().state_transfers_completed, 1);
    assert_eq!(group.committed[3], group.committed[1]);
}

/// With durability reported, a transfer asks for its next ops only once the ops it
/// executed are durable (the driver's commit queue stays bounded); a peer serves only
/// durable ops.
#[test]
fn bft_state_transfer_waits_for_durability_between_requests() {
    let keys = keys(4);
    let mut config = BftConfig::new(GROUP, 3);
    config.durability_reported = true;
    let mut replica = BftReplica::new(config, committee(4, 1), keys[3].clone(), 0).expect("ok");
    let interval = config.checkpoint_interval_ops;
    let target = 2 * interval;
    let mut chain = message::CHAIN_GENESIS;
    let mut ops = Vec::new();
    for op in 1..=target {
        let batch = op.to_le_bytes().to_vec();
        let digest = batch_digest(&batch);
        chain = chain_digest(&chain, op, &digest);
        let commits = (0..3u8)
            .map(|signer| {
                Vote::sign(
                    &keys[usize::from(signer)],
                    GROUP,
                    VoteKind::Commit,
                    signer,
                    0,
                    op,
                    digest,
                )
            })
            .collect();
        ops.push((CommitCert { commits }, batch));
    }
    let cert = CheckpointCert {
        votes: (0..3u8)
            .map(|signer| {
                Vote::sign(
                    &keys[usize::from(signer)],
                    GROUP,
                    VoteKind::Checkpoint,
                    signer,
                    0,
                    target,
                    chain,
                )
            })
            .collect(),
    };
    let mut actions = Vec::new();
    replica
        .on_message(0, 0, Message::CheckpointProof(cert), &mut actions)
        .expect("proof");
    assert!(matches!(
        actions.as_slice(),
        [
            Action::StateTransfer { .. },
            Action::Send {
                to: 0,
                message: Message::StateRequest { from_op: 1, to_op }
            }
        ] if *to_op == interval
    ));
    actions.clear();
    replica
        .on_message(
            0,
            0,
            Message::StateOps(ops[..interval as usize].to_vec()),
            &mut actions,
        )
        .expect("ops");
    assert_eq!(replica.commit_op(), interval);
    assert_eq!(
        actions
            .iter()
            .filter(|action| matches!(action, Action::Commit { .. }))
            .count(),
        interval as usize
    );
    assert!(
        !actions
            .iter()
            .any(|action| matches!(action, Action::Send { .. })),
        "no request before the ops are durable"
    );
    // Not durable: a peer's request is served only for durable ops (none yet).
    actions.clear();
    let request = Message::StateRequest {
        from_op: 1,
        to_op: 4,
    };
    assert_eq!(
        replica.on_message(0, 1, request.clone(), &mut actions),
        Err(BftError::Stale)
    );
    // Durable: its checkpoint vote (op 16 is in its window) and the next request.
    replica.on_durable(0, interval, &mut actions);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Broadcast {
                message: Message::Checkpoint(vote)
            },
            Action::Send {
                to: 0,
                message: Message::StateRequest { from_op, to_op }
            }
        ] if vote.op == interval && *from_op == interval + 1 && *to_op == target
    ));
    actions.clear();
    replica
        .on_message(0, 1, request, &mut actions)
        .expect("served");
    assert_eq!(
        actions,
        vec![Action::ServeState {
            to: 1,
            from_op: 1,
            to_op: 4
        }]
    );
    actions.clear();
    replica
        .on_message(
            0,
            0,
            Message::StateOps(ops[interval as usize..].to_vec()),
            &mut actions,
        )
        .expect("ops");
    assert_eq!(replica.commit_op(), target);
    assert_eq!(replica.low(), target, "the checkpoint is adopted");
    assert!(replica.state_transfer().is_none());
}

/// A peer that floods `StateRequest`s is served at most its budget: at one instant
/// `STATE_SERVE_BURST_REQUESTS` full requests, every later one refused with a typed error
/// and counted; after the refill time of one request it is served one more. Another
/// peer's budget is its own.
#[test]
fn bft_state_requests_beyond_a_peers_serve_budget_are_refused() {
    let mut group = Group::new(4, 1);
    let ops = 2 * CATCHUP_OPS_MAX_DEFAULT;
    for round in 0..ops {
        group.propose(0, &round.to_le_bytes());
    }
    let config = *group.replicas[0].config();
    let catchup = config.catchup_ops_max;
    assert_eq!(
        config.serve_budget_ops(),
        STATE_SERVE_BURST_REQUESTS * catchup
    );
    let request = Message::StateRequest {
        from_op: 1,
        to_op: u64::MAX,
    };
    let served = |replica: &mut BftReplica, now_us: u64, from: u8, tries: u64| {
        let mut actions = Vec::new();
        let mut refused = 0;
        for _ in 0..tries {
            match replica.on_message(now_us, from, request.clone(), &mut actions) {
                Ok(()) => {}
                Err(error) => {
                    assert_eq!(
                        error,
                        BftError::ServeBudgetExhausted {
                            peer: from,
                            ops: catchup
                        }
                    );
                    refused += 1;
                }
            }
        }
        for action in &actions {
            assert_eq!(
                *action,
                Action::ServeState {
                    to: from,
                    from_op: 1,
                    to_op: catchup
                }
            );
        }
        assert_eq!(actions.len() as u64 + refused, tries);
        actions.len() as u64
    };
    let flood = 100;
    let start_us = group.now_us;
    let replica = &mut group.replicas[0];
    assert_eq!(
        served(replica, start_us, 3, flood),
        STATE_SERVE_BURST_REQUESTS
    );
    let refused = flood - STATE_SERVE_BURST_REQUESTS;
    assert_eq!(replica.metrics().state_serves_refused, refused);
    assert_eq!(
        replica.metrics().invalid,
        0,
        "a refusal is not a bad message"
    );
    // Another peer is served from its own budget, at the same instant.
    assert_eq!(served(replica, start_us, 2, 1), 1);
    // One request's refill time (rounded up): one more request, no more.
    let refill_us = (catchup * 1_000_000).div_ceil(config.state_serve_ops_per_s);
    assert_eq!(served(replica, start_us + refill_us - 1, 3, 1), 0);
    assert_eq!(served(replica, start_us + refill_us, 3, flood), 1);
    // Idle long enough to refill it all: a full burst again, never more.
    let later_us = start_us + 1_000_000;
    assert_eq!(
        served(replica, later_us, 3, flood),
        STATE_SERVE_BURST_REQUESTS
    );
    assert_eq!(
        replica.metrics().state_serves_refused,
        refused + 1 + (flood - 1) + (flood - STATE_SERVE_BURST_REQUESTS)
    );
}

/// A serve budget of zero ops per second would refuse every state transfer: the config
/// check refuses it.
#[test]
fn bft_config_refuses_a_zero_serve_rate() {
    let mut config = BftConfig::new(GROUP, 0);
    config.state_serve_ops_per_s = 0;
    assert_eq!(
        config.validate(&committee(4, 1)),
        Err(BftError::Limit("state_serve_ops_per_s"))
    );
}

/// The chain digest of `committed` through `op`.
fn chain_through(committed: &[(u64, Digest)], op: u64) -> Digest {
    committed
        .iter()
        .take_while(|(at, _)| *at <= op)
        .fold(message::CHAIN_GENESIS, |chain, (at, digest)| {
            chain_digest(&chain, *at, digest)
        })
}

fn statement_at(group: &Group, replica: u8, op: u64) -> SnapshotStatement {
    SnapshotStatement {
        op,
        chain: chain_through(&group.committed[usize::from(replica)], op),
        journal_op: op - 2,
        state_digest: [7; 32],
    }
}

fn state_votes(statement: &SnapshotStatement, signers: &[u8]) -> Vec<Vote> {
    let keys = keys(4);
    signers
        .iter()
        .map(|replica| {
            Vote::sign(
                &keys[usize::from(*replica)],
                GROUP,
                VoteKind::StateCheckpoint,
                *replica,
                0,
                statement.op,
                statement.digest(),
            )
        })
        .collect()
}

/// A state certificate holds `quorum` `StateCheckpoint` votes on the digest of the
/// statement it carries: a different state digest, votes for another statement mixed in,
/// too few votes, and votes of another kind on the same bytes are all refused.
#[test]
fn bft_state_certificates_verify_the_statement_and_its_kind() {
    let committee = committee(4, 1);
    let statement = SnapshotStatement {
        op: 64,
        chain: [3; 32],
        journal_op: 60,
        state_digest: [9; 32],
    };
    let cert = StateCert {
        statement,
        votes: state_votes(&statement, &[0, 1, 2]),
    };
    assert_eq!(committee.verify_state(&cert), Ok(()));
    // Another state digest (or chain, or journal op) than the one signed.
    for other in [
        SnapshotStatement {
            state_digest: [8; 32],
            ..statement
        },
        SnapshotStatement {
            chain: [4; 32],
            ..statement
        },
        SnapshotStatement {
            journal_op: 61,
            ..statement
        },
    ] {
        let forged = StateCert {
            statement: other,
            votes: cert.votes.clone(),
        };
        assert_eq!(
            committee.verify_state(&forged),
            Err(BftError::InvalidCertificate(
                "state: votes do not sign the statement"
            ))
        );
    }
    // Two votes for the statement, one for another state digest.
    let other = SnapshotStatement {
        state_digest: [8; 32],
        ..statement
    };
    let mut mixed = cert.clone();
    mixed.votes[2] = state_votes(&other, &[2])[0];
    assert_eq!(
        committee.verify_state(&mixed),
        Err(BftError::InvalidCertificate("votes do not match"))
    );
    let mut short = cert.clone();
    short.votes.pop();
    assert_eq!(
        committee.verify_state(&short),
        Err(BftError::InvalidCertificate("wrong number of votes"))
    );
    let mut twice = cert.clone();
    twice.votes[2] = twice.votes[1];
    assert_eq!(
        committee.verify_state(&twice),
        Err(BftError::InvalidCertificate("a replica signed twice"))
    );
    // Domain separation: Checkpoint votes on the same (op, digest) are not state votes,
    // and a state vote relabelled as a Checkpoint (or back) fails its signature.
    let keys = keys(4);
    let checkpoint_votes: Vec<Vote> = (0..3u8)
        .map(|replica| {
            Vote::sign(
                &keys[usize::from(replica)],
                GROUP,
                VoteKind::Checkpoint,
                replica,
                0,
                64,
                statement.digest(),
            )
        })
        .collect();
    let as_state = StateCert {
        statement,
        votes: checkpoint_votes.clone(),
    };
    assert!(committee.verify_state(&as_state).is_err());
    let mut relabelled = cert.votes[0];
    relabelled.kind = VoteKind::Checkpoint;
    assert_eq!(
        committee.verify_vote(&relabelled),
        Err(BftError::BadSignature {
            replica: 0,
            kind: VoteKind::Checkpoint
        })
    );
    let mut relabelled = checkpoint_votes[0];
    relabelled.kind = VoteKind::StateCheckpoint;
    assert!(committee.verify_vote(&relabelled).is_err());
    assert!(
        committee
            .verify_checkpoint(&CheckpointCert {
                votes: cert.votes.clone()
            })
            .is_err(),
        "state votes do not make a checkpoint certificate"
    );
    assert_ne!(
        Vote::signing_bytes(GROUP, VoteKind::Checkpoint, 0, 0, 64, &statement.digest()),
        Vote::signing_bytes(
            GROUP,
            VoteKind::StateCheckpoint,
            0,
            0,
            64,
            &statement.digest()
        )
    );
}

/// Replicas sign snapshot statements; `quorum` matching ones make a state certificate, a
/// replica signing two statements for one op is caught.
#[test]
fn bft_state_votes_make_a_certificate_and_conflicting_ones_are_evidence() {
    let mut group = Group::new(4, 1);
    for round in 0..CHECKPOINT_INTERVAL_OPS_DEFAULT {
        group.propose(0, &round.to_le_bytes());
    }
    let statement = statement_at(&group, 0, 16);
    for replica in 0..2u8 {
        let mut actions = Vec::new();
        group.replicas[usize::from(replica)].sign_snapshot(group.now_us, statement, &mut actions);
        group.absorb(replica, actions);
        group.deliver_all();
    }
    assert!(
        group
            .replicas
            .iter()
            .all(|replica| replica.state_cert().is_none()),
        "two votes are not a quorum"
    );
    // Replica 3 signs another state digest for op 16 to replica 0 only: evidence there.
    let lie = SnapshotStatement {
        state_digest: [6; 32],
        ..statement
    };
    let vote = state_votes(&lie, &[3])[0];
    let mut actions = Vec::new();
    group.replicas[0]
        .on_message(
            group.now_us,
            3,
            Message::StateCheckpoint {
                vote,
                statement: lie,
            },
            &mut actions,
        )
        .expect("a first vote from replica 3");
    group.absorb(0, actions);
    let mut actions = Vec::new();
    group.replicas[2].sign_snapshot(group.now_us, statement, &mut actions);
    group.absorb(2, actions);
    group.deliver_all();
    for replica in 0..3 {
        let cert = group.replicas[replica].state_cert().expect("certified");
        assert_eq!(cert.statement, statement);
        assert_eq!(cert.votes.len(), 3);
        assert_eq!(committee(4, 1).verify_state(cert), Ok(()));
    }
    // The honest vote of replica 3 for op 16 now conflicts with its lie at replica 0 —
    // but replica 0 already holds a certificate for op 16, so it is stale there. A lie for
    // a later op is caught once the honest vote arrives.
    let later = SnapshotStatement {
        op: 17,
        ..statement
    };
    let honest = state_votes(&later, &[3])[0];
    let forged = state_votes(
        &SnapshotStatement {
            state_digest: [5; 32],
            ..later
        },
        &[3],
    )[0];
    let mut actions = Vec::new();
    let replica = &mut group.replicas[1];
    replica
        .on_message(
            0,
            3,
            Message::StateCheckpoint {
                vote: honest,
                statement: later,
            },
            &mut actions,
        )
        .expect("first");
    assert_eq!(
        replica.on_message(
            0,
            3,
            Message::StateCheckpoint {
                vote: forged,
                statement: SnapshotStatement {
                    state_digest: [5; 32],
                    ..later
                },
            },
            &mut actions,
        ),
        Err(BftError::Equivocation(3))
    );
    assert_eq!(replica.evidence().len(), 1);
    assert_eq!(replica.evidence()[0].first.kind, VoteKind::StateCheckpoint);
    // A vote whose statement is not what it signs is refused.
    assert_eq!(
        replica.on_message(
            0,
            3,
            Message::StateCheckpoint {
                vote: honest,
                statement: SnapshotStatement { op: 18, ..later },
            },
            &mut actions,
        ),
        Err(BftError::WrongSender("not a state checkpoint"))
    );
}

/// Replica 3 is down while the others commit `3K + 5` ops and forget the first 32 from
/// their logs. Its transfer is answered with the state certificate at op 32; the first
/// fetch fails (a lying or silent peer, as the driver reports) and costs one retry with
/// the next peer; the second is installed, and the ops above come by log.
#[test]
fn bft_replica_behind_every_log_catches_up_from_a_certified_snapshot() {
    let mut group = Group::new(4, 1);
    group.transfers_allowed = true;
    group.silent.push(3);
    let interval = CHECKPOINT_INTERVAL_OPS_DEFAULT;
    let ops = 3 * interval + 5;
    for round in 0..ops {
        group.propose(0, &round.to_le_bytes());
    }
    let statement = statement_at(&group, 0, 2 * interval);
    for replica in 0..3u8 {
        let mut actions = Vec::new();
        group.replicas[usize::from(replica)].sign_snapshot(group.now_us, statement, &mut actions);
        group.absorb(replica, actions);
        group.deliver_all();
        group.log_floor[usize::from(replica)] = 2 * interval;
    }
    group.silent.clear();
    group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    assert_eq!(group.fetches.len(), 1, "one snapshot fetch at a time");
    let (replica, first_peer, cert) = group.fetches[0].clone();
    assert_eq!(replica, 3);
    assert_eq!(cert.statement, statement);
    assert_eq!(group.replicas[3].commit_op(), 0);
    // Nothing is asked while the driver fetches, however long it takes.
    let requests = group.replicas[3].metrics().state_requests;
    group.tick_all(10 * STATE_TRANSFER_RETRY_US_DEFAULT);
    assert_eq!(group.replicas[3].metrics().state_requests, requests);
    // The first peer's bytes did not restore to the certified digest: the next peer.
    let mut actions = Vec::new();
    group.replicas[3].on_snapshot_failed(group.now_us, &mut actions);
    assert!(actions.iter().any(|action| matches!(
        action,
        Action::Send { to, message: Message::StateRequest { from_op: 1, .. } } if *to != first_peer
    )));
    group.absorb(3, actions);
    group.deliver_all();
    assert_eq!(group.fetches.len(), 2);
    assert_ne!(group.fetches[1].1, first_peer);
    let mut actions = Vec::new();
    assert_eq!(
        group.replicas[3].on_snapshot_installed(
            group.now_us,
            &SnapshotStatement {
                op: 31,
                ..statement
            },
            &mut actions
        ),
        Err(BftError::Stale),
        "only the snapshot asked for"
    );
    group.replicas[3]
        .on_snapshot_installed(group.now_us, &statement, &mut actions)
        .expect("installed");
    group.absorb(3, actions);
    group.deliver_all();
    for _ in 0..4 {
        group.tick_all(STATUS_INTERVAL_US_DEFAULT);
    }
    let caught_up = &group.replicas[3];
    assert_eq!(caught_up.commit_op(), ops);
    assert_eq!(caught_up.commit_chain(), group.replicas[0].commit_chain());
    assert_eq!(caught_up.low(), 3 * interval);
    assert!(caught_up.state_transfer().is_none());
    let metrics = *caught_up.metrics();
    assert_eq!(metrics.snapshot_fetches, 2);
    assert_eq!(metrics.snapshot_fetches_failed, 1);
    assert_eq!(metrics.snapshot_installs, 1);
    assert_eq!(metrics.state_transfers_completed, 1);
    assert_eq!(metrics.state_ops_applied, interval, "ops 33..=48 by log");
    assert_eq!(
        group.committed[3],
        group.committed[0][2 * interval as usize..],
        "every op above the snapshot once, in order"
    );
    // It votes again: with replica 2 silent, the group commits only with it.
    group.silent.push(2);
    let op = group.propose(0, b"needs replica 3");
    assert_eq!(group.replicas[3].commit_op(), op);
}

/// A restarted replica whose journal starts at an installed snapshot restores above it.
#[test]
fn bft_replica_restores_above_an_installed_snapshot() {
    let mut group = Group::new(4, 1);
    for round in 0..20u64 {
        group.propose(0, &round.to_le_bytes());
    }
    let base = (10, chain_through(&group.committed[0], 10));
    let digests: Vec<Digest> = group.committed[0][10..].iter().map(|(_, d)| *d).collect();
    let restored = Restored {
        low_cert: None,
        digests,
        guard: VoteGuard::default(),
        prepared: Vec::new(),
    };
    let replica = BftReplica::restore_above(
        BftConfig::new(GROUP, 3),
        committee(4, 1),
        keys(4)[3].clone(),
        0,
        Some(base),
        restored.clone(),
    )
    .expect("restore");
    assert_eq!(replica.commit_op(), 20);
    assert_eq!(replica.commit_chain(), group.replicas[0].commit_chain());
    assert_eq!(replica.low(), 0);
    let low_cert = group.replicas[0].low_cert().cloned();
    assert_eq!(low_cert.as_ref().map(CheckpointCert::op), Some(16));
    let below = BftReplica::restore_above(
        BftConfig::new(GROUP, 3),
        committee(4, 1),
        keys(4)[3].clone(),
        0,
        Some(base),
        Restored {
            low_cert,
            ..restored
        },
    );
    assert!(below.is_err(), "a snapshot below the checkpoint is refused");
}

/// Batches as a leader proposes them, with records of `AUTH_RECORD_BYTES`.
const AUTH_RECORD_BYTES: usize = 16;

fn client_secrets() -> Vec<SigningKey> {
    (0..3u8)
        .map(|client| SigningKey::from_bytes(&[100 + client; 32]))
        .collect()
}

/// A group whose every replica checks client signatures before it votes.
fn authenticating_group() -> Group {
    let mut group = Group::new(4, 1);
    let clients = ClientKeys::new(
        client_secrets()
            .iter()
            .map(SigningKey::verifying_key)
            .collect(),
    );
    for replica in &mut group.replicas {
        replica.set_proposal_check(Box::new(RequestVerifier::new(
            GROUP,
            clients.clone(),
            AUTH_RECORD_BYTES,
            None,
        )));
    }
    group
}

#[test]
fn bft_backups_refuse_proposals_with_forged_client_requests_and_the_view_changes() {
    let mut group = authenticating_group();
    let secrets = client_secrets();
    let honest = request::tests::signed_batch(GROUP, &secrets, &[(1, 1, 2), (2, 5, 1)]);
    let parts = request::batch_decode(&honest).expect("signed batch");
    let requests_at = request::BATCH_HEADER_BYTES + parts.records.len();
    let mut unsigned = Vec::new();
    request::batch_encode(3, parts.records, parts.requests, &[], &mut unsigned);
    let mut tampered = honest.clone();
    tampered[request::BATCH_HEADER_BYTES + 1] ^= 0x80; // a record changed after signing
    let mut renumbered = honest.clone();
    renumbered[requests_at + 16] += 1; // client 1's request number
    let mut impersonated = honest.clone();
    impersonated[requests_at] = 3; // client 1's request under client 3's id
    let forged = [&unsigned, &tampered, &renumbered, &impersonated];
    // Leader 0 is Byzantine: its core signs whatever its driver hands it.
    for batch in forged {
        group.propose(0, batch);
    }
    let refused: Vec<(u64, RequestAuthError)> = group
        .errors
        .iter()
        .filter_map(|error| match error {
            BftError::ProposalRefused { op, error } => Some((*op, *error)),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 3 * forged.len(), "{:?}", group.errors);
    for backup in 1..4 {
        let replica = &group.replicas[backup];
        assert_eq!(replica.metrics().proposals_refused, forged.len() as u64);
        assert_eq!(replica.commit_op(), 0, "nothing forged commits");
    }
    assert!(refused.contains(&(1, RequestAuthError::Unsigned)));
    assert!(refused.contains(&(
        2,
        RequestAuthError::BadSignature {
            client_id: 1,
            request_number: 1
        }
    )));
    assert!(refused.contains(&(
        3,
        RequestAuthError::BadSignature {
            client_id: 1,
            request_number: 2
        }
    )));
    assert!(refused.contains(&(
        4,
        RequestAuthError::BadSignature {
            client_id: 3,
            request_number: 1
        }
    )));
    // No backup signed a Prepare for any of them.
    for backup in 1..4 {
        assert!(
            group.votes_sent[backup]
                .iter()
                .all(|vote| vote.kind != VoteKind::Prepare),
            "backup {backup} voted"
        );
    }
    // The leader owes those ops: with no client work pending, the progress timer still
    // runs out and the group moves to a correct leader, where an honest batch commits.
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    let leader = group.replicas[1].leader();
    assert_ne!(leader, 0, "the forging leader was replaced");
    for backup in 1..4 {
        assert_eq!(group.replicas[backup].status(), Status::Normal);
        // Resends of the refused proposals were dropped, not checked again.
        assert_eq!(
            group.replicas[backup].metrics().proposals_refused,
            forged.len() as u64
        );
    }
    group.propose(leader, &honest);
    for replica in 1..4 {
        assert_eq!(
            group.committed[replica],
            vec![(1, batch_digest(&honest))],
            "replica {replica}"
        );
    }
}

/// Group 0 takes outputs of group 1 (same replicas and keys): every replica's check passes
/// client-signed batches and proven batches ([`xshard::SignedOrProven`]).
#[test]
fn bft_backups_vote_for_proven_batches_and_refuse_a_leaders_made_up_leg() {
    use xshard::{
        Groups, OutputsCert, OutputsStatement, OutputsVote, ProvenBatch, ProvenOutputs,
        SignedOrProven, encode_batch, outputs_digest,
    };
    const RECORD_BYTES: usize = 128;
    let mut group = Group::new(4, 1);
    let secrets = keys(4);
    let public: Vec<VerifyingKey> = secrets.iter().map(SigningKey::verifying_key).collect();
    let groups = Groups::new(2, 1, &public).expect("groups");
    let clients = ClientKeys::new(
        client_secrets()
            .iter()
            .map(SigningKey::verifying_key)
            .collect(),
    );
    for replica in &mut group.replicas {
        let client = RequestVerifier::new(GROUP, clients.clone(), AUTH_RECORD_BYTES, None);
        let check = SignedOrProven::new(client, groups.clone(), GROUP, RECORD_BYTES, 64);
        replica.set_proposal_check(Box::new(check.expect("check")));
    }
    let operation = 256; // the ledger's ApplyCreditLegs
    let proven = |signers: &[(u8, u8)], records: Vec<u8>| {
        let statement = OutputsStatement {
            origin: 1,
            destination: GROUP,
            op: 7,
            kind: xshard::OutputsKind::Op,
            digest: outputs_digest(1, GROUP, 7, operation, &records),
        };
        let signatures = signers
            .iter()
            .map(|&(key, claimed)| {
                let vote = OutputsVote::sign(&secrets[usize::from(key)], claimed, statement);
                (claimed, vote.signature)
            })
            .collect();
        let mut bytes = Vec::new();
        encode_batch(
            &ProvenBatch {
                operation,
                now_ns: 1_000,
                proofs: vec![ProvenOutputs {
                    cert: OutputsCert {
                        statement,
                        signatures,
                    },
                    operation,
                    records,
                }],
            },
            &mut bytes,
        );
        bytes
    };
    // Leader 0 is Byzantine: a made-up leg under its own key alone, and under its key
    // claimed for its peers.
    let made_up = [
        proven(&[(0, 0)], vec![7; RECORD_BYTES]),
        proven(&[(0, 0), (0, 1), (0, 2)], vec![7; RECORD_BYTES]),
    ];
    for batch in &made_up {
        group.propose(0, batch);
    }
    let refused: Vec<(u64, RequestAuthError)> = group
        .errors
        .iter()
        .filter_map(|error| match error {
            BftError::ProposalRefused { op, error } => Some((*op, *error)),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), 3 * made_up.len(), "{:?}", group.errors);
    assert!(refused.contains(&(1, RequestAuthError::Proven("signer count"))));
    assert!(refused.contains(&(2, RequestAuthError::Proven("bad outputs signature"))));
    for backup in 1..4 {
        assert_eq!(
            group.replicas[backup].commit_op(),
            0,
            "nothing made up commits"
        );
        assert_eq!(
            group.replicas[backup].metrics().proposals_refused,
            made_up.len() as u64
        );
    }
    // The group replaces the leader; a genuine proof of group 1 (three of its replicas
    // signed it) and a client-signed batch then commit, no client signature needed for
    // the first.
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    let leader = group.replicas[1].leader();
    assert_ne!(leader, 0, "the leader that made up a leg was replaced");
    let genuine = proven(&[(1, 1), (2, 2), (3, 3)], vec![7; RECORD_BYTES]);
    let honest = request::tests::signed_batch(GROUP, &client_secrets(), &[(1, 1, 2)]);
    group.propose(leader, &genuine);
    group.propose(leader, &honest);
    for replica in 1..4 {
        assert_eq!(
            group.committed[replica],
            vec![(1, batch_digest(&genuine)), (2, batch_digest(&honest))],
            "replica {replica}"
        );
    }
}

/// A ViewChange for the view a replica already runs gets its NewView in answer (a replica
/// still changing views is helped), but nothing in it is verified before that answer, so
/// the answer goes to the connection's authenticated sender only, never to the signer index
/// the message names, and at most once per half status interval: a forged index once made
/// the runtime index past its outboxes (a crash of every correct node), or made a replica
/// send its whole NewView to a peer that never asked, as often as a liar liked.
#[test]
fn bft_an_unverified_view_change_is_answered_only_to_its_sender_and_rarely() {
    let mut group = Group::new(4, 1);
    group.propose(0, b"one");
    group.silent.push(0);
    for replica in 1..4 {
        group.replicas[replica].set_pending(group.now_us, true);
    }
    for _ in 0..20 {
        group.tick_all(50_000);
    }
    let view = group.replicas[1].view();
    assert!(view >= 1 && group.replicas[1].status() == Status::Normal);
    let forged = |claimed: u8| {
        let mut vote = Vote::sign(
            &keys(4)[3],
            GROUP,
            VoteKind::ViewChange,
            claimed.min(3),
            view,
            0,
            [0; 32],
        );
        vote.replica = claimed;
        vote.signature = Signature::from_bytes(&[0x5a; 64]);
        Message::ViewChange(Box::new(ViewChange {
            vote,
            checkpoint: None,
            prepared: vec![],
        }))
    };
    // From replica 3's connection, naming replicas that do not exist or another one.
    for claimed in [4u8, 200, 2] {
        let mut actions = Vec::new();
        let _ = group.replicas[1].on_message(group.now_us, 3, forged(claimed), &mut actions);
        assert!(actions.is_empty(), "claimed {claimed}: {actions:?}");
    }
    // Naming itself: answered, to it, once per half status interval (Status answers to
    // it during the ticks above count too: later than those).
    group.now_us += 1_000_000;
    let sends_to_3 = |actions: &[Action]| {
        actions
            .iter()
            .filter(|action| {
                matches!(
                    action,
                    Action::Send {
                        to: 3,
                        message: Message::NewView(_)
                    }
                )
            })
            .count()
    };
    let mut actions = Vec::new();
    let _ = group.replicas[1].on_message(group.now_us, 3, forged(3), &mut actions);
    assert_eq!((actions.len(), sends_to_3(&actions)), (1, 1), "{actions:?}");
    for _ in 0..10 {
        let mut again = Vec::new();
        let _ = group.replicas[1].on_message(group.now_us, 3, forged(3), &mut again);
        assert!(again.is_empty(), "answered again at once: {again:?}");
    }
}
