//! Linearizability of the client history, checked against a sequential model: the reference
//! ledger of each group (`check.rs`), which applies the group's committed log in op order.
//!
//! The *witness order* of a group is its committed log: op, then record position within the
//! op's batch ([`Position`]). A request is linearized where its reply says it was answered:
//! the op whose application answered it and its records' range in that op's batch (a
//! request's records are sealed together, in one batch). For every request:
//! - (a) the records at that range are the request's own;
//! - (b) real time: every copy of its records in the committed log (retries included,
//!   answered or not) comes after every reply its group had given when it was invoked;
//! - (c) each result code the client got is the one the sequential reference gave that
//!   record at that position.
//!
//! A reply from an entry that is not the committed one is `durability`'s (checked for every
//! acknowledged request at the end), and so is an acknowledged request missing from the log.
//!
//! Per group: a client's request goes to one group (the debit accounts' group) and its
//! results depend only on that group's log; the credit legs a group applies are records of
//! its log like any other (they change the state later records see), but no client waits
//! for them, and their exactly-once application and conservation are checked elsewhere. No
//! real-time order is imposed across groups.
//!
//! This module only reads what the driver records: it must never change a run (no
//! randomness, no effect on any node).

use std::collections::{BTreeMap, BTreeSet};

use percore_engine::journal::JournalChecksum;
use percore_engine::ledger::LedgerOperation;
use percore_engine::record::{RecordResult, RecordSlot};

use super::check::Verdict;
use super::world::Request;

/// A place in a group's witness order: `(op, index of the record in the op's batch)`,
/// compared as a pair.
pub type Position = (u64, usize);

/// The checker's name in failures.
pub const CHECKER: &str = "linearizability";

/// One op of a group's committed log as the reference applied it.
#[derive(Debug)]
struct WitnessOp {
    /// The committed entry's checksum.
    checksum: JournalChecksum,
    /// Per record: its id and the reference's result code.
    records: Vec<(u128, u32)>,
}

/// What the checker remembers of the history and of the committed logs.
#[derive(Debug)]
pub struct Linearizability {
    /// Per group: every op the reference applied, `witness[g][op - 1]`.
    witness: Vec<Vec<WitnessOp>>,
    /// Per group: the latest position any client was answered at so far, and its request.
    answered_max: Vec<Option<(Position, usize)>>,
    /// `(group, record id)` of every client record sent, and its request.
    client_records: BTreeMap<(u32, u128), usize>,
    /// `(group, op, request)` of replies whose op the reference has not applied yet.
    answers_unchecked: BTreeSet<(u32, u64, usize)>,
    /// Replies compared with the reference.
    pub answers_checked: u64,
    /// Client records of the committed logs whose real-time order was checked.
    pub records_ordered: u64,
}

impl Linearizability {
    /// An empty history for `groups` groups.
    pub fn new(groups: u32) -> Linearizability {
        let groups = groups as usize;
        Linearizability {
            witness: (0..groups).map(|_| Vec::new()).collect(),
            answered_max: vec![None; groups],
            client_records: BTreeMap::new(),
            answers_unchecked: BTreeSet::new(),
            answers_checked: 0,
            records_ordered: 0,
        }
    }

    /// A client invokes `request`: it must be linearized after every reply given so far in
    /// its group (recorded in `state.invoked_after`).
    pub fn invoked(&mut self, request: usize, state: &mut Request) {
        state.invoked_after = self.answered_max[state.group as usize];
        for record in &state.records {
            let id = record_id(state.operation, record);
            let previous = self.client_records.insert((state.group, id), request);
            assert!(previous.is_none(), "record {id:#x} sent by two requests");
        }
    }

    /// A client got its first reply (`state.acked_op`, `acked_record`, `results` set): it
    /// bounds every request invoked from now on, and is compared with the reference now if
    /// the reference applied its op, else when it does.
    pub fn answered(&mut self, request: usize, state: &Request) -> Verdict {
        let g = state.group as usize;
        let (op, _) = state.acked_op.expect("answered");
        let last = (op, state.acked_record + state.records.len().max(1) - 1);
        if self.answered_max[g].is_none_or(|(position, _)| position < last) {
            self.answered_max[g] = Some((last, request));
        }
        if self.witness[g].len() as u64 >= op {
            self.answer_check(request, state)
        } else {
            self.answers_unchecked.insert((state.group, op, request));
            Ok(())
        }
    }

    /// The reference applied committed op `op` (entry `checksum`) of `group`, with
    /// `results`: keeps its witness, checks (b) for the client records in it and (a), (c)
    /// for the replies that came from it.
    pub fn applied(
        &mut self,
        history: &[Request],
        group: u32,
        (op, checksum): (u64, JournalChecksum),
        operation: LedgerOperation,
        records: &[RecordSlot],
        results: &[RecordResult],
    ) -> Verdict {
        let g = group as usize;
        assert_eq!(self.witness[g].len() as u64, op - 1, "ops apply in order");
        assert_eq!(records.len(), results.len());
        let witness = records
            .iter()
            .zip(results)
            .map(|(record, result)| (record_id(operation, record), result.code))
            .collect();
        self.witness[g].push(WitnessOp {
            checksum,
            records: witness,
        });
        if client_operation(operation) {
            for (index, record) in records.iter().enumerate() {
                self.record_ordered(history, group, (op, index), operation, record)?;
            }
        }
        let answers: Vec<usize> = self
            .answers_unchecked
            .range((group, op, 0)..=(group, op, usize::MAX))
            .map(|(_, _, request)| *request)
            .collect();
        for request in answers {
            self.answers_unchecked.remove(&(group, op, request));
            self.answer_check(request, &history[request])?;
        }
        Ok(())
    }

    /// At the end, once the reference applied every committed op and `durability` found
    /// every acknowledged request's op in the committed log: every reply was compared.
    pub fn check_end(&self, history: &[Request]) -> Verdict {
        if let Some((group, op, request)) = self.answers_unchecked.first() {
            return Err((
                CHECKER,
                format!(
                    "request {request}'s reply from group {group} op {op} was never compared with the reference (at op {})",
                    self.witness[*group as usize].len()
                ),
            ));
        }
        let answered = history
            .iter()
            .filter(|request| request.acked_op.is_some())
            .count() as u64;
        if self.answers_checked != answered {
            return Err((
                CHECKER,
                format!(
                    "{} of {answered} replies were compared with the reference",
                    self.answers_checked
                ),
            ));
        }
        Ok(())
    }

    /// (a) and (c) for one reply whose op the reference applied: the records it answers for
    /// are the request's, and each result code is the reference's.
    fn answer_check(&mut self, request: usize, state: &Request) -> Verdict {
        let (op, checksum) = state.acked_op.expect("answered");
        let witness = &self.witness[state.group as usize][op as usize - 1];
        if witness.checksum != checksum {
            // Answered from an entry that did not commit: `durability` reports it.
            return Ok(());
        }
        self.answers_checked += 1;
        let first = state.acked_record;
        let name = format!(
            "request {request} (group {}, invoked at {} us, answered at {:?} us from op {op} records {first}..)",
            state.group, state.invoke_us, state.ack_us
        );
        for (index, record) in state.records.iter().enumerate() {
            let id = record_id(state.operation, record);
            let Some(&(logged, _)) = witness.records.get(first + index) else {
                return Err((
                    CHECKER,
                    format!(
                        "{name}: its record {index} would be at position {} but op {op} holds {} records",
                        first + index,
                        witness.records.len()
                    ),
                ));
            };
            if logged != id {
                return Err((
                    CHECKER,
                    format!(
                        "{name}: its record {index} ({id:#x}) is not at position {} of op {op}, which holds {logged:#x}",
                        first + index
                    ),
                ));
            }
        }
        if state.results.len() != state.records.len() {
            return Err((
                CHECKER,
                format!(
                    "{name}: {} result codes {:?} for {} records",
                    state.results.len(),
                    state.results,
                    state.records.len()
                ),
            ));
        }
        for (index, code) in state.results.iter().enumerate() {
            let (id, reference) = witness.records[first + index];
            if *code != reference {
                return Err((
                    CHECKER,
                    format!(
                        "{name}: record {index} ({id:#x}) answered {code}, the sequential reference gives {reference} at op {op} position {}",
                        first + index
                    ),
                ));
            }
        }
        Ok(())
    }

    /// (b) for a client record at `position` of `group`'s committed log: after every reply
    /// its request's group had given when the request was invoked.
    fn record_ordered(
        &mut self,
        history: &[Request],
        group: u32,
        position: Position,
        operation: LedgerOperation,
        record: &RecordSlot,
    ) -> Verdict {
        let id = record_id(operation, record);
        let request = self.client_records.get(&(group, id)).copied();
        let Some(request) = request.filter(|request| history[*request].operation == operation)
        else {
            return Err((
                CHECKER,
                format!(
                    "group {group} op {} position {}: {operation:?} record {id:#x} was sent by no client of the group",
                    position.0, position.1
                ),
            ));
        };
        self.records_ordered += 1;
        let state = &history[request];
        match state.invoked_after {
            Some((after, answered)) if position <= after => Err((
                CHECKER,
                format!(
                    "group {group}: request {request}, invoked at {} us, has record {id:#x} at op {} position {}, but request {answered} was answered from op {} position {} (at {:?} us) before it was invoked",
                    state.invoke_us,
                    position.0,
                    position.1,
                    after.0,
                    after.1,
                    history[answered].ack_us
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// The id of a record (an account's or a transfer's), by the operation carrying it.
fn record_id(operation: LedgerOperation, record: &RecordSlot) -> u128 {
    match operation {
        LedgerOperation::CreateAccounts => record.as_account().id,
        _ => record.as_transfer().id,
    }
}

/// Whether clients send `operation` (the others carry the ledgers' internal records).
fn client_operation(operation: LedgerOperation) -> bool {
    matches!(
        operation,
        LedgerOperation::CreateAccounts | LedgerOperation::CreateTransfers
    )
}

#[cfg(test)]
mod tests {
    use percore_engine::record::Transfer;

    use super::*;

    const OK: u32 = 0;
    const EXISTS: u32 = 1;

    /// One group's history and committed log, built by hand.
    struct Harness {
        history: Vec<Request>,
        check: Linearizability,
        /// Ops the reference applied.
        op: u64,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                history: Vec::new(),
                check: Linearizability::new(1),
                op: 0,
            }
        }

        /// A client invokes a request of transfers `ids` at `now_us`.
        fn invoke(&mut self, ids: &[u128], now_us: u64) -> usize {
            let records = ids
                .iter()
                .map(|id| {
                    RecordSlot::from_transfer(&Transfer {
                        id: *id,
                        ..bytemuck::Zeroable::zeroed()
                    })
                })
                .collect();
            let mut request = Request {
                group: 0,
                client: 0,
                operation: LedgerOperation::CreateTransfers,
                records,
                invoke_us: now_us,
                ack_us: None,
                results: Vec::new(),
                attempts: 1,
                replies: 0,
                target: 0,
                acked_op: None,
                acked_record: 0,
                client_id: 1,
                request_number: self.history.len() as u64 + 1,
                invoked_after: None,
            };
            let index = self.history.len();
            self.check.invoked(index, &mut request);
            self.history.push(request);
            index
        }

        /// The reply to `request` from op `op`, its records from `first` on.
        fn answer(&mut self, request: usize, op: u64, first: usize, codes: &[u32]) -> Verdict {
            let state = &mut self.history[request];
            state.ack_us = Some(state.invoke_us + 1_000);
            state.acked_op = Some((op, checksum(op)));
            state.acked_record = first;
            state.results = codes.to_vec();
            self.check.answered(request, &self.history[request])
        }

        /// The reference applies the next op: transfers `ids` with result codes `codes`.
        fn apply(&mut self, ids: &[u128], codes: &[u32]) -> Verdict {
            self.op += 1;
            let records: Vec<RecordSlot> = ids
                .iter()
                .map(|id| {
                    RecordSlot::from_transfer(&Transfer {
                        id: *id,
                        ..bytemuck::Zeroable::zeroed()
                    })
                })
                .collect();
            let results: Vec<RecordResult> = codes
                .iter()
                .enumerate()
                .map(|(index, code)| RecordResult {
                    index: index as u32,
                    code: *code,
                })
                .collect();
            self.check.applied(
                &self.history,
                0,
                (self.op, checksum(self.op)),
                LedgerOperation::CreateTransfers,
                &records,
                &results,
            )
        }
    }

    /// A stand-in entry checksum for `op`.
    fn checksum(op: u64) -> JournalChecksum {
        JournalChecksum::from(op) << 64 | 0x5EED
    }

    fn assert_fails(verdict: Verdict, what: &str) {
        match verdict {
            Err((checker, message)) => {
                assert_eq!(checker, CHECKER, "{message}");
                assert!(message.contains(what), "{message:?} does not say {what:?}");
            }
            Ok(()) => panic!("not caught: {what}"),
        }
    }

    #[test]
    fn a_sequential_history_with_a_retry_passes() {
        let mut h = Harness::new();
        let a = h.invoke(&[10, 11], 0);
        let b = h.invoke(&[20], 5);
        h.apply(&[20, 10, 11], &[OK, OK, OK]).unwrap();
        h.answer(b, 1, 0, &[OK]).unwrap();
        // A's first copy applied, its reply lost; its retry is answered `Exists`, later.
        h.answer(a, 2, 0, &[EXISTS, EXISTS]).unwrap();
        let c = h.invoke(&[30], 2_000);
        h.apply(&[10, 11, 30], &[EXISTS, EXISTS, OK]).unwrap();
        h.answer(c, 2, 2, &[OK]).unwrap();
        h.check.check_end(&h.history).unwrap();
        assert_eq!(h.check.answers_checked, 3);
        assert_eq!(h.check.records_ordered, 6);
    }

    #[test]
    fn a_result_the_reference_does_not_give_fails() {
        let mut h = Harness::new();
        let a = h.invoke(&[10], 0);
        h.apply(&[10], &[OK]).unwrap();
        h.apply(&[10], &[EXISTS]).unwrap();
        // Answered from the retry's copy with the first copy's result.
        assert_fails(h.answer(a, 2, 0, &[OK]), "the sequential reference gives 1");
    }

    #[test]
    fn a_reply_is_checked_when_its_op_applies_later() {
        let mut h = Harness::new();
        let a = h.invoke(&[10], 0);
        h.answer(a, 1, 0, &[EXISTS]).unwrap();
        assert_fails(
            h.apply(&[10], &[OK]),
            "answered 1, the sequential reference gives 0",
        );
    }

    #[test]
    fn a_reply_for_records_that_are_not_there_fails() {
        let mut h = Harness::new();
        let a = h.invoke(&[10], 0);
        let _b = h.invoke(&[20, 21], 0);
        h.apply(&[20, 21], &[OK, OK]).unwrap();
        // A is answered with B's first result, from the range where B's records are.
        assert_fails(h.answer(a, 1, 0, &[OK]), "is not at position 0 of op 1");
    }

    #[test]
    fn a_reply_past_the_end_of_its_op_fails() {
        let mut h = Harness::new();
        let _a = h.invoke(&[10], 0);
        let b = h.invoke(&[20, 21], 0);
        h.apply(&[10, 20], &[OK, OK]).unwrap();
        assert_fails(h.answer(b, 1, 1, &[OK, OK]), "op 1 holds 2 records");
    }

    #[test]
    fn a_reply_with_too_few_results_fails() {
        let mut h = Harness::new();
        let a = h.invoke(&[10, 11], 0);
        h.apply(&[10, 11], &[OK, OK]).unwrap();
        assert_fails(h.answer(a, 1, 0, &[OK]), "1 result codes [0] for 2 records");
    }

    #[test]
    fn a_record_before_an_earlier_reply_fails() {
        let mut h = Harness::new();
        let a = h.invoke(&[10], 0);
        // A is answered from op 2 before the reference applied anything; then C is invoked,
        // and C's record is committed at op 1, before A's: real time is violated.
        h.answer(a, 2, 0, &[OK]).unwrap();
        let c = h.invoke(&[30], 2_000);
        assert_eq!(h.history[c].invoked_after, Some(((2, 0), a)));
        assert_fails(h.apply(&[30], &[OK]), "before it was invoked");
    }

    #[test]
    fn a_record_in_the_same_op_before_the_reply_fails() {
        let mut h = Harness::new();
        let a = h.invoke(&[10, 11], 0);
        h.answer(a, 1, 1, &[OK, OK]).unwrap();
        let c = h.invoke(&[30], 2_000);
        assert_eq!(h.history[c].invoked_after, Some(((1, 2), a)));
        // C's record sits at position 0 of op 1, before A's records at 1 and 2.
        assert_fails(
            h.apply(&[30, 10, 11], &[OK, OK, OK]),
            "has record 0x1e at op 1 position 0",
        );
    }

    #[test]
    fn a_record_no_client_sent_fails() {
        let mut h = Harness::new();
        let _ = h.invoke(&[10], 0);
        assert_fails(h.apply(&[10, 99], &[OK, OK]), "was sent by no client");
    }

    #[test]
    fn a_reply_never_compared_fails_at_the_end() {
        let mut h = Harness::new();
        let a = h.invoke(&[10], 0);
        h.answer(a, 1, 0, &[OK]).unwrap();
        assert_fails(h.check.check_end(&h.history), "never compared");
        h.apply(&[10], &[OK]).unwrap();
        h.check.check_end(&h.history).unwrap();
    }
}
