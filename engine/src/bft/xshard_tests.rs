//! Tests of cross-group outputs: statements, certificates, the acceptance rules of proofs
//! and proven batches, the collector and the inbound queue, and a leg and its
//! acknowledgement carried between two ledgers by certificates only.

use bytemuck::Zeroable as _;
use proptest::prelude::*;

use super::*;
use crate::ledger::{Ledger, LedgerConfig, LedgerOperation};
use crate::record::{
    Account, CreditAckResult, CreditLegResult, RECORD_BYTES, RecordResult, RecordSlot, Transfer,
    account_flags, shard_of,
};
use crate::state_machine::StateMachine as _;

const REPLICAS: u8 = 4;
const GROUP_COUNT: u32 = 2;
/// The collectors' in-flight delivery delay in these tests (µs).
const IN_FLIGHT_DELIVER_AFTER_US: u64 = 50_000;
/// The groups' batch cap in these tests (records).
const BATCH_RECORDS_MAX: usize = 64;

fn keys(seed: u8) -> Vec<SigningKey> {
    (0..REPLICAS)
        .map(|replica| SigningKey::from_bytes(&[seed.wrapping_add(replica); 32]))
        .collect()
}

fn groups_of(keys: &[SigningKey]) -> Groups {
    let public: Vec<VerifyingKey> = keys.iter().map(SigningKey::verifying_key).collect();
    Groups::new(GROUP_COUNT, 1, &public).unwrap()
}

/// Records of `count` 128-byte records, each distinct.
fn records(count: usize, salt: u8) -> Vec<u8> {
    (0..count * RECORD_BYTES)
        .map(|at| (at as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// A proof of credit legs `records` from `origin` op `op` to `destination`, signed by
/// `signers`.
fn prove(
    keys: &[SigningKey],
    signers: &[u8],
    route: (u32, u32, u64),
    records: Vec<u8>,
) -> ProvenOutputs {
    prove_as(
        keys,
        signers,
        route,
        LedgerOperation::ApplyCreditLegs,
        records,
    )
}

/// A proof of `records` of `operation` from `origin` op `op` to `destination`, signed by
/// `signers`.
fn prove_as(
    keys: &[SigningKey],
    signers: &[u8],
    (origin, destination, op): (u32, u32, u64),
    operation: LedgerOperation,
    records: Vec<u8>,
) -> ProvenOutputs {
    let operation = operation as u16;
    let statement = OutputsStatement {
        origin,
        destination,
        op,
        kind: OutputsKind::Op,
        digest: outputs_digest(origin, destination, op, operation, &records),
    };
    let signatures = signers
        .iter()
        .map(|&replica| {
            let vote = OutputsVote::sign(&keys[usize::from(replica)], replica, statement);
            (replica, vote.signature)
        })
        .collect();
    ProvenOutputs {
        cert: OutputsCert {
            statement,
            signatures,
        },
        operation,
        records,
    }
}

#[test]
fn outputs_statements_are_domain_separated_from_votes() {
    let statement = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 7,
        kind: OutputsKind::Op,
        digest: [9; 32],
    };
    let bytes = statement.signing_bytes(2);
    assert_eq!(bytes.len(), OUTPUTS_SIGNING_BYTES);
    assert!(bytes.starts_with(OUTPUTS_SIGNING_DOMAIN));
    assert_ne!(OUTPUTS_SIGNING_BYTES, super::super::message::SIGNING_BYTES);
    assert!(!bytes.starts_with(super::super::message::SIGNING_DOMAIN));
    // Every field is bound.
    for other in [
        OutputsStatement {
            origin: 1,
            ..statement
        },
        OutputsStatement {
            destination: 0,
            ..statement
        },
        OutputsStatement { op: 8, ..statement },
        OutputsStatement {
            digest: [8; 32],
            ..statement
        },
    ] {
        assert_ne!(other.signing_bytes(2), bytes);
    }
    assert_ne!(statement.signing_bytes(3), bytes);
    // The digest binds the route, the op and the operation too.
    let legs = records(2, 0);
    let digest = outputs_digest(0, 1, 7, 256, &legs);
    assert_ne!(digest, outputs_digest(1, 0, 7, 256, &legs));
    assert_ne!(digest, outputs_digest(0, 1, 8, 256, &legs));
    assert_ne!(digest, outputs_digest(0, 1, 7, 257, &legs));
}

#[test]
fn a_quorum_certificate_of_the_origin_group_is_accepted() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let proof = prove(&keys, &[0, 2, 3], (0, 1, 5), records(3, 1));
    groups
        .verify_proven(&proof, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    // All four signatures are fine too; the order of signers does not matter.
    let proof = prove(&keys, &[3, 1, 0, 2], (0, 1, 5), records(3, 1));
    groups
        .verify_proven(&proof, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
}

#[test]
fn a_forged_or_altered_leg_is_refused() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let honest = prove(&keys, &[0, 1, 2], (0, 1, 5), records(2, 1));
    // A leg changed after certification (say, its amount): the digest no longer matches.
    let mut altered = honest.clone();
    altered.records[100] ^= 1;
    assert_eq!(
        groups.verify_proven(&altered, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DigestMismatch { origin: 0, op: 5 })
    );
    // A leg added to a certified output.
    let mut padded = honest.clone();
    padded.records.extend_from_slice(&records(1, 7));
    assert!(matches!(
        groups.verify_proven(&padded, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DigestMismatch { .. })
    ));
    // A made-up leg with a made-up digest: the signatures are over another statement.
    let mut made_up = honest.clone();
    made_up.records = records(2, 99);
    made_up.cert.statement.digest = outputs_digest(0, 1, 5, made_up.operation, &made_up.records);
    assert_eq!(
        groups.verify_proven(&made_up, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::BadSignature(0))
    );
    // The same records presented as another op's outputs.
    let mut moved = honest.clone();
    moved.cert.statement.op = 6;
    assert!(matches!(
        groups.verify_proven(&moved, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DigestMismatch { .. })
    ));
    // Another operation (an acknowledgement passed off as a leg).
    let mut relabelled = honest;
    relabelled.operation = LedgerOperation::AckCreditLegs as u16;
    assert!(matches!(
        groups.verify_proven(&relabelled, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DigestMismatch { .. })
    ));
}

#[test]
fn a_certificate_signed_with_other_keys_or_for_another_group_is_refused() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    // Signed by the replicas of another cluster.
    let stranger = prove(&self::keys(50), &[0, 1, 2], (0, 1, 5), records(1, 1));
    assert_eq!(
        groups.verify_proven(&stranger, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::BadSignature(0))
    );
    // One key of the three is a stranger's.
    let mut mixed = prove(&keys, &[0, 1, 2], (0, 1, 5), records(1, 1));
    mixed.cert.signatures[2].1 = stranger.cert.signatures[2].1;
    assert_eq!(
        groups.verify_proven(&mixed, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::BadSignature(2))
    );
    // Signed by the same replicas as group 1 about group 1's outputs to group 0, then
    // presented as group 0's outputs to group 1: the origin is signed in.
    let group_one = prove(&keys, &[0, 1, 2], (1, 0, 5), records(1, 1));
    let mut swapped = group_one.clone();
    swapped.cert.statement.origin = 0;
    swapped.cert.statement.destination = 1;
    swapped.cert.statement.digest = outputs_digest(0, 1, 5, swapped.operation, &swapped.records);
    assert_eq!(
        groups.verify_proven(&swapped, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::BadSignature(0))
    );
    // A group that does not exist, or a group messaging itself.
    let unknown = prove(&keys, &[0, 1, 2], (7, 1, 5), records(1, 1));
    assert_eq!(
        groups.verify_proven(&unknown, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::UnknownGroup(7))
    );
    let itself = prove(&keys, &[0, 1, 2], (1, 1, 5), records(1, 1));
    assert_eq!(
        groups.verify_proven(&itself, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::SameGroup(1))
    );
}

#[test]
fn too_few_repeated_or_unknown_signers_are_refused() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let short = prove(&keys, &[0, 1], (0, 1, 5), records(1, 1));
    assert_eq!(
        groups.verify_proven(&short, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::SignerCount {
            signers: 2,
            quorum: 3,
            replicas: 4
        })
    );
    let repeated = prove(&keys, &[0, 1, 1], (0, 1, 5), records(1, 1));
    assert_eq!(
        groups.verify_proven(&repeated, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DuplicateSigner(1))
    );
    let mut unknown = prove(&keys, &[0, 1, 2], (0, 1, 5), records(1, 1));
    unknown.cert.signatures[2].0 = 5;
    assert_eq!(
        groups.verify_proven(&unknown, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::UnknownSigner(5))
    );
    let mut too_many = prove(&keys, &[0, 1, 2, 3], (0, 1, 5), records(1, 1));
    too_many.cert.signatures.push(too_many.cert.signatures[0]);
    assert!(matches!(
        groups.verify_proven(&too_many, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::SignerCount { signers: 5, .. })
    ));
}

#[test]
fn a_leg_for_another_group_is_refused() {
    let keys = keys(1);
    let groups = Groups::new(
        3,
        1,
        &keys
            .iter()
            .map(SigningKey::verifying_key)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let for_two = prove(&keys, &[0, 1, 2], (0, 2, 5), records(1, 1));
    groups
        .verify_proven(&for_two, 2, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    assert_eq!(
        groups.verify_proven(&for_two, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::WrongDestination {
            destination: 2,
            receiver: 1
        })
    );
    // Readdressed: the destination is in the digest and in the signed statement.
    let mut readdressed = for_two.clone();
    readdressed.cert.statement.destination = 1;
    assert!(matches!(
        groups.verify_proven(&readdressed, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DigestMismatch { .. })
    ));
    readdressed.cert.statement.digest =
        outputs_digest(0, 1, 5, readdressed.operation, &readdressed.records);
    assert_eq!(
        groups.verify_proven(&readdressed, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::BadSignature(0))
    );
}

#[test]
fn records_must_be_whole_and_present() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    for bytes in [0, RECORD_BYTES - 1, RECORD_BYTES + 1] {
        let proof = prove(&keys, &[0, 1, 2], (0, 1, 5), vec![1; bytes]);
        assert_eq!(
            groups.verify_proven(&proof, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
            Err(XShardError::RecordBytes(bytes))
        );
    }
}

#[test]
fn proven_batches_round_trip_and_check_every_rule() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let first = prove(&keys, &[0, 1, 2], (0, 1, 5), records(2, 1));
    let second = prove(&keys, &[1, 2, 3], (0, 1, 6), records(3, 2));
    let batch = ProvenBatch {
        operation: first.operation,
        now_ns: 1_000,
        proofs: vec![first.clone(), second.clone()],
    };
    let mut bytes = Vec::new();
    encode_batch(&batch, &mut bytes);
    assert!(is_proven_batch(&bytes));
    let decoded = decode_batch(&bytes).unwrap();
    assert_eq!(decoded, batch);
    assert_eq!(decoded.record_count(RECORD_BYTES), 5);
    groups.verify_batch(&decoded, 1, RECORD_BYTES, 5).unwrap();
    // Every strict prefix and any trailing byte is refused.
    for length in 0..bytes.len() {
        assert!(decode_batch(&bytes[..length]).is_err(), "prefix {length}");
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert_eq!(
        decode_batch(&trailing),
        Err(XShardError::Malformed("trailing bytes"))
    );
    // A client batch (0 in the mark) is not a proven batch.
    let mut client = bytes.clone();
    client[2] = 0;
    assert!(!is_proven_batch(&client));
    assert!(decode_batch(&client).is_err());
    // Rules: the records limit, one operation, distinct (origin, op), at least one proof,
    // and every proof valid.
    assert_eq!(
        groups.verify_batch(&batch, 1, RECORD_BYTES, 4),
        Err(XShardError::OutOfRange("records per batch"))
    );
    let mut mixed = batch.clone();
    mixed.operation = LedgerOperation::AckCreditLegs as u16;
    assert!(matches!(
        groups.verify_batch(&mixed, 1, RECORD_BYTES, 100),
        Err(XShardError::OperationMismatch { .. })
    ));
    let twice = ProvenBatch {
        operation: first.operation,
        now_ns: 0,
        proofs: vec![first.clone(), first.clone()],
    };
    assert_eq!(
        groups.verify_batch(&twice, 1, RECORD_BYTES, 100),
        Err(XShardError::DuplicateProof { origin: 0, op: 5 })
    );
    let empty = ProvenBatch {
        operation: first.operation,
        now_ns: 0,
        proofs: Vec::new(),
    };
    assert!(groups.verify_batch(&empty, 1, RECORD_BYTES, 100).is_err());
    let mut one_forged = batch;
    one_forged.proofs[1].records[0] ^= 1;
    assert!(matches!(
        groups.verify_batch(&one_forged, 1, RECORD_BYTES, 100),
        Err(XShardError::DigestMismatch { op: 6, .. })
    ));
}

#[test]
fn a_byzantine_credit_group_leader_cannot_get_a_made_up_leg_accepted() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let made_up = records(1, 42);
    let statement = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 3,
        kind: OutputsKind::Op,
        digest: outputs_digest(0, 1, 3, operation, &made_up),
    };
    // Replica 1 leads group 1 and is Byzantine: it signs the made-up leg's statement with
    // its own key, and puts its signature in three times or under its peers' indices.
    let own = OutputsVote::sign(&keys[1], 1, statement).signature;
    let proposals = [
        vec![(1, own), (1, own), (1, own)],
        vec![(1, own), (2, own), (3, own)],
        vec![(1, own)],
    ];
    let expected = [
        XShardError::DuplicateSigner(1),
        XShardError::BadSignature(2),
        XShardError::SignerCount {
            signers: 1,
            quorum: 3,
            replicas: 4,
        },
    ];
    for (signatures, expected) in proposals.into_iter().zip(expected) {
        let batch = ProvenBatch {
            operation,
            now_ns: 1,
            proofs: vec![ProvenOutputs {
                cert: OutputsCert {
                    statement,
                    signatures,
                },
                operation,
                records: made_up.clone(),
            }],
        };
        let mut bytes = Vec::new();
        encode_batch(&batch, &mut bytes);
        // Every correct backup refuses to vote for it, and no replica would apply it.
        for _backup in [0u8, 2, 3] {
            assert_eq!(
                groups.verify_batch_bytes(&bytes, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
                Err(expected)
            );
        }
    }
    // A genuine proof next to the made-up one does not carry it.
    let genuine = prove(&keys, &[0, 2, 3], (0, 1, 2), records(1, 1));
    let batch = ProvenBatch {
        operation,
        now_ns: 1,
        proofs: vec![
            genuine.clone(),
            ProvenOutputs {
                cert: OutputsCert {
                    statement,
                    signatures: vec![(1, own)],
                },
                operation,
                records: made_up,
            },
        ],
    };
    let mut bytes = Vec::new();
    encode_batch(&batch, &mut bytes);
    assert!(
        groups
            .verify_batch_bytes(&bytes, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
            .is_err()
    );
    // A client batch is not a proven batch.
    assert_eq!(
        groups.verify_batch_bytes(
            &[3, 0, 0, 0, 128, 0, 0, 0],
            1,
            RECORD_BYTES,
            BATCH_RECORDS_MAX
        ),
        Err(XShardError::Malformed("not a proven batch"))
    );
    // The genuine proof alone is accepted.
    let mut bytes = Vec::new();
    encode_batch(
        &ProvenBatch {
            operation,
            now_ns: 1,
            proofs: vec![genuine],
        },
        &mut bytes,
    );
    groups
        .verify_batch_bytes(&bytes, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
}

#[test]
fn messages_round_trip_and_refuse_malformed_bytes() {
    let keys = keys(1);
    let proof = prove(&keys, &[0, 1, 2], (0, 1, 5), records(1, 1));
    let vote = OutputsVote::sign(&keys[3], 3, proof.cert.statement);
    for message in [XShardMessage::Vote(vote), XShardMessage::Proven(proof)] {
        let mut bytes = Vec::new();
        encode_message(&message, &mut bytes);
        if let XShardMessage::Vote(_) = message {
            // An outputs vote has no chunk; an in-flight vote fills the largest size.
            assert_eq!(bytes.len(), 1 + OUTPUTS_VOTE_BYTES - 4);
        }
        assert_eq!(decode_message(&bytes).unwrap(), message);
        for length in 0..bytes.len() {
            assert!(decode_message(&bytes[..length]).is_err());
        }
        bytes.push(0);
        assert!(decode_message(&bytes).is_err());
    }
    assert_eq!(
        decode_message(&[9]),
        Err(XShardError::Malformed("unknown tag"))
    );
    // A certificate claiming more signatures than a group can have.
    let mut bytes = vec![TAG_PROVEN];
    bytes.extend_from_slice(&[0; 49]);
    bytes.push(REPLICA_COUNT_MAX as u8 + 1);
    assert_eq!(
        decode_message(&bytes),
        Err(XShardError::OutOfRange("signatures per certificate"))
    );
}

proptest! {
    #[test]
    fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_message(&bytes);
        let _ = decode_batch(&bytes);
    }

    #[test]
    fn a_mutated_proof_never_verifies(at in 0usize..400, bit in 0u8..8) {
        let keys = keys(1);
        let groups = groups_of(&keys);
        let proof = prove(&keys, &[0, 1, 2], (0, 1, 5), records(2, 1));
        let mut bytes = Vec::new();
        encode_message(&XShardMessage::Proven(proof), &mut bytes);
        let at = at % bytes.len();
        bytes[at] ^= 1 << bit;
        if let Ok(XShardMessage::Proven(mutated)) = decode_message(&bytes) {
            prop_assert!(groups.verify_proven(&mutated, 1, RECORD_BYTES, BATCH_RECORDS_MAX).is_err());
        }
    }
}

/// The four replicas of `group`, each with its collector.
fn collectors(keys: &[SigningKey], group: u32) -> Vec<OutputsCollector> {
    (0..REPLICAS)
        .map(|replica| {
            let config = CollectorConfig {
                group,
                replica,
                outputs_kept_max: 8,
                in_flight_chunks_max: 4,
                resend_interval_us: 1_000,
                in_flight_deliver_after_us: IN_FLIGHT_DELIVER_AFTER_US,
            };
            OutputsCollector::new(config, groups_of(keys), keys[usize::from(replica)].clone())
                .unwrap()
        })
        .collect()
}

/// Delivers every vote in `outbox` (replica, actions) to its addressees among `up`, until
/// no vote is left; returns what each replica delivered to the destination group.
fn exchange(
    collectors: &mut [OutputsCollector],
    up: &[u8],
    mut outbox: Vec<(u8, Vec<XShardAction>)>,
) -> Vec<Vec<ProvenOutputs>> {
    let mut delivered = vec![Vec::new(); collectors.len()];
    while let Some((from, actions)) = outbox.pop() {
        for action in actions {
            let (to, vote): (Vec<u8>, OutputsVote) = match action {
                XShardAction::Broadcast(vote) => {
                    ((0..REPLICAS).filter(|r| *r != from).collect(), vote)
                }
                XShardAction::Send { to, vote } => (vec![to], vote),
                XShardAction::Deliver(proof) => {
                    delivered[usize::from(from)].push(proof);
                    continue;
                }
            };
            for peer in to.into_iter().filter(|peer| up.contains(peer)) {
                let mut answer = Vec::new();
                let _ = collectors[usize::from(peer)].on_vote(vote, &mut answer);
                outbox.push((peer, answer));
            }
        }
    }
    delivered
}

#[test]
fn collectors_certify_once_a_quorum_produced_the_same_outputs() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut group = collectors(&keys, 0);
    let legs = records(2, 3);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    // Replica 3 executes late: the others' votes reach it before it produced the outputs.
    let mut outbox = Vec::new();
    for replica in 0..3u8 {
        let mut actions = Vec::new();
        group[usize::from(replica)]
            .on_produced(0, 9, 1, operation, legs.clone(), &mut actions)
            .unwrap();
        outbox.push((replica, actions));
    }
    let delivered = exchange(&mut group, &[0, 1, 2, 3], outbox);
    for replica in 0..3 {
        assert_eq!(delivered[replica].len(), 1, "replica {replica} certified");
        groups
            .verify_proven(&delivered[replica][0], 1, RECORD_BYTES, BATCH_RECORDS_MAX)
            .unwrap();
        assert!(group[replica].is_certified(1, 9));
    }
    assert!(delivered[3].is_empty());
    assert!(
        group[3].metrics().votes_early >= 3,
        "{:?}",
        group[3].metrics()
    );
    // Replica 3 produces them now: the first vote of each peer it sends is answered with
    // that peer's own, so it certifies without waiting for a resend.
    let mut actions = Vec::new();
    group[3]
        .on_produced(5, 9, 1, operation, legs.clone(), &mut actions)
        .unwrap();
    let delivered = exchange(&mut group, &[0, 1, 2, 3], vec![(3, actions)]);
    assert_eq!(delivered[3].len(), 1);
    groups
        .verify_proven(&delivered[3][0], 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    // Producing the same outputs again (a replay after restart) is stale; other records
    // for the same op are a bug.
    let mut actions = Vec::new();
    assert_eq!(
        group[0].on_produced(6, 9, 1, operation, legs.clone(), &mut actions),
        Err(XShardError::Stale)
    );
    assert_eq!(
        group[0].on_produced(6, 9, 1, operation, records(2, 4), &mut actions),
        Err(XShardError::Diverged {
            destination: 1,
            op: 9
        })
    );
    // Certified outputs are delivered again every resend interval until released.
    let mut actions = Vec::new();
    group[0].on_tick(1_000, &mut actions);
    assert!(matches!(actions.as_slice(), [XShardAction::Deliver(_)]));
    assert!(group[0].release(1, 9));
    assert_eq!(group[0].kept(), 0);
    let mut actions = Vec::new();
    group[0].on_tick(10_000, &mut actions);
    assert!(actions.is_empty());
    assert_eq!(group[0].poll_timeout(), None);
}

#[test]
fn a_byzantine_replica_cannot_get_other_outputs_certified() {
    let keys = keys(1);
    let mut group = collectors(&keys, 0);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let honest = records(1, 3);
    // Replica 0 (Byzantine, say the leader) signs a made-up leg for op 9; replica 3 is
    // silent. Replicas 1 and 2 produced the real outputs.
    let mut outbox = Vec::new();
    for replica in [1u8, 2] {
        let mut actions = Vec::new();
        group[usize::from(replica)]
            .on_produced(0, 9, 1, operation, honest.clone(), &mut actions)
            .unwrap();
        outbox.push((replica, actions));
    }
    let made_up = records(1, 200);
    let statement = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 9,
        kind: OutputsKind::Op,
        digest: outputs_digest(0, 1, 9, operation, &made_up),
    };
    let lie = OutputsVote::sign(&keys[0], 0, statement);
    outbox.push((0, vec![XShardAction::Broadcast(lie)]));
    let delivered = exchange(&mut group, &[1, 2], outbox);
    // Two matching signatures are not a quorum, and the lie was refused at both.
    assert!(delivered.iter().all(Vec::is_empty));
    for replica in [1, 2] {
        assert_eq!(group[replica].metrics().votes_refused, 1);
        assert!(!group[replica].is_certified(1, 9));
    }
    // A vote signed by one replica but sent as another's, or about another group.
    let mut forged = lie;
    forged.replica = 3;
    let mut actions = Vec::new();
    assert_eq!(
        group[1].on_vote(forged, &mut actions),
        Err(XShardError::BadSignature(3))
    );
    let other_group = OutputsVote::sign(
        &keys[0],
        0,
        OutputsStatement {
            origin: 1,
            destination: 0,
            ..statement
        },
    );
    assert_eq!(
        group[1].on_vote(other_group, &mut actions),
        Err(XShardError::WrongOrigin {
            origin: 1,
            collector: 0
        })
    );
    // Replica 3 comes back with the real outputs: now a quorum of correct replicas agrees.
    let mut actions = Vec::new();
    group[3]
        .on_produced(0, 9, 1, operation, honest, &mut actions)
        .unwrap();
    let delivered = exchange(&mut group, &[1, 2, 3], vec![(3, actions)]);
    for replica in [1, 2, 3] {
        assert_eq!(delivered[replica].len(), 1);
        let signers: Vec<u8> = delivered[replica][0]
            .cert
            .signatures
            .iter()
            .map(|(replica, _)| *replica)
            .collect();
        assert_eq!(signers, vec![1, 2, 3], "the liar's signature is not in it");
    }
}

#[test]
fn a_full_collector_refuses_and_changes_nothing() {
    let keys = keys(1);
    let mut group = collectors(&keys, 0);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let mut actions = Vec::new();
    for op in 1..=8 {
        group[0]
            .on_produced(0, op, 1, operation, records(1, op as u8), &mut actions)
            .unwrap();
    }
    assert_eq!(
        group[0].on_produced(0, 9, 1, operation, records(1, 9), &mut actions),
        Err(XShardError::Full("outputs collector"))
    );
    assert_eq!(group[0].kept(), 8);
    assert_eq!(group[0].metrics().full, 1);
    assert_eq!(
        group[0].on_produced(0, 9, 0, operation, records(1, 9), &mut Vec::new()),
        Err(XShardError::SameGroup(0))
    );
}

#[test]
fn settled_outputs_are_released_by_age_whether_certified_or_not() {
    let keys = keys(1);
    let mut group = collectors(&keys, 0);
    let legs = LedgerOperation::ApplyCreditLegs as u16;
    let acks = LedgerOperation::AckCreditLegs as u16;
    let mut actions = Vec::new();
    // Ops 1 and 2 are legs produced at 0 and 100 µs, op 3 an acknowledgement at 200 µs;
    // replica 0 alone produced them, so none is certified.
    group[0]
        .on_produced(0, 1, 1, legs, records(1, 1), &mut actions)
        .unwrap();
    group[0]
        .on_produced(100, 2, 1, legs, records(1, 2), &mut actions)
        .unwrap();
    group[0]
        .on_produced(200, 3, 1, acks, records(1, 3), &mut actions)
        .unwrap();
    assert!(!group[0].is_certified(1, 1));
    // Op 1's leg is acknowledged (settled), op 2's is not; acknowledgements always are.
    let settled = |operation: u16, bytes: &[u8]| operation == acks || bytes == records(1, 1);
    // Younger than the minimum age: nothing goes.
    assert_eq!(group[0].release_settled(50, 100, settled), 0);
    assert_eq!(group[0].kept(), 3);
    // Op 1 is old enough and settled; op 2 is unsettled; op 3 is too young.
    assert_eq!(group[0].release_settled(150, 100, settled), 1);
    assert_eq!(group[0].kept(), 2);
    assert!(!group[0].release(1, 1), "op 1 is gone");
    // Op 3's acknowledgement goes once old enough, certified or not; op 2 stays.
    assert_eq!(group[0].release_settled(300, 100, settled), 1);
    assert_eq!(group[0].kept(), 1);
    // Any age (a full collector's sweep): op 2 stays while its leg is in flight...
    assert_eq!(group[0].release_settled(300, 0, settled), 0);
    // ...and goes once acknowledged.
    assert_eq!(group[0].release_settled(300, 0, |_, _| true), 1);
    assert_eq!(group[0].kept(), 0);
    assert_eq!(group[0].poll_timeout(), None);
}

#[test]
fn proofs_left_queued_are_handed_out_to_forward_once_per_interval() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut inbound = InboundProofs::new(1, (RECORD_BYTES, BATCH_RECORDS_MAX), groups, 4).unwrap();
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let first = prove(&keys, &[0, 1, 2], (0, 1, 7), records(1, 7));
    inbound.on_proven(first.clone()).unwrap();
    let mut out = Vec::new();
    // First seen at 1,000 µs: due at 1,100 µs, not before.
    inbound.forward_due(1_000, 100, &mut out);
    inbound.forward_due(1_099, 100, &mut out);
    assert!(out.is_empty());
    inbound.forward_due(1_100, 100, &mut out);
    assert_eq!(out, vec![first.clone()]);
    // Once per interval.
    inbound.forward_due(1_150, 100, &mut out);
    assert_eq!(out.len(), 1);
    inbound.forward_due(1_200, 100, &mut out);
    assert_eq!(out.len(), 2);
    // Committed: gone, never handed out again.
    let batch = ProvenBatch {
        operation,
        now_ns: 1,
        proofs: vec![first],
    };
    assert_eq!(inbound.on_committed(&batch), 1);
    inbound.forward_due(10_000, 100, &mut out);
    assert_eq!(out.len(), 2);
}

#[test]
fn inbound_proofs_are_checked_once_deduplicated_bounded_and_proposed_once_per_view() {
    let keys = keys(1);
    let mut inbound =
        InboundProofs::new(1, (RECORD_BYTES, BATCH_RECORDS_MAX), groups_of(&keys), 3).unwrap();
    let proof = |op: u64, signers: &[u8]| prove(&keys, signers, (0, 1, op), records(2, op as u8));
    assert_eq!(
        inbound.on_proven(proof(1, &[0, 1])),
        Err(XShardError::SignerCount {
            signers: 2,
            quorum: 3,
            replicas: 4
        })
    );
    inbound.on_proven(proof(1, &[0, 1, 2])).unwrap();
    // The same outputs from another replica (other signers): a duplicate.
    assert_eq!(
        inbound.on_proven(proof(1, &[1, 2, 3])),
        Err(XShardError::Stale)
    );
    inbound.on_proven(proof(2, &[0, 1, 2])).unwrap();
    inbound.on_proven(proof(3, &[0, 1, 2])).unwrap();
    assert_eq!(
        inbound.on_proven(proof(4, &[0, 1, 2])),
        Err(XShardError::Full("inbound proofs"))
    );
    assert_eq!(inbound.len(), 3);
    // The leader takes what fits a batch of 5 records (2 + 2), not again in this view.
    let batch = inbound.take_batch(0, 0, 5).unwrap();
    assert_eq!(batch.proofs.len(), 2);
    let last = inbound.take_batch(0, 0, 5).unwrap();
    assert_eq!(last.proofs[0].key(), (0, 3, OutputsKind::Op));
    assert_eq!(inbound.take_batch(0, 0, 5), None);
    // A new view: still queued (not committed), proposed again.
    assert_eq!(inbound.take_batch(1, 0, 100).unwrap().proofs.len(), 3);
    assert_eq!(inbound.on_committed(&batch), 2);
    assert_eq!(inbound.len(), 1);
    // Committed outputs sent again (the origin has not seen the acknowledgement): queued
    // again, so the group applies them again and acknowledges again.
    inbound.on_proven(proof(1, &[0, 1, 2])).unwrap();
    assert_eq!(inbound.metrics().accepted, 4);
    assert_eq!(inbound.metrics().refused, 1);
    assert_eq!(inbound.metrics().duplicates, 1);
    assert_eq!(inbound.metrics().full, 1);
}

#[test]
fn an_oversized_proof_never_blocks_the_inbound_queue() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let limits = (RECORD_BYTES, BATCH_RECORDS_MAX);
    let mut inbound = InboundProofs::new(1, limits, groups.clone(), 4).unwrap();
    // Validly certified legs, one more than a batch holds (an in-flight chunk cut by bytes
    // only, or a Byzantine replica forwarding one): no batch could ever carry it.
    let oversized = prove(
        &keys,
        &[0, 1, 2],
        (0, 1, 5),
        records(BATCH_RECORDS_MAX + 1, 1),
    );
    let refusal = XShardError::ProofRecords {
        records: BATCH_RECORDS_MAX + 1,
        records_max: BATCH_RECORDS_MAX,
    };
    assert_eq!(
        groups.verify_proven(&oversized, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(refusal)
    );
    assert_eq!(inbound.on_proven(oversized), Err(refusal));
    assert_eq!(inbound.metrics().refused, 1);
    assert!(inbound.is_empty());
    // An acknowledgement behind it (the other operation) is proposed.
    let ack = prove_as(
        &keys,
        &[0, 1, 2],
        (0, 1, 6),
        LedgerOperation::AckCreditLegs,
        records(1, 2),
    );
    inbound.on_proven(ack.clone()).unwrap();
    let batch = inbound.take_batch(0, 0, BATCH_RECORDS_MAX).unwrap();
    assert_eq!(batch.operation, LedgerOperation::AckCreditLegs as u16);
    assert_eq!(batch.proofs, vec![ack]);
    // Exactly a batch's worth is accepted, and proposed alone.
    let full = prove(&keys, &[0, 1, 2], (0, 1, 7), records(BATCH_RECORDS_MAX, 3));
    inbound.on_proven(full.clone()).unwrap();
    let batch = inbound.take_batch(0, 0, BATCH_RECORDS_MAX).unwrap();
    assert_eq!(batch.proofs, vec![full]);
    groups
        .verify_batch(&batch, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
}

#[test]
fn a_proof_that_does_not_fit_never_decides_the_batch_operation() {
    let keys = keys(1);
    let limits = (RECORD_BYTES, BATCH_RECORDS_MAX);
    let mut inbound = InboundProofs::new(1, limits, groups_of(&keys), 4).unwrap();
    let legs = prove(&keys, &[0, 1, 2], (0, 1, 5), records(3, 1));
    let ack = prove_as(
        &keys,
        &[0, 1, 2],
        (0, 1, 6),
        LedgerOperation::AckCreditLegs,
        records(1, 2),
    );
    inbound.on_proven(legs.clone()).unwrap();
    inbound.on_proven(ack.clone()).unwrap();
    // Room for 2 records: the 3 legs are skipped, and do not hold back the
    // acknowledgement of the other operation behind them.
    let batch = inbound.take_batch(0, 0, 2).unwrap();
    assert_eq!(batch.operation, LedgerOperation::AckCreditLegs as u16);
    assert_eq!(batch.proofs, vec![ack]);
    assert_eq!(inbound.take_batch(0, 0, 2), None);
    // Room for them (a new view): the oldest proof taken decides the operation.
    let batch = inbound.take_batch(1, 0, 4).unwrap();
    assert_eq!(batch.operation, LedgerOperation::ApplyCreditLegs as u16);
    assert_eq!(batch.proofs, vec![legs]);
}

/// One shard of two (`ledger`) and the collectors of its group.
struct Shard {
    ledger: Ledger,
    group: Vec<OutputsCollector>,
    inbound: InboundProofs,
    op: u64,
}

impl Shard {
    fn new(index: u32, keys: &[SigningKey]) -> Shard {
        Shard {
            ledger: Ledger::new(LedgerConfig::new(index, GROUP_COUNT)),
            group: collectors(keys, index),
            inbound: InboundProofs::new(
                index,
                (RECORD_BYTES, BATCH_RECORDS_MAX),
                groups_of(keys),
                16,
            )
            .unwrap(),
            op: 0,
        }
    }

    /// Prepares (stamps) and applies one client op. One ledger stands for every replica.
    fn apply(
        &mut self,
        operation: LedgerOperation,
        now_ns: u64,
        records: &mut [RecordSlot],
    ) -> Vec<u32> {
        self.op += 1;
        self.ledger.prepare(operation, now_ns, records);
        let mut results = vec![RecordResult::zeroed(); records.len()];
        self.ledger.apply(self.op, operation, records, &mut results);
        results.iter().map(|result| result.code).collect()
    }

    /// What the last op sent the other group, certified by the group's replicas (every
    /// replica applies the same op; one ledger stands for all of them).
    fn certify_outputs(&mut self) -> Option<ProvenOutputs> {
        let mut produced = Vec::new();
        outputs_by_destination(
            std::iter::from_fn(|| self.ledger.poll_outbound()),
            &mut produced,
        )
        .unwrap();
        assert!(produced.len() <= 1, "two groups: one destination");
        let ProducedOutputs {
            destination,
            operation,
            records: bytes,
        } = produced.pop()?;
        let mut outbox = Vec::new();
        for (replica, collector) in self.group.iter_mut().enumerate() {
            let mut actions = Vec::new();
            collector
                .on_produced(
                    0,
                    self.op,
                    destination,
                    operation,
                    bytes.clone(),
                    &mut actions,
                )
                .unwrap();
            outbox.push((replica as u8, actions));
        }
        let delivered = exchange(&mut self.group, &[0, 1, 2, 3], outbox);
        assert!(delivered.iter().all(|each| each.len() == 1));
        delivered.into_iter().next().unwrap().pop()
    }

    /// Leader: proposes what is queued; every replica checks the committed bytes with the
    /// acceptance rule and applies the records. Returns the result codes.
    fn commit_inbound(&mut self, groups: &Groups) -> Vec<u32> {
        let now_ns = 100 * self.op;
        let batch = self
            .inbound
            .take_batch(self.op, now_ns, BATCH_RECORDS_MAX)
            .unwrap();
        let mut bytes = Vec::new();
        encode_batch(&batch, &mut bytes);
        let receiver = self.ledger.config().shard_index;
        let decoded = groups
            .verify_batch_bytes(&bytes, receiver, RECORD_BYTES, BATCH_RECORDS_MAX)
            .unwrap();
        self.inbound.on_committed(&decoded);
        let mut records: Vec<RecordSlot> = decoded
            .proofs
            .iter()
            .flat_map(|proof| proof.records.chunks_exact(RECORD_BYTES))
            .map(bytemuck::pod_read_unaligned)
            .collect();
        // Every replica stamps the certified records alike (the batch's `now_ns` and
        // replicated state), then applies them.
        let operation = LedgerOperation::try_from(decoded.operation).unwrap();
        self.ledger
            .stamp_internal(operation, decoded.now_ns, &mut records);
        self.op += 1;
        let mut results = vec![RecordResult::zeroed(); records.len()];
        self.ledger
            .apply(self.op, operation, &records, &mut results);
        results.iter().map(|result| result.code).collect()
    }
}

#[test]
fn a_leg_and_its_acknowledgement_travel_by_certificate_and_apply_exactly_once() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut shards = [Shard::new(0, &keys), Shard::new(1, &keys)];
    let id_on = |shard: u32, skip: usize| {
        (1u128..)
            .filter(|&id| shard_of(id, GROUP_COUNT) == shard)
            .nth(skip)
            .unwrap()
    };
    let (payer, payee) = (id_on(0, 0), id_on(1, 0));
    for (shard, id, flags) in [(0, payer, account_flags::ALLOW_NEGATIVE), (1, payee, 0)] {
        let mut account = [RecordSlot::from_account(&Account {
            id,
            ledger: 1,
            code: 1,
            flags,
            ..Account::zeroed()
        })];
        assert_eq!(
            shards[shard].apply(LedgerOperation::CreateAccounts, 10, &mut account),
            vec![0]
        );
    }
    let mut transfer = [RecordSlot::from_transfer(&Transfer {
        id: 77,
        debit_account_id: payer,
        credit_account_id: payee,
        amount: 500,
        ledger: 1,
        code: 1,
        ..Transfer::zeroed()
    })];
    assert_eq!(
        shards[0].apply(LedgerOperation::CreateTransfers, 20, &mut transfer),
        vec![0]
    );
    assert_eq!(shards[0].ledger.in_flight(), 500);
    // Group 0 certifies the leg; a correct replica delivers it to group 1.
    let leg = shards[0].certify_outputs().unwrap();
    assert_eq!(leg.cert.statement.destination, 1);
    let leg_records: Vec<RecordSlot> = leg
        .records
        .chunks_exact(RECORD_BYTES)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let legs = LedgerOperation::ApplyCreditLegs;
    let leg_op = leg.cert.statement.op;
    assert!(!shards[0].ledger.outputs_settled(legs, &leg_records));
    // A Byzantine deliverer's made-up leg (twice the amount) never enters the queue.
    let mut inflated = leg.clone();
    let mut forged: Transfer = bytemuck::pod_read_unaligned(&inflated.records);
    forged.amount = 1_000;
    inflated.records = bytemuck::bytes_of(&forged).to_vec();
    assert!(matches!(
        shards[1].inbound.on_proven(inflated),
        Err(XShardError::DigestMismatch { .. })
    ));
    shards[1].inbound.on_proven(leg.clone()).unwrap();
    assert_eq!(
        shards[1].commit_inbound(&groups),
        vec![CreditLegResult::Ok as u32]
    );
    let credited = |shards: &[Shard; 2]| {
        shards[1]
            .ledger
            .lookup_account(payee)
            .unwrap()
            .credits_posted
    };
    assert_eq!(credited(&shards), 500);
    // The acknowledgement goes back the same way.
    let ack = shards[1].certify_outputs().unwrap();
    assert_eq!(ack.cert.statement.destination, 0);
    assert_eq!(ack.operation, LedgerOperation::AckCreditLegs as u16);
    // Before it arrives, group 0 resends the leg (a lost acknowledgement looks the same):
    // group 1 applies it again as a duplicate and acknowledges it again.
    shards[1].inbound.on_proven(leg).unwrap();
    assert_eq!(
        shards[1].commit_inbound(&groups),
        vec![CreditLegResult::Duplicate as u32]
    );
    assert_eq!(credited(&shards), 500, "a replayed leg credits nothing");
    let ack_again = shards[1].certify_outputs().unwrap();
    // Both acknowledgements reach group 0: the leg settles once.
    shards[0].inbound.on_proven(ack).unwrap();
    shards[0].inbound.on_proven(ack_again).unwrap();
    assert_eq!(
        shards[0].commit_inbound(&groups),
        vec![
            CreditAckResult::Ok as u32,
            CreditAckResult::Duplicate as u32
        ]
    );
    assert_eq!(shards[0].ledger.in_flight(), 0);
    assert_eq!(shards[0].ledger.credit_legs_unacked_count(), 0);
    // Now the leg's outputs are settled, and group 0's replicas release them; the
    // acknowledgements never needed confirmation.
    assert!(shards[0].ledger.outputs_settled(legs, &leg_records));
    assert!(
        shards[1]
            .ledger
            .outputs_settled(LedgerOperation::AckCreditLegs, &leg_records)
    );
    for collector in &mut shards[0].group {
        assert_eq!(collector.kept(), 1);
        assert!(collector.release(1, leg_op));
        assert_eq!(collector.kept(), 0);
    }
    let conservation: i128 = shards
        .iter()
        .map(|shard| shard.ledger.conservation_sum())
        .sum();
    assert_eq!(conservation, 0, "balances + suspense + in flight");
    // Applying an acknowledgement emits nothing more.
    assert!(shards[0].certify_outputs().is_none());
}

/// A batch of one request of `client_id` (its key `secret`) to `group`, as a leader proposes
/// it: signed, or with the signature left out.
fn client_batch(group: u32, secret: &SigningKey, client_id: u128, signed: bool) -> Vec<u8> {
    use super::super::request::{RequestStatement, batch_encode};
    let operation = LedgerOperation::CreateTransfers as u16;
    let records = records(2, 9);
    let descriptor = crate::session::RequestDescriptor {
        client_id,
        request_number: 1,
        record_start: 0,
        record_count: 2,
    };
    let signature = RequestStatement::new(group, client_id, 1, operation, &records).sign(secret);
    let mut batch = Vec::new();
    batch_encode(
        operation,
        &records,
        bytemuck::bytes_of(&descriptor),
        if signed { &signature[..] } else { &[] },
        &mut batch,
    );
    batch
}

#[test]
fn a_proposal_is_either_a_client_signed_batch_or_a_proven_batch() {
    use super::super::request::{ClientKeys, RequestVerifier, batch_decode};
    use super::super::{ProposalCheck as _, batch_digest};
    let keys = keys(1);
    let groups = groups_of(&keys);
    let client = SigningKey::from_bytes(&[77; 32]);
    let verifier = || {
        RequestVerifier::new(
            1,
            ClientKeys::new(vec![client.verifying_key()]),
            RECORD_BYTES,
            None,
        )
    };
    assert_eq!(
        SignedOrProven::new(
            verifier(),
            groups.clone(),
            GROUP_COUNT,
            RECORD_BYTES,
            BATCH_RECORDS_MAX
        )
        .err(),
        Some(XShardError::UnknownGroup(GROUP_COUNT))
    );
    let mut check = SignedOrProven::new(
        verifier(),
        groups.clone(),
        1,
        RECORD_BYTES,
        BATCH_RECORDS_MAX,
    )
    .unwrap();
    let mut checked = |bytes: &[u8]| check.check_proposal(bytes, &batch_digest(bytes));

    // A client-signed batch is never taken for a proven one (their formats differ in the
    // same header field), and goes to the client-signature check.
    let signed = client_batch(1, &client, 1, true);
    assert!(!is_proven_batch(&signed));
    assert!(decode_batch(&signed).is_err());
    assert_eq!(checked(&signed), Ok(()));
    assert_eq!(
        checked(&client_batch(1, &client, 1, false)),
        Err(RequestAuthError::Unsigned)
    );
    assert_eq!(
        checked(&client_batch(0, &client, 1, true)),
        Err(RequestAuthError::BadSignature {
            client_id: 1,
            request_number: 1
        })
    );

    // A genuine proven batch passes without any client signature; the client batch
    // decoder and the client check refuse it.
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let genuine = prove(&keys, &[0, 2, 3], (0, 1, 2), records(1, 1));
    let mut proven = Vec::new();
    encode_batch(
        &ProvenBatch {
            operation,
            now_ns: 5,
            proofs: vec![genuine.clone()],
        },
        &mut proven,
    );
    assert_eq!(checked(&proven), Ok(()));
    assert!(batch_decode(&proven).is_none());
    assert!(matches!(
        verifier().check_batch(&proven, &batch_digest(&proven)),
        Err(RequestAuthError::Malformed(_))
    ));

    // A Byzantine credit-group leader's made-up leg (its own signature three times) is
    // refused, as is a genuine proof for group 1 checked by group 0's replicas and a
    // genuine batch truncated.
    let made_up = records(1, 42);
    let statement = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 3,
        kind: OutputsKind::Op,
        digest: outputs_digest(0, 1, 3, operation, &made_up),
    };
    let own = OutputsVote::sign(&keys[1], 1, statement).signature;
    let mut forged = Vec::new();
    encode_batch(
        &ProvenBatch {
            operation,
            now_ns: 5,
            proofs: vec![ProvenOutputs {
                cert: OutputsCert {
                    statement,
                    signatures: vec![(1, own), (1, own), (1, own)],
                },
                operation,
                records: made_up,
            }],
        },
        &mut forged,
    );
    assert_eq!(
        checked(&forged),
        Err(RequestAuthError::Proven(
            XShardError::DuplicateSigner(1).rule()
        ))
    );
    assert!(matches!(
        checked(&proven[..proven.len() - 1]),
        Err(RequestAuthError::Proven(_))
    ));
    let mut at_origin =
        SignedOrProven::new(verifier(), groups, 0, RECORD_BYTES, BATCH_RECORDS_MAX).unwrap();
    assert_eq!(
        at_origin.check_proposal(&proven, &batch_digest(&proven)),
        Err(RequestAuthError::Proven(
            XShardError::WrongDestination {
                destination: 1,
                receiver: 0
            }
            .rule()
        ))
    );
}

#[test]
fn one_ops_outputs_are_grouped_by_destination_deterministically() {
    use crate::state_machine::Outbound;
    let slot = |salt: u8| {
        RecordSlot::from_transfer(&Transfer {
            id: u128::from(salt),
            ..Transfer::zeroed()
        })
    };
    let legs = LedgerOperation::ApplyCreditLegs;
    let emitted = [(3, 1), (1, 2), (3, 3), (0, 4), (1, 5)].map(|(shard, salt)| Outbound {
        shard,
        operation: legs,
        record: slot(salt),
    });
    let mut out = vec![ProducedOutputs {
        destination: 9,
        operation: 0,
        records: vec![1],
    }];
    outputs_by_destination(emitted, &mut out).unwrap();
    let expected = [(0, vec![4]), (1, vec![2, 5]), (3, vec![1, 3])].map(|(destination, salts)| {
        ProducedOutputs {
            destination,
            operation: legs as u16,
            records: salts
                .iter()
                .flat_map(|&salt| bytemuck::bytes_of(&slot(salt)).to_vec())
                .collect(),
        }
    });
    assert_eq!(out, expected);
    // Nothing emitted: nothing to certify.
    outputs_by_destination(
        Vec::<Outbound<LedgerOperation, RecordSlot>>::new(),
        &mut out,
    )
    .unwrap();
    assert!(out.is_empty());
    // One statement certifies one operation per destination.
    let mixed = [legs, LedgerOperation::AckCreditLegs].map(|operation| Outbound {
        shard: 1,
        operation,
        record: slot(1),
    });
    assert_eq!(
        outputs_by_destination(mixed, &mut out),
        Err(XShardError::OperationMismatch {
            proof: LedgerOperation::AckCreditLegs as u16,
            batch: legs as u16,
        })
    );
    // At most OUTPUT_RECORDS_BYTES_MAX bytes to one destination.
    let too_many = (0..=OUTPUT_RECORDS_BYTES_MAX / RECORD_BYTES).map(|_| Outbound {
        shard: 1,
        operation: legs,
        record: slot(1),
    });
    assert_eq!(
        outputs_by_destination(too_many, &mut out),
        Err(XShardError::RecordBytes(
            OUTPUT_RECORDS_BYTES_MAX + RECORD_BYTES
        ))
    );
}

// ---- In-flight statements: legs in flight at a snapshot op, certified from state ----

/// Signs `chunks` of snapshot op `checkpoint_op` at every replica of `group` and exchanges
/// the votes; returns the actions left (deliveries).
fn certify_in_flight(
    group: &mut [OutputsCollector],
    now_us: u64,
    checkpoint_op: u64,
    chunks: &[InFlightChunk],
) -> Vec<Vec<ProvenOutputs>> {
    let mut outbox = Vec::new();
    for (replica, collector) in group.iter_mut().enumerate() {
        let mut actions = Vec::new();
        collector
            .on_in_flight(now_us, checkpoint_op, chunks.to_vec(), &mut actions)
            .unwrap();
        outbox.push((replica as u8, actions));
    }
    exchange(group, &[0, 1, 2, 3], outbox)
}

/// The chunks of the legs `ledger` has in flight right now.
fn ledger_in_flight(ledger: &Ledger) -> Vec<InFlightChunk> {
    let mut legs = Vec::new();
    ledger.unconfirmed_outbound(&mut |leg| legs.push(leg));
    let mut chunks = Vec::new();
    in_flight_chunks(legs, BATCH_RECORDS_MAX, &mut chunks).unwrap();
    chunks
}

#[test]
fn in_flight_statements_are_domain_separated_from_outputs_statements() {
    let outputs = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 7,
        kind: OutputsKind::Op,
        digest: [9; 32],
    };
    let in_flight = OutputsStatement {
        kind: OutputsKind::InFlight { chunk: 0 },
        ..outputs
    };
    let bytes = in_flight.signing_bytes(2);
    assert_eq!(bytes.len(), IN_FLIGHT_SIGNING_BYTES);
    assert!(bytes.starts_with(IN_FLIGHT_SIGNING_DOMAIN));
    assert!(!bytes.starts_with(OUTPUTS_SIGNING_DOMAIN));
    assert!(!bytes.starts_with(super::super::message::SIGNING_DOMAIN));
    assert_ne!(bytes, outputs.signing_bytes(2));
    // The chunk is bound.
    let next = OutputsStatement {
        kind: OutputsKind::InFlight { chunk: 1 },
        ..outputs
    };
    assert_ne!(next.signing_bytes(2), bytes);
    // A signature over an in-flight statement is no outputs vote, and the other way round.
    let keys = keys(1);
    let groups = groups_of(&keys);
    let vote = OutputsVote::sign(&keys[2], 2, in_flight);
    groups.verify_vote(&vote).unwrap();
    let relabelled = OutputsVote {
        statement: outputs,
        ..vote
    };
    assert_eq!(
        groups.verify_vote(&relabelled),
        Err(XShardError::BadSignature(2))
    );
    let vote = OutputsVote::sign(&keys[2], 2, outputs);
    let relabelled = OutputsVote {
        statement: in_flight,
        ..vote
    };
    assert_eq!(
        groups.verify_vote(&relabelled),
        Err(XShardError::BadSignature(2))
    );
    // The digests differ for the same records, and bind the chunk and the snapshot op.
    let legs = records(2, 0);
    let digest = in_flight_digest(0, 1, 7, 0, 256, &legs);
    assert_ne!(digest, outputs_digest(0, 1, 7, 256, &legs));
    assert_ne!(digest, in_flight_digest(0, 1, 7, 1, 256, &legs));
    assert_ne!(digest, in_flight_digest(0, 1, 8, 0, 256, &legs));
    assert_ne!(digest, in_flight_digest(1, 0, 7, 0, 256, &legs));
}

#[test]
fn in_flight_chunks_are_deterministic_ordered_and_bounded() {
    type Leg = Outbound<u16, [u8; RECORD_BYTES]>;
    // The largest batch cap: the byte limit binds before it.
    let records_max = crate::limits::BATCH_ENTRIES_MAX_LIMIT;
    let per_chunk = OUTPUT_RECORDS_BYTES_MAX / RECORD_BYTES;
    assert_eq!(
        in_flight_chunk_records_max(RECORD_BYTES, records_max),
        per_chunk
    );
    // Legs numbered 0.. in ring order, to destinations 2, 1, 2, 1, ... (two destinations,
    // more than a chunk's worth for destination 1).
    let count = 2 * per_chunk + 200;
    let legs = numbered_legs(count, |sequence| if sequence % 3 == 0 { 2 } else { 1 }, 256);
    let (chunks, shape) = chunk_shape(&legs, records_max);
    let to_one = legs.iter().filter(|leg| leg.shard == 1).count();
    let to_two = count - to_one;
    assert_eq!(
        shape,
        vec![
            (1, 0, per_chunk),
            (1, 1, to_one - per_chunk),
            (2, 0, to_two)
        ]
    );
    let limits = (RECORD_BYTES, records_max);
    assert!(chunks.len() <= in_flight_chunks_max(count, limits, 2));
    assert_eq!(in_flight_chunks_max(count, limits, 2), 2 + 2);
    // Every leg once, in ring order within its destination.
    for chunk in &chunks {
        let numbers: Vec<u64> = chunk
            .records
            .chunks_exact(RECORD_BYTES)
            .map(|record| u64::from_le_bytes(record[..8].try_into().unwrap()))
            .collect();
        assert!(numbers.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(chunk.records.len() <= OUTPUT_RECORDS_BYTES_MAX);
    }
    // The same set gives the same chunks (what every correct replica signs).
    let mut again = Vec::new();
    in_flight_chunks(legs.clone(), records_max, &mut again).unwrap();
    assert_eq!(again, chunks);
    // No legs, no chunks; two operations for one destination are refused.
    in_flight_chunks(Vec::<Leg>::new(), records_max, &mut again).unwrap();
    assert!(again.is_empty());
    let mut mixed = legs[..4].to_vec();
    mixed[3].operation = 257;
    mixed[3].shard = 1;
    assert!(matches!(
        in_flight_chunks(mixed, records_max, &mut again),
        Err(XShardError::OperationMismatch { .. })
    ));
}

#[test]
fn in_flight_chunks_are_cut_at_the_batch_cap_so_each_fits_a_batch() {
    // More legs in flight to group 1 than two batches hold, far below the byte limit.
    let count = 2 * BATCH_RECORDS_MAX + 3;
    assert!(count * RECORD_BYTES < OUTPUT_RECORDS_BYTES_MAX);
    assert_eq!(
        in_flight_chunk_records_max(RECORD_BYTES, BATCH_RECORDS_MAX),
        BATCH_RECORDS_MAX
    );
    let legs = numbered_legs(count, |_| 1, LedgerOperation::ApplyCreditLegs as u16);
    let (chunks, shape) = chunk_shape(&legs, BATCH_RECORDS_MAX);
    assert_eq!(
        shape,
        vec![
            (1, 0, BATCH_RECORDS_MAX),
            (1, 1, BATCH_RECORDS_MAX),
            (1, 2, 3)
        ]
    );
    let limits = (RECORD_BYTES, BATCH_RECORDS_MAX);
    assert_eq!(in_flight_chunks_max(count, limits, 1), chunks.len());
    // Every leg once, in ring order.
    let cut: Vec<u8> = chunks
        .iter()
        .flat_map(|chunk| chunk.records.clone())
        .collect();
    let whole: Vec<u8> = legs.iter().flat_map(|leg| leg.record).collect();
    assert_eq!(cut, whole);
    // Certified and delivered, every chunk is queued at the destination and proposed, each
    // in a batch of its own.
    let keys = keys(1);
    let mut group = collectors(&keys, 0);
    assert!(
        certify_in_flight(&mut group, 0, 40, &chunks)
            .iter()
            .all(Vec::is_empty)
    );
    let mut actions = Vec::new();
    group[0].on_tick(IN_FLIGHT_DELIVER_AFTER_US, &mut actions);
    assert_eq!(actions.len(), chunks.len());
    let mut inbound = InboundProofs::new(1, limits, groups_of(&keys), 4).unwrap();
    for action in actions {
        let XShardAction::Deliver(proof) = action else {
            panic!("{action:?}")
        };
        inbound.on_proven(proof).unwrap();
    }
    for chunk in &chunks {
        let batch = inbound.take_batch(0, 0, BATCH_RECORDS_MAX).unwrap();
        assert_eq!(batch.proofs.len(), 1);
        assert_eq!(batch.proofs[0].records, chunk.records);
    }
    assert_eq!(inbound.take_batch(0, 0, BATCH_RECORDS_MAX), None);
}

#[test]
fn a_quorum_certifies_in_flight_legs_delivered_only_late_and_released_when_settled() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut group = collectors(&keys, 0);
    let chunks = vec![InFlightChunk {
        destination: 1,
        chunk: 0,
        operation: LedgerOperation::ApplyCreditLegs as u16,
        records: records(3, 5),
    }];
    let delivered = certify_in_flight(&mut group, 0, 40, &chunks);
    // Certified at once, but not delivered: the legs' own outputs normally settle them.
    assert!(delivered.iter().all(Vec::is_empty));
    let kind = OutputsKind::InFlight { chunk: 0 };
    for collector in &group {
        assert!(collector.is_certified_kind(1, 40, kind));
        assert!(
            !collector.is_certified(1, 40),
            "another kind than the op's outputs"
        );
        assert_eq!(collector.in_flight_kept(), 1);
        assert_eq!(collector.outputs_kept(), 0);
        assert_eq!(collector.metrics().in_flight_certified, 1);
    }
    let mut actions = Vec::new();
    group[0].on_tick(IN_FLIGHT_DELIVER_AFTER_US - 1, &mut actions);
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(group[0].poll_timeout(), Some(IN_FLIGHT_DELIVER_AFTER_US));
    // Still unsettled once due: delivered, and again every resend interval.
    group[0].on_tick(IN_FLIGHT_DELIVER_AFTER_US, &mut actions);
    let [XShardAction::Deliver(proof)] = actions.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(proof.key(), (0, 40, kind));
    groups
        .verify_proven(proof, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    assert_eq!(group[0].metrics().in_flight_deliveries, 1);
    // A settled chunk goes (and is never delivered again).
    let released = group[1].release_settled(IN_FLIGHT_DELIVER_AFTER_US - 1, 0, |_, _| true);
    assert_eq!(released, 1);
    assert_eq!(group[1].in_flight_kept(), 0);
    let mut actions = Vec::new();
    group[1].on_tick(10 * IN_FLIGHT_DELIVER_AFTER_US, &mut actions);
    assert!(actions.is_empty());
}

#[test]
fn in_flight_legs_altered_added_or_left_out_are_refused() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut group = collectors(&keys, 0);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let chunk = InFlightChunk {
        destination: 1,
        chunk: 0,
        operation,
        records: records(3, 5),
    };
    // Replica 3 holds another in-flight set (a leg fewer): its vote matches no one's.
    let mut outbox = Vec::new();
    for (replica, collector) in group.iter_mut().enumerate() {
        let mut mine = chunk.clone();
        if replica == 3 {
            mine.records.truncate(2 * RECORD_BYTES);
        }
        let mut actions = Vec::new();
        collector
            .on_in_flight(0, 40, vec![mine], &mut actions)
            .unwrap();
        outbox.push((replica as u8, actions));
    }
    exchange(&mut group, &[0, 1, 2, 3], outbox);
    assert!(group[0].metrics().votes_refused >= 1);
    assert!(!group[3].is_certified_kind(1, 40, OutputsKind::InFlight { chunk: 0 }));
    let mut actions = Vec::new();
    group[0].on_tick(IN_FLIGHT_DELIVER_AFTER_US, &mut actions);
    let Some(XShardAction::Deliver(honest)) = actions.pop() else {
        panic!("certified by 0, 1 and 2")
    };
    groups
        .verify_proven(&honest, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    let mut altered = honest.clone();
    altered.records[130] ^= 1;
    let mut added = honest.clone();
    added.records.extend_from_slice(&records(1, 9));
    let mut left_out = honest.clone();
    left_out.records.truncate(2 * RECORD_BYTES);
    for forged in [altered, added, left_out] {
        assert_eq!(
            groups.verify_proven(&forged, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
            Err(XShardError::DigestMismatch { origin: 0, op: 40 })
        );
    }
    // The certificate presented as the outputs of op 40, or as another chunk: refused.
    for kind in [OutputsKind::Op, OutputsKind::InFlight { chunk: 1 }] {
        let mut relabelled = honest.clone();
        relabelled.cert.statement.kind = kind;
        assert!(
            groups
                .verify_proven(&relabelled, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
                .is_err()
        );
    }
    // Proven batches keep `(origin, op, kind)` distinct: the op's outputs and its in-flight
    // chunk may travel together, a chunk twice may not.
    let outputs = prove(&keys, &[0, 1, 2], (0, 1, 40), records(1, 1));
    let mut batch = ProvenBatch {
        operation,
        now_ns: 1,
        proofs: vec![outputs, honest.clone()],
    };
    groups
        .verify_batch(&batch, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
        .unwrap();
    let mut bytes = Vec::new();
    encode_batch(&batch, &mut bytes);
    assert_eq!(
        groups
            .verify_batch_bytes(&bytes, 1, RECORD_BYTES, BATCH_RECORDS_MAX)
            .unwrap(),
        batch
    );
    batch.proofs.push(honest);
    assert_eq!(
        groups.verify_batch(&batch, 1, RECORD_BYTES, BATCH_RECORDS_MAX),
        Err(XShardError::DuplicateProof { origin: 0, op: 40 })
    );
}

#[test]
fn collectors_keep_the_in_flight_chunks_of_the_last_two_snapshot_ops_only() {
    let keys = keys(1);
    let mut group = collectors(&keys, 0);
    let operation = LedgerOperation::ApplyCreditLegs as u16;
    let chunk = |salt: u8| InFlightChunk {
        destination: 1,
        chunk: 0,
        operation,
        records: records(1, salt),
    };
    let collector = &mut group[0];
    let mut actions = Vec::new();
    for (op, salt) in [(10, 1), (20, 2)] {
        assert_eq!(
            collector.on_in_flight(0, op, vec![chunk(salt)], &mut actions),
            Ok(1)
        );
    }
    // The same snapshot op again (two BFT ops that end at one journal op): nothing new.
    assert_eq!(
        collector.on_in_flight(0, 20, vec![chunk(2)], &mut actions),
        Ok(0)
    );
    assert_eq!(collector.in_flight_kept(), 2);
    // A third snapshot op pushes out the oldest one's chunks.
    assert_eq!(
        collector.on_in_flight(0, 30, vec![chunk(3)], &mut actions),
        Ok(1)
    );
    assert_eq!(collector.in_flight_kept(), 2);
    let kind = OutputsKind::InFlight { chunk: 0 };
    let mut answer = Vec::new();
    let old = OutputsStatement {
        origin: 0,
        destination: 1,
        op: 10,
        kind,
        digest: in_flight_digest(0, 1, 10, 0, operation, &records(1, 1)),
    };
    assert_eq!(
        group[0].on_vote(OutputsVote::sign(&keys[1], 1, old), &mut answer),
        Err(XShardError::NotProduced {
            destination: 1,
            op: 10
        })
    );
    // Below every kept one: refused. More chunks than one snapshot op can have: refused.
    assert_eq!(
        group[0].on_in_flight(0, 15, vec![chunk(4)], &mut actions),
        Err(XShardError::Stale)
    );
    let too_many: Vec<InFlightChunk> = (0..5)
        .map(|index| InFlightChunk {
            chunk: index,
            ..chunk(5)
        })
        .collect();
    assert_eq!(
        group[0].on_in_flight(0, 40, too_many, &mut actions),
        Err(XShardError::Full("in-flight chunks"))
    );
    assert_eq!(group[0].in_flight_kept(), 2);
    // In-flight chunks do not take the room of op outputs.
    for op in 1..=8 {
        group[0]
            .on_produced(0, op, 1, operation, records(1, op as u8), &mut actions)
            .unwrap();
    }
    assert_eq!(group[0].outputs_kept(), 8);
    assert_eq!(group[0].kept(), 10);
}

#[test]
fn a_leg_certified_again_from_state_is_applied_once_and_settles() {
    let keys = keys(1);
    let groups = groups_of(&keys);
    let mut shards = [Shard::new(0, &keys), Shard::new(1, &keys)];
    let id_on = |shard: u32, skip: usize| {
        (1u128..)
            .filter(|&id| shard_of(id, GROUP_COUNT) == shard)
            .nth(skip)
            .unwrap()
    };
    let (payer, payee) = (id_on(0, 0), id_on(1, 0));
    for (shard, id, flags) in [(0, payer, account_flags::ALLOW_NEGATIVE), (1, payee, 0)] {
        let mut account = [RecordSlot::from_account(&Account {
            id,
            ledger: 1,
            code: 1,
            flags,
            ..Account::zeroed()
        })];
        assert_eq!(
            shards[shard].apply(LedgerOperation::CreateAccounts, 10, &mut account),
            vec![0]
        );
    }
    let transfer = |id: u128, amount: u128| {
        RecordSlot::from_transfer(&Transfer {
            id,
            debit_account_id: payer,
            credit_account_id: payee,
            amount,
            ledger: 1,
            code: 1,
            ..Transfer::zeroed()
        })
    };
    // Two transfers, two legs: the first one's outputs are certified and applied at group
    // 1 (its acknowledgement is then lost); the second one's outputs never arrive.
    let mut first = [transfer(77, 500)];
    assert_eq!(
        shards[0].apply(LedgerOperation::CreateTransfers, 20, &mut first),
        vec![0]
    );
    let leg = shards[0].certify_outputs().unwrap();
    let mut second = [transfer(78, 30)];
    assert_eq!(
        shards[0].apply(LedgerOperation::CreateTransfers, 30, &mut second),
        vec![0]
    );
    let lost = shards[0].certify_outputs().unwrap();
    drop(lost);
    shards[1].inbound.on_proven(leg).unwrap();
    assert_eq!(
        shards[1].commit_inbound(&groups),
        vec![CreditLegResult::Ok as u32]
    );
    let lost_ack = shards[1].certify_outputs().unwrap();
    drop(lost_ack);
    assert_eq!(shards[0].ledger.in_flight(), 530);
    // Snapshot op: group 0 certifies its in-flight set from state (both legs, one chunk),
    // and, still unsettled when due, delivers it.
    let checkpoint_op = shards[0].op;
    let chunks = ledger_in_flight(&shards[0].ledger);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].records.len(), 2 * RECORD_BYTES);
    certify_in_flight(&mut shards[0].group, 0, checkpoint_op, &chunks);
    let mut actions = Vec::new();
    shards[0].group[2].on_tick(IN_FLIGHT_DELIVER_AFTER_US, &mut actions);
    let Some(XShardAction::Deliver(resent)) = actions.pop() else {
        panic!("due and unsettled")
    };
    // Group 1 applies it: the first leg is a duplicate (acknowledged again, nothing
    // credited), the second is new.
    shards[1].inbound.on_proven(resent.clone()).unwrap();
    assert_eq!(
        shards[1].commit_inbound(&groups),
        vec![
            CreditLegResult::Duplicate as u32,
            CreditLegResult::Ok as u32
        ]
    );
    let credited = shards[1]
        .ledger
        .lookup_account(payee)
        .unwrap()
        .credits_posted;
    assert_eq!(credited, 530, "each leg credited once");
    // Both acknowledgements go back; the legs settle, and so does the chunk.
    let acks = shards[1].certify_outputs().unwrap();
    assert_eq!(acks.records.len(), 2 * RECORD_BYTES);
    shards[0].inbound.on_proven(acks).unwrap();
    assert_eq!(
        shards[0].commit_inbound(&groups),
        vec![CreditAckResult::Ok as u32, CreditAckResult::Ok as u32]
    );
    assert_eq!(shards[0].ledger.in_flight(), 0);
    let ledger = &shards[0].ledger;
    for collector in &mut shards[0].group {
        let released = collector.release_settled(IN_FLIGHT_DELIVER_AFTER_US, 0, |op, bytes| {
            let typed: Vec<RecordSlot> = bytes
                .chunks_exact(RECORD_BYTES)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            ledger.outputs_settled(LedgerOperation::try_from(op).unwrap(), &typed)
        });
        assert_eq!(released, 3, "both legs' outputs and the chunk");
        assert_eq!(collector.kept(), 0);
    }
    assert!(ledger_in_flight(&shards[0].ledger).is_empty());
    // Delivered again later (say, by a replica that had not released it yet): duplicates
    // only, acknowledged again, nothing credited, nothing put back in flight.
    shards[1].inbound.on_proven(resent).unwrap();
    assert_eq!(
        shards[1].commit_inbound(&groups),
        vec![CreditLegResult::Duplicate as u32; 2]
    );
    let again = shards[1].certify_outputs().unwrap();
    shards[0].inbound.on_proven(again).unwrap();
    assert_eq!(
        shards[0].commit_inbound(&groups),
        vec![CreditAckResult::Duplicate as u32; 2]
    );
    let credited = shards[1]
        .ledger
        .lookup_account(payee)
        .unwrap()
        .credits_posted;
    assert_eq!(credited, 530);
    assert_eq!(shards[0].ledger.in_flight(), 0);
    let conservation: i128 = shards
        .iter()
        .map(|shard| shard.ledger.conservation_sum())
        .sum();
    assert_eq!(conservation, 0, "balances + suspense + in flight");
}

/// `count` legs numbered 0.. in ring order (the number in a record's first 8 bytes), leg
/// `i` to group `destination(i)`.
fn numbered_legs(
    count: usize,
    destination: impl Fn(usize) -> u32,
    operation: u16,
) -> Vec<Outbound<u16, [u8; RECORD_BYTES]>> {
    (0..count)
        .map(|sequence| {
            let mut record = [0u8; RECORD_BYTES];
            record[..8].copy_from_slice(&(sequence as u64).to_le_bytes());
            Outbound {
                shard: destination(sequence),
                operation,
                record,
            }
        })
        .collect()
}

/// The in-flight chunks of `legs` cut for batches of `records_max`, and their shape:
/// `(destination, chunk, records)` each.
fn chunk_shape(
    legs: &[Outbound<u16, [u8; RECORD_BYTES]>],
    records_max: usize,
) -> (Vec<InFlightChunk>, Vec<(u32, u32, usize)>) {
    let mut chunks = Vec::new();
    in_flight_chunks(legs.to_vec(), records_max, &mut chunks).unwrap();
    let shape = chunks
        .iter()
        .map(|chunk| {
            (
                chunk.destination,
                chunk.chunk,
                chunk.records.len() / RECORD_BYTES,
            )
        })
        .collect();
    (chunks, shape)
}
