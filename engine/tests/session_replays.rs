//! Property test of a session table that refuses replays (BFT mode, `docs/bft.md` §13),
//! against a leader that orders, duplicates and replays requests as it likes.
//!
//! Correct clients of two kinds submit to one shard: one request in flight with numbers
//! that skip (the Rust `BftClient`, which numbers its requests across every shard), and a
//! pipelining client with consecutive numbers, whose requests in flight stay within a
//! window of [`SESSION_REPLIES_PER_CLIENT`] numbers (it sends number `n + 4` only once `n`
//! is answered). Each entry the leader commits holds some of the requests in flight, in any
//! order, some of them twice, and old requests committed long before. Checked after every
//! entry: no record is applied twice; a request in flight is never refused (nor called
//! stale at the door), and is applied once (later copies are answered with its first results); a committed request leaves
//! the flight at once. At the end every request was applied exactly once.
//!
//! Now and then the machine is replaced by a new one restored from its snapshot (a replica
//! restarting from a checkpoint, or a state sync), which must go on the same way.
//!
//! `SESSION_SEED=N` runs that one seed; `SESSION_TRACE=1` prints each entry's requests,
//! dispositions and results.

use std::collections::{BTreeMap, HashMap};

use percore_engine::checksum::{Digest256, digest256};
use percore_engine::session::{
    Disposition, RequestDescriptor, SESSION_REPLIES_PER_CLIENT, Sessioned,
};
use percore_engine::state_machine::{Outbound, RestoreError, StateMachine};
use proptest::prelude::*;

/// Records are request tags, `client << 32 | request number`: each request has one record,
/// so a record applied twice is a request applied twice.
#[derive(Default)]
struct Tally {
    applied: HashMap<u64, u64>,
    op_last: u64,
}

/// The result of a refused record.
const REFUSED: u64 = u64::MAX;

impl StateMachine for Tally {
    type Operation = u16;
    type Record = u64;
    type Result = u64;

    fn client_operation(code: u16) -> Option<u16> {
        Some(code)
    }

    fn route(_: u16, _: &u64, _: u32) -> u32 {
        0
    }

    fn prepare(&mut self, _: u16, _: u64, _: &mut [u64]) {}

    fn apply(&mut self, op: u64, _: u16, records: &[u64], results: &mut [u64]) {
        assert!(op > self.op_last);
        self.op_last = op;
        for (record, result) in records.iter().zip(results.iter_mut()) {
            let count = self.applied.entry(*record).or_default();
            *count += 1;
            // The op that applied it: a replayed reply shows the first application's op.
            *result = op;
        }
    }

    fn poll_outbound(&mut self) -> Option<Outbound<u16, u64>> {
        None
    }

    /// `op_last`, then each `(record, count)` in record order.
    fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.op_last.to_le_bytes());
        let mut applied: Vec<(&u64, &u64)> = self.applied.iter().collect();
        applied.sort_unstable();
        for (record, count) in applied {
            out.extend_from_slice(&record.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), RestoreError> {
        let mut words = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")));
        self.op_last = words.next().ok_or(RestoreError::Corrupt)?;
        self.applied.clear();
        while let (Some(record), Some(count)) = (words.next(), words.next()) {
            self.applied.insert(record, count);
        }
        Ok(())
    }

    fn digest(&self) -> Digest256 {
        let mut bytes = Vec::new();
        self.snapshot(&mut bytes);
        digest256(&bytes)
    }

    fn refused_result(_: u32) -> u64 {
        REFUSED
    }
}

/// One client as the test drives it.
struct Client {
    id: u128,
    /// Requests in flight, at most `in_flight_max`, by number.
    in_flight: Vec<u64>,
    in_flight_max: usize,
    /// Numbers skip by up to this much (1: consecutive).
    skip_max: u64,
    number_next: u64,
    /// Requests answered: number → the op that applied it.
    answered: BTreeMap<u64, u64>,
}

/// A splitmix64 stream: the test's only randomness, from proptest's seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn tag(client: u128, number: u64) -> u64 {
    ((client as u64) << 32) | number
}

fn run(seed: u64, entries: usize) {
    let mut rng = Rng(seed);
    let mut clients: Vec<Client> = (1..=4u128)
        .map(|id| {
            let pipelining = id % 2 == 0;
            Client {
                id,
                in_flight: Vec::new(),
                in_flight_max: if pipelining {
                    SESSION_REPLIES_PER_CLIENT
                } else {
                    1
                },
                skip_max: if pipelining { 1 } else { 5 },
                number_next: 1 + rng.below(1_000),
                answered: BTreeMap::new(),
            }
        })
        .collect();
    let fresh = || {
        let mut machine = Sessioned::new(Tally::default(), 4, 16);
        assert!(machine.refuse_session_replays());
        machine
    };
    let mut machine = fresh();
    for op in 1..=entries as u64 {
        // Now and then the replica restarts from a snapshot (a checkpoint, a state sync):
        // a new machine, refusing replays from its first op, restored to the same state.
        if rng.below(25) == 0 {
            let mut snapshot = Vec::new();
            let digest = machine.snapshot_and_digest(&mut snapshot);
            let mut restored = fresh();
            restored.restore(&snapshot).expect("restores");
            assert_eq!(restored.digest(), digest, "seed {seed} op {op}");
            machine = restored;
        }
        // Clients fill their flight, within a window of numbers.
        for client in &mut clients {
            while client.in_flight.len() < client.in_flight_max
                && client.in_flight.iter().min().is_none_or(|&oldest| {
                    client.number_next < oldest + SESSION_REPLIES_PER_CLIENT as u64
                })
                && rng.below(3) > 0
            {
                client.in_flight.push(client.number_next);
                client.number_next += 1 + rng.below(client.skip_max);
            }
        }
        // The door agrees: no request in flight is stale.
        for client in &clients {
            for &number in &client.in_flight {
                assert!(
                    !machine.session_stale(client.id, number, 1),
                    "seed {seed} op {op}: client {} request {number} in flight called stale",
                    client.id
                );
            }
        }
        // The leader's entry: requests in flight in any order, some twice, and old ones.
        let mut picks: Vec<(u128, u64)> = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let client = &clients[rng.below(clients.len() as u64) as usize];
            let old = !client.answered.is_empty() && rng.below(3) == 0;
            if old {
                let at = rng.below(client.answered.len() as u64) as usize;
                let number = *client.answered.keys().nth(at).expect("answered");
                picks.push((client.id, number));
            } else if !client.in_flight.is_empty() {
                let at = rng.below(client.in_flight.len() as u64) as usize;
                picks.push((client.id, client.in_flight[at]));
            }
        }
        if picks.is_empty() {
            continue;
        }
        let records: Vec<u64> = picks.iter().map(|&(id, n)| tag(id, n)).collect();
        let requests: Vec<RequestDescriptor> = picks
            .iter()
            .enumerate()
            .map(|(at, &(client_id, request_number))| RequestDescriptor {
                client_id,
                request_number,
                record_start: at as u32,
                record_count: 1,
            })
            .collect();
        let mut results = vec![0; records.len()];
        machine.apply_requests(op, 0, &records, &requests, &mut results);
        let dispositions = machine.last_dispositions().to_vec();
        if std::env::var_os("SESSION_TRACE").is_some() {
            eprintln!("op {op}: {picks:?} -> {dispositions:?} {results:?}");
        }
        for (at, &(client_id, number)) in picks.iter().enumerate() {
            let applied = machine.inner().applied.get(&tag(client_id, number));
            assert!(
                applied.is_none_or(|&count| count == 1),
                "seed {seed} op {op}: client {client_id} request {number} applied {applied:?} times"
            );
            let client = clients
                .iter_mut()
                .find(|c| c.id == client_id)
                .expect("client");
            match client.in_flight.iter().position(|&n| n == number) {
                Some(at_flight) => {
                    assert_eq!(
                        dispositions[at],
                        Disposition::Apply,
                        "seed {seed} op {op}: client {client_id}'s request {number} in flight \
                         ({:?}), answered {:?}",
                        client.in_flight,
                        client.answered.keys().rev().take(6).collect::<Vec<_>>()
                    );
                    assert_eq!(results[at], op);
                    client.in_flight.swap_remove(at_flight);
                    client.answered.insert(number, results[at]);
                }
                None => {
                    // A copy of a request committed earlier (or earlier in this entry):
                    // answered with the first results, or refused; never applied again.
                    let first = client.answered[&number];
                    assert!(
                        results[at] == first || results[at] == REFUSED,
                        "seed {seed} op {op}: request {number} answered {} after {first}",
                        results[at]
                    );
                }
            }
        }
    }
    // Every request answered was applied exactly once, by the op its answer names.
    for client in &clients {
        for (&number, &op) in &client.answered {
            assert_eq!(
                machine.inner().applied.get(&tag(client.id, number)),
                Some(&1),
                "seed {seed}"
            );
            assert_ne!(op, REFUSED, "seed {seed}");
        }
    }
    assert_eq!(machine.sessions().stats().evicted, 0);
    assert_eq!(machine.sessions().stats().fallbacks, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replays_never_apply_twice_and_correct_clients_are_never_refused(seed in any::<u64>()) {
        if let Some(only) = std::env::var("SESSION_SEED").ok().and_then(|s| s.parse().ok()) {
            run(only, 200);
            return Ok(());
        }
        run(seed, 200);
    }
}
