//! Unit tests of the BFT core: a lossless in-memory group of 4 replicas, messages delivered
//! in FIFO order, time advanced by hand. The simulator (`tests/src/bft_sim/`) does the rest.

use std::collections::VecDeque;

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
    errors: Vec<BftError>,
    /// Replicas whose messages are dropped (crashed or silent).
    silent: Vec<u8>,
    now_us: u64,
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
            errors: Vec::new(),
            silent: Vec::new(),
            now_us: 0,
        }
    }

    fn absorb(&mut self, from: u8, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, message } => self.queue.push_back((from, to, message)),
                Action::Broadcast { message } => {
                    for to in 0..self.replicas.len() as u8 {
                        if to != from {
                            self.queue.push_back((from, to, message.clone()));
                        }
                    }
                }
                Action::Commit { op, digest, .. } => {
                    self.committed[usize::from(from)].push((op, digest))
                }
                Action::StateTransfer { .. } => panic!("no state transfer expected here"),
            }
        }
    }

    fn deliver_all(&mut self) {
        while let Some((from, to, message)) = self.queue.pop_front() {
            if self.silent.contains(&from) || self.silent.contains(&to) {
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
