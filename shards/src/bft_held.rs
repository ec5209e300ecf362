//! The sends a BFT shard holds back until the disk writes they depend on are durable
//! (`docs/bft.md` §12): the two rules of the driver's contract with the core, kept apart.
//!
//! - **Vote guard** (`Action::PersistGuard`): every message the core makes after asking for a
//!   guard waits for that guard to be durable (a vote never reaches a peer before the guard
//!   that covers it). Guard writes are rare: a guard reserves two windows of ops ahead.
//! - **Prepared certificate** (`Action::PersistPrepared`): a message that carries this
//!   replica's Commit vote also waits for the prepared certificates asked for before it
//!   ([`wait_of`]). One is asked for before every Commit, so this is the write on the hot
//!   path, and nothing else waits for it.
//!
//! Two FIFO queues, one per rule, so a Commit waiting for a prepared certificate append never
//! holds back a later Prepare or proposal. The two writes are independent but for one order:
//! a prepared certificate holds this replica's own PrePrepare or Prepare, so it is appended
//! only once the guard asked for before it is durable ([`HeldSends::prepared_may_write`]);
//! otherwise a restart could find a vote on disk that its restored guard does not cover, and
//! sign a conflicting one. It also remembers each op's prepared request, which the journal
//! write of the committed op waits for ([`HeldSends::prepared_for_commit`]).
//!
//! The queues are bounded (messages per queue, bytes for both); a send that does not fit is
//! dropped and counted by the driver, like a full peer outbox (the protocol retransmits
//! what it needs). Sans-IO: the driver ([`crate::bft`]) and the simulator report requests
//! and durable writes, and send what [`HeldSends::pop_ready`] returns.

use std::collections::VecDeque;

use percore_engine::bft::{self, Message, codec};

use crate::bft::{BFT_MESSAGE_BYTES_MIN, BFT_SEND_QUEUE_BYTES_DEFAULT};

/// Sends held for the vote guard only, at most (messages).
pub const HELD_GUARD_SENDS_MAX: usize = 1_024;
/// Sends held for a prepared certificate (and the guard), at most (messages): about one
/// Commit per op of the window, plus the rare commit proofs and state transfer answers.
pub const HELD_COMMIT_SENDS_MAX: usize = 1_024;
/// Encoded bytes of every held send together, at most, by default ([`HeldSends::new`]); a
/// shard whose largest message needs more holds more
/// ([`crate::bft::BftMessageLimits::held_bytes_max`]).
pub const HELD_BYTES_MAX: usize = BFT_SEND_QUEUE_BYTES_DEFAULT;
/// Prepared requests remembered by op until the op commits ([`HeldSends::prepared_for_commit`]):
/// one per op of the window and view; past this, the oldest is forgotten and its request
/// number waited for by every later commit (safe, only slower).
pub const PREPARED_OPS_TRACKED: usize = 4 * bft::LOG_WINDOW_OPS_DEFAULT as usize;

const _: () = assert!(BFT_MESSAGE_BYTES_MIN <= HELD_BYTES_MAX);
const _: () = assert!(HELD_COMMIT_SENDS_MAX >= bft::LOG_WINDOW_OPS_DEFAULT as usize);
// A held send names its peers in one byte.
const _: () = assert!(bft::REPLICA_COUNT_MAX <= 8);

/// What a message must wait for before it leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Nothing: the snapshot transfer's requests and chunks are the driver's own, unsigned,
    /// and carry no vote.
    Nothing,
    /// The vote guard asked for before it.
    Guard,
    /// The vote guard and the prepared certificates asked for before it.
    GuardAndPrepared,
}

/// What `message` waits for. Every message the core makes waits for the guard, even one
/// that signs nothing itself, so that the core's sends to one peer keep their order except
/// where a Commit is held.
///
/// Those that wait for the prepared certificates as well are the ones that can carry this
/// replica's Commit vote: the Commit itself, and a `CommitProof` or `StateOps` whose commit
/// certificates may hold it (the core certifies with its own Commit). A peer that counts that
/// vote towards a commit needs this replica to report the prepared certificate in every later
/// ViewChange, a restart included (§7: `f + 1` correct replicas of a commit quorum report a
/// committed op), so it must not leave before the certificate is durable.
///
/// Nothing else reveals the vote, so nothing else waits for it:
/// - a ViewChange or NewView carries prepared certificates, never Commits; one sent before a
///   held Commit reports the certificate from memory, and if the replica crashes before the
///   write lands, the Commit is lost with it: no peer counted it;
/// - a Prepare, PrePrepare, Checkpoint, StateCheckpoint or Status needs no prepared
///   certificate, and no receiver relies on a replica's Commit for op `n` arriving before
///   its later messages: a Commit refused because its receiver has moved on to a later view
///   is the same as one lost, which the protocol tolerates (the receiver's view change
///   carries what the Commits would have), and Commits are counted per op, in any order.
pub fn wait_of(message: &Message) -> Wait {
    match message {
        Message::SnapshotRequest { .. } | Message::SnapshotChunk { .. } => Wait::Nothing,
        Message::Commit(_) | Message::CommitProof { .. } | Message::StateOps(_) => {
            Wait::GuardAndPrepared
        }
        Message::PrePrepare { .. }
        | Message::Prepare { .. }
        | Message::Checkpoint(_)
        | Message::ViewChange(_)
        | Message::NewView(_)
        | Message::Status { .. }
        | Message::CheckpointProof(_)
        | Message::StateRequest { .. }
        | Message::StateCheckpoint { .. }
        | Message::StateSnapshot(_) => Wait::Guard,
    }
}

/// A send held until the requests it waits for are durable.
#[derive(Debug)]
pub struct HeldSend {
    /// Bit `i`: peer `i`.
    pub peers: u8,
    /// The message.
    pub message: Message,
    /// The guard request current when it was made.
    guard: u64,
    /// The prepared request current when it was made (0 for a send that waits for the
    /// guard only).
    prepared: u64,
    /// When it was made, among all held sends: ready sends of both queues leave in this order.
    order: u64,
    bytes: usize,
}

impl HeldSend {
    /// The peers it goes to, and how many.
    pub fn tos(&self) -> ([u8; bft::REPLICA_COUNT_MAX], usize) {
        let mut tos = [0u8; bft::REPLICA_COUNT_MAX];
        let mut count = 0;
        for peer in 0..bft::REPLICA_COUNT_MAX as u8 {
            if self.peers & (1 << peer) != 0 {
                tos[count] = peer;
                count += 1;
            }
        }
        (tos, count)
    }
}

/// What [`HeldSends::offer`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Everything it waits for is durable: send it now.
    SendNow,
    /// Held; [`HeldSends::pop_ready`] returns it once it may leave.
    Held,
    /// Its queue is full: dropped (the driver counts it).
    Dropped,
}

/// The request numbers of both writes and the sends waiting for them.
#[derive(Debug)]
pub struct HeldSends {
    guard_requested: u64,
    guard_durable: u64,
    prepared_requested: u64,
    prepared_durable: u64,
    /// The guard request current at the latest prepared request.
    prepared_guard: u64,
    /// `(op, prepared request)` of the requests whose op has not committed yet.
    prepared_ops: VecDeque<(u64, u64)>,
    /// The highest request forgotten from a full `prepared_ops`.
    prepared_ops_floor: u64,
    /// Sends that wait for the guard only, oldest first.
    guard_queue: VecDeque<HeldSend>,
    /// Sends that wait for a prepared certificate and the guard, oldest first.
    commit_queue: VecDeque<HeldSend>,
    bytes: usize,
    /// Most encoded bytes held together.
    bytes_max: usize,
    orders: u64,
}

impl Default for HeldSends {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldSends {
    /// Nothing requested, nothing held; the queues allocated; at most [`HELD_BYTES_MAX`]
    /// encoded bytes held.
    pub fn new() -> Self {
        Self::with_bytes_max(HELD_BYTES_MAX)
    }

    /// As [`Self::new`], holding at most `bytes_max` encoded bytes together (at least two
    /// of the shard's largest messages: a ViewChange and the NewView after it wait for one
    /// guard).
    pub fn with_bytes_max(bytes_max: usize) -> Self {
        assert!(bytes_max > 0);
        Self {
            guard_requested: 0,
            guard_durable: 0,
            prepared_requested: 0,
            prepared_durable: 0,
            prepared_guard: 0,
            prepared_ops: VecDeque::with_capacity(PREPARED_OPS_TRACKED),
            prepared_ops_floor: 0,
            guard_queue: VecDeque::with_capacity(HELD_GUARD_SENDS_MAX),
            commit_queue: VecDeque::with_capacity(HELD_COMMIT_SENDS_MAX),
            bytes: 0,
            bytes_max,
            orders: 0,
        }
    }

    /// The core asked for a guard: the sends from here on wait for it. Returns its number.
    pub fn request_guard(&mut self) -> u64 {
        self.guard_requested += 1;
        self.guard_requested
    }

    /// The core asked for the prepared certificate of `op`: the Commits from here on wait
    /// for it. Returns its number.
    pub fn request_prepared(&mut self, op: u64) -> u64 {
        self.prepared_requested += 1;
        self.prepared_guard = self.guard_requested;
        if self.prepared_ops.len() == PREPARED_OPS_TRACKED {
            let (_, forgotten) = self.prepared_ops.pop_front().expect("full");
            self.prepared_ops_floor = self.prepared_ops_floor.max(forgotten);
        }
        self.prepared_ops.push_back((op, self.prepared_requested));
        self.prepared_requested
    }

    /// `op` committed (ops commit in order): the prepared request its journal write must
    /// wait for, the latest one for `op` asked for in this life (0 if none: then its commit
    /// certificate holds no Commit this replica signed since its start, or one whose
    /// certificate was durable before). Not the latest request of all: the next op's
    /// append need not delay this one's journal write.
    pub fn prepared_for_commit(&mut self, op: u64) -> u64 {
        let mut needed = self.prepared_ops_floor;
        self.prepared_ops.retain(|&(prepared_op, request)| {
            if prepared_op == op {
                needed = needed.max(request);
            }
            prepared_op > op
        });
        needed
    }

    /// The latest guard request, and the last one durable.
    pub fn guard(&self) -> (u64, u64) {
        (self.guard_requested, self.guard_durable)
    }

    /// The latest prepared request, and the last one durable.
    pub fn prepared(&self) -> (u64, u64) {
        (self.prepared_requested, self.prepared_durable)
    }

    /// Whether the prepared certificates asked for so far may be written: the guard asked
    /// for before the latest of them, which covers the votes they hold, is durable.
    pub fn prepared_may_write(&self) -> bool {
        self.guard_durable >= self.prepared_guard
    }

    /// Every guard request up to `sequence` is durable (then call [`Self::pop_ready`]).
    pub fn guard_landed(&mut self, sequence: u64) {
        assert!(sequence >= self.guard_durable && sequence <= self.guard_requested);
        self.guard_durable = sequence;
    }

    /// Every prepared request up to `sequence` is durable (then call [`Self::pop_ready`]).
    pub fn prepared_landed(&mut self, sequence: u64) {
        assert!(sequence >= self.prepared_durable && sequence <= self.prepared_requested);
        self.prepared_durable = sequence;
    }

    /// Decides `message` to `peers` (bit `i`: peer `i`): now, held (cloned), or dropped. A
    /// send joins its queue's tail whenever that queue holds anything, so each queue keeps
    /// the order the core made its sends in.
    pub fn offer(&mut self, peers: u8, message: &Message) -> Offered {
        let wait = wait_of(message);
        let guard_waits = self.guard_durable < self.guard_requested;
        let prepared_waits = wait == Wait::GuardAndPrepared
            && (self.prepared_durable < self.prepared_requested || !self.commit_queue.is_empty());
        let held = match wait {
            Wait::Nothing => return Offered::SendNow,
            Wait::Guard => guard_waits || !self.guard_queue.is_empty(),
            Wait::GuardAndPrepared => guard_waits || prepared_waits,
        };
        if !held {
            return Offered::SendNow;
        }
        let (queue, sends_max) = match wait {
            Wait::GuardAndPrepared => (&mut self.commit_queue, HELD_COMMIT_SENDS_MAX),
            _ => (&mut self.guard_queue, HELD_GUARD_SENDS_MAX),
        };
        let bytes = codec::encoded_bytes(message);
        if queue.len() == sends_max || self.bytes + bytes > self.bytes_max {
            return Offered::Dropped;
        }
        self.bytes += bytes;
        self.orders += 1;
        queue.push_back(HeldSend {
            peers,
            message: message.clone(),
            guard: self.guard_requested,
            prepared: match wait {
                Wait::GuardAndPrepared => self.prepared_requested,
                _ => 0,
            },
            order: self.orders,
            bytes,
        });
        Offered::Held
    }

    /// The oldest held send whose requests are all durable, if any: of the two queues'
    /// ready heads, the one made first.
    pub fn pop_ready(&mut self) -> Option<HeldSend> {
        let guard_ready = self
            .guard_queue
            .front()
            .filter(|send| send.guard <= self.guard_durable)
            .map(|send| send.order);
        let commit_ready = self
            .commit_queue
            .front()
            .filter(|send| {
                send.guard <= self.guard_durable && send.prepared <= self.prepared_durable
            })
            .map(|send| send.order);
        let send = match (guard_ready, commit_ready) {
            (Some(guard), Some(commit)) if commit < guard => self.commit_queue.pop_front(),
            (Some(_), _) => self.guard_queue.pop_front(),
            (None, Some(_)) => self.commit_queue.pop_front(),
            (None, None) => None,
        }?;
        self.bytes -= send.bytes;
        debug_assert!(
            send.guard <= self.guard_durable && send.prepared <= self.prepared_durable,
            "a held send leaves only once what it waits for is durable"
        );
        debug_assert!(
            self.bytes > 0 || (self.guard_queue.is_empty() && self.commit_queue.is_empty()),
            "the byte count covers every held send"
        );
        Some(send)
    }

    /// Sends held: waiting for the guard only, and for a prepared certificate.
    pub fn held(&self) -> (usize, usize) {
        (self.guard_queue.len(), self.commit_queue.len())
    }

    /// Encoded bytes of every held send.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use percore_engine::bft::{CommitCert, Signature, ViewChange, Vote, VoteKind};

    fn vote(kind: VoteKind, op: u64) -> Vote {
        Vote {
            kind,
            view: 1,
            op,
            digest: [op as u8; 32],
            replica: 2,
            signature: Signature::from_bytes(&[0; 64]),
        }
    }

    fn commit(op: u64) -> Message {
        Message::Commit(vote(VoteKind::Commit, op))
    }

    fn prepare(op: u64) -> Message {
        Message::Prepare {
            vote: vote(VoteKind::Prepare, op),
            pre_prepare: vote(VoteKind::PrePrepare, op),
        }
    }

    fn view_change() -> Message {
        Message::ViewChange(Box::new(ViewChange {
            vote: vote(VoteKind::ViewChange, 0),
            checkpoint: None,
            prepared: Vec::new(),
        }))
    }

    /// The ops of the sends ready now, in the order they leave (Status carries its
    /// `commit_op` as the op).
    fn drain(held: &mut HeldSends) -> Vec<(&'static str, u64)> {
        std::iter::from_fn(|| held.pop_ready())
            .map(|send| {
                let op = match &send.message {
                    Message::Commit(vote) => vote.op,
                    Message::Prepare { vote, .. } => vote.op,
                    Message::Status { commit_op, .. } => *commit_op,
                    _ => 0,
                };
                (send.message.name(), op)
            })
            .collect()
    }

    #[test]
    fn a_prepare_after_a_pending_prepared_write_leaves_at_once_and_the_commit_waits() {
        let mut held = HeldSends::new();
        let sequence = held.request_prepared(7);
        assert_eq!(held.offer(0b1110, &commit(7)), Offered::Held);
        // The next op's Prepare, a ViewChange and a Status do not wait for op 7's
        // certificate (one FIFO for everything held them all behind it).
        assert_eq!(held.offer(0b1110, &prepare(8)), Offered::SendNow);
        assert_eq!(held.offer(0b1110, &view_change()), Offered::SendNow);
        let status = Message::Status {
            view: 1,
            commit_op: 6,
            low: 0,
        };
        assert_eq!(held.offer(0b0010, &status), Offered::SendNow);
        // What reveals the Commit vote waits with it, behind it.
        let proof = Message::CommitProof {
            pre_prepare: vote(VoteKind::PrePrepare, 7),
            cert: CommitCert {
                commits: vec![vote(VoteKind::Commit, 7)],
            },
            batch: Vec::new(),
        };
        assert_eq!(held.offer(0b0010, &proof), Offered::Held);
        assert_eq!(
            held.offer(0b0010, &Message::StateOps(Vec::new())),
            Offered::Held
        );
        assert_eq!(held.pop_ready().map(|send| send.peers), None);
        assert_eq!(held.held(), (0, 3));
        held.prepared_landed(sequence);
        assert_eq!(
            drain(&mut held),
            [("commit", 7), ("commit_proof", 0), ("state_ops", 0)]
        );
        assert_eq!((held.held(), held.held_bytes()), ((0, 0), 0));
        // Nothing pending: a Commit leaves at once too.
        assert_eq!(held.offer(0b1110, &commit(8)), Offered::SendNow);
    }

    #[test]
    fn a_pending_guard_holds_every_vote_and_a_commit_waits_for_both_writes() {
        let mut held = HeldSends::new();
        let prepared = held.request_prepared(7);
        let guard = held.request_guard();
        assert_eq!(held.offer(0b1110, &commit(7)), Offered::Held);
        assert_eq!(held.offer(0b1110, &prepare(8)), Offered::Held);
        assert_eq!(held.offer(0b1110, &view_change()), Offered::Held);
        let chunk = Message::SnapshotChunk {
            journal_op: 1,
            offset: 0,
            file_bytes: 0,
            bytes: Vec::new(),
        };
        assert_eq!(held.offer(0b0010, &chunk), Offered::SendNow);
        // The prepared write lands first: the Commit still waits for the guard.
        held.prepared_landed(prepared);
        assert!(drain(&mut held).is_empty());
        held.guard_landed(guard);
        assert_eq!(
            drain(&mut held),
            [("commit", 7), ("prepare", 8), ("view_change", 0)]
        );
        // The guard lands first: the votes leave, the Commit stays.
        let prepared = held.request_prepared(9);
        let guard = held.request_guard();
        assert_eq!(held.offer(0b1110, &commit(9)), Offered::Held);
        assert_eq!(held.offer(0b1110, &prepare(10)), Offered::Held);
        held.guard_landed(guard);
        assert_eq!(drain(&mut held), [("prepare", 10)]);
        held.prepared_landed(prepared);
        assert_eq!(drain(&mut held), [("commit", 9)]);
    }

    #[test]
    fn a_prepared_certificate_is_written_only_after_the_guard_asked_for_before_it() {
        let mut held = HeldSends::new();
        held.request_prepared(1);
        assert!(held.prepared_may_write(), "no guard pending");
        let guard = held.request_guard();
        assert!(held.prepared_may_write(), "asked for after the certificate");
        held.request_prepared(2);
        assert!(
            !held.prepared_may_write(),
            "its votes may need the pending guard"
        );
        held.guard_landed(guard);
        assert!(held.prepared_may_write());
    }

    #[test]
    fn a_journal_write_waits_for_its_own_ops_prepared_request_only() {
        let mut held = HeldSends::new();
        let first = held.request_prepared(5);
        let again = held.request_prepared(5); // a later view's certificate for op 5
        let next = held.request_prepared(6);
        assert_eq!((first, again, next), (1, 2, 3));
        assert_eq!(held.prepared_for_commit(5), again);
        // Op 6 committed through a certificate it did not vote in: nothing asked for op 7.
        assert_eq!(held.prepared_for_commit(7), 0);
        assert_eq!(
            held.prepared_for_commit(6),
            0,
            "forgotten once op 7 committed"
        );
        // Past the bound the oldest request is forgotten and waited for by every commit.
        for op in 0..PREPARED_OPS_TRACKED as u64 + 1 {
            held.request_prepared(100 + op);
        }
        let forgotten = next + 1;
        assert_eq!(held.prepared_for_commit(99), forgotten);
        assert_eq!(held.prepared_for_commit(101), forgotten + 1);
    }

    #[test]
    fn each_commit_waits_for_the_prepared_request_current_when_it_was_made() {
        let mut held = HeldSends::new();
        let first = held.request_prepared(7);
        assert_eq!(held.offer(0b1110, &commit(7)), Offered::Held);
        let second = held.request_prepared(8);
        assert_eq!(held.offer(0b1110, &commit(8)), Offered::Held);
        held.prepared_landed(first);
        assert_eq!(drain(&mut held), [("commit", 7)]);
        // Durable, but the queue still holds op 8's Commit: op 9's goes behind it.
        held.prepared_landed(first);
        assert_eq!(held.prepared(), (second, first));
        let third = held.request_prepared(9);
        assert_eq!(held.offer(0b1110, &commit(9)), Offered::Held);
        held.prepared_landed(third);
        assert_eq!(drain(&mut held), [("commit", 8), ("commit", 9)]);
    }

    #[test]
    fn full_queues_drop_and_a_full_guard_queue_leaves_room_for_commits() {
        let mut held = HeldSends::new();
        let guard = held.request_guard();
        for op in 0..HELD_GUARD_SENDS_MAX as u64 {
            assert_eq!(held.offer(0b1110, &prepare(op)), Offered::Held);
        }
        assert_eq!(held.offer(0b1110, &prepare(0)), Offered::Dropped);
        assert_eq!(held.offer(0b1110, &commit(1)), Offered::Held);
        let bytes = held.held_bytes();
        assert_eq!(
            bytes,
            HELD_GUARD_SENDS_MAX * codec::encoded_bytes(&prepare(0))
                + codec::encoded_bytes(&commit(1))
        );
        // The byte bound holds for both queues together.
        let large = Message::StateOps(vec![(
            CommitCert {
                commits: Vec::new(),
            },
            vec![0; HELD_BYTES_MAX - bytes],
        )]);
        assert_eq!(held.offer(0b0010, &large), Offered::Dropped);
        held.guard_landed(guard);
        assert_eq!(drain(&mut held).len(), HELD_GUARD_SENDS_MAX + 1);
        assert_eq!(held.held_bytes(), 0);
    }

    #[test]
    fn held_sends_leave_in_the_order_made_and_never_before_their_writes() {
        // Against a model: random requests, landings and offers; every send leaves exactly
        // once, never before what it waits for, each queue in order, and a vote never
        // waits for a prepared write.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let mut held = HeldSends::new();
        let mut made: Vec<(u64, bool, u64, u64, bool)> = Vec::new();
        let mut left: Vec<u64> = Vec::new();
        for _ in 0..20_000 {
            match next(10) {
                0 => {
                    let _ = held.request_guard();
                }
                1..=2 => {
                    let _ = held.request_prepared(next(64));
                }
                3 => {
                    let (requested, _) = held.guard();
                    held.guard_landed(requested);
                }
                4 if held.prepared_may_write() => {
                    let (requested, durable) = held.prepared();
                    held.prepared_landed(durable + next(requested - durable + 1));
                }
                4 => {}
                _ => {
                    let id = made.len() as u64;
                    let is_commit = next(2) == 0;
                    let message = if is_commit { commit(id) } else { prepare(id) };
                    let offered = held.offer(0b10, &message);
                    assert_ne!(offered, Offered::Dropped, "the model never fills a queue");
                    let (guard, prepared) = (held.guard(), held.prepared());
                    if offered == Offered::SendNow {
                        assert_eq!(guard.0, guard.1);
                        assert!(!is_commit || prepared.0 == prepared.1);
                        left.push(id);
                    }
                    made.push((id, is_commit, guard.0, prepared.0, false));
                }
            }
            while let Some(send) = held.pop_ready() {
                let (op, is_commit) = match send.message {
                    Message::Commit(vote) => (vote.op, true),
                    Message::Prepare { vote, .. } => (vote.op, false),
                    _ => unreachable!(),
                };
                let entry = &mut made[op as usize];
                assert!(!entry.4, "sent once");
                entry.4 = true;
                assert!(entry.2 <= held.guard().1);
                assert!(!is_commit || entry.3 <= held.prepared().1);
                left.push(op);
            }
            // A vote waits only while a guard write is pending.
            let (guard, durable) = held.guard();
            assert!(guard != durable || held.held().0 == 0);
        }
        // Each kind left in the order it was made.
        for kind in [true, false] {
            let order: Vec<u64> = left
                .iter()
                .copied()
                .filter(|id| made[*id as usize].1 == kind)
                .collect();
            assert!(order.windows(2).all(|pair| pair[0] < pair[1]));
        }
        let (requested, _) = held.guard();
        held.guard_landed(requested);
        let (requested, _) = held.prepared();
        held.prepared_landed(requested);
        while let Some(send) = held.pop_ready() {
            match send.message {
                Message::Commit(vote) | Message::Prepare { vote, .. } => left.push(vote.op),
                _ => unreachable!(),
            }
        }
        assert_eq!(left.len(), made.len(), "every send left");
        assert_eq!(held.held(), (0, 0));
        assert_eq!(held.held_bytes(), 0);
    }
}
