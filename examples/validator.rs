//! A small validator that embeds percore shards with its own state machine.
//!
//! The machine tallies stake-weighted votes on proposals: each vote is a fixed 128-byte
//! record routed to the shard that owns its proposal; a voter may vote once per proposal
//! (a second vote is refused with `ALREADY_VOTED`). Everything percore provides — pinned
//! per-core executors, io_uring sockets, pooled ingest, adaptive batching, per-shard
//! metrics — comes from `percore_shards::runtime::Node`; the validator writes only the
//! `StateMachine` below. Votes arrive two ways: over the network from a `Client` (a batch
//! split by shard), and in process from the validator's own threads through
//! `Node::submitter` (`submit_batch_wait`, a ticket per vote).
//!
//! Run: `cargo run --release -p percore-shards --example validator`

use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use percore_engine::checksum::{Digest256, Digest256Hasher};
use percore_engine::record::shard_of;
use percore_engine::state_machine::{Outbound, RestoreError, StateMachine};
use percore_net::client::{Client, ClientConfig};
use percore_shards::runtime::{Node, NodeConfig};

/// One vote: 128 bytes, plain old data.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct Vote {
    proposal: u128,
    voter: u128,
    stake: u64,
    reserved: [u8; 88],
}

const _: () = assert!(size_of::<Vote>() == 128);

/// Per-vote result: the vote's index and a code.
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
#[repr(C)]
struct VoteResult {
    index: u32,
    code: u32,
}

const OK: u32 = 0;
const ALREADY_VOTED: u32 = 1;
const TABLE_FULL: u32 = 2;
const ZERO_STAKE: u32 = 3;

/// The validator's own operation code on the wire (codes below 2 are reserved by the
/// protocol: 1 is ping).
const CAST_VOTES: u16 = 100;

/// The validator's one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CastVotes;

impl From<CastVotes> for u16 {
    fn from(_: CastVotes) -> u16 {
        CAST_VOTES
    }
}

impl TryFrom<u16> for CastVotes {
    type Error = u16;
    fn try_from(code: u16) -> Result<Self, u16> {
        if code == CAST_VOTES {
            Ok(CastVotes)
        } else {
            Err(code)
        }
    }
}

/// Tallies per proposal and the set of (proposal, voter) pairs seen, in fixed tables.
struct Tally {
    seen: Vec<(u128, u128)>,
    seen_mask: usize,
    seen_len: usize,
    totals: Vec<(u128, u64)>,
}

impl Tally {
    fn new(votes_max: usize, proposals_max: usize) -> Self {
        let seen_capacity = (votes_max * 2).next_power_of_two();
        let totals_capacity = (proposals_max * 2).next_power_of_two();
        Self {
            seen: vec![(0, 0); seen_capacity],
            seen_mask: seen_capacity - 1,
            seen_len: 0,
            totals: vec![(0, 0); totals_capacity],
        }
    }

    fn slot(id: u128, mask: usize) -> usize {
        (percore_engine::record::hash_id(id, 0x5EED) as usize) & mask
    }

    fn vote(&mut self, vote: &Vote) -> u32 {
        if vote.stake == 0 {
            return ZERO_STAKE;
        }
        let mut index = Self::slot(vote.proposal ^ vote.voter.rotate_left(64), self.seen_mask);
        loop {
            match self.seen[index] {
                (0, 0) => break,
                pair if pair == (vote.proposal, vote.voter) => return ALREADY_VOTED,
                _ => index = (index + 1) & self.seen_mask,
            }
        }
        if self.seen_len * 2 >= self.seen.len() {
            return TABLE_FULL;
        }
        let mask = self.totals.len() - 1;
        let mut slot = Self::slot(vote.proposal, mask);
        while self.totals[slot].0 != 0 && self.totals[slot].0 != vote.proposal {
            slot = (slot + 1) & mask;
        }
        self.seen[index] = (vote.proposal, vote.voter);
        self.seen_len += 1;
        self.totals[slot] = (vote.proposal, self.totals[slot].1 + vote.stake);
        OK
    }

    fn total(&self, proposal: u128) -> u64 {
        self.totals
            .iter()
            .find(|(id, _)| *id == proposal)
            .map_or(0, |(_, stake)| *stake)
    }
}

impl StateMachine for Tally {
    type Operation = CastVotes;
    type Record = Vote;
    type Result = VoteResult;

    fn client_operation(code: u16) -> Option<CastVotes> {
        CastVotes::try_from(code).ok()
    }

    fn route(_: CastVotes, vote: &Vote, shard_count: u32) -> u32 {
        shard_of(vote.proposal, shard_count)
    }

    fn prepare(&mut self, _: CastVotes, _now_ns: u64, _votes: &mut [Vote]) {}

    fn apply(&mut self, _op: u64, _: CastVotes, votes: &[Vote], results: &mut [VoteResult]) {
        for (index, (vote, result)) in votes.iter().zip(results.iter_mut()).enumerate() {
            *result = VoteResult {
                index: index as u32,
                code: self.vote(vote),
            };
        }
    }

    fn poll_outbound(&mut self) -> Option<Outbound<CastVotes, Vote>> {
        None
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        for (proposal, stake) in self.totals.iter().filter(|(id, _)| *id != 0) {
            out.extend_from_slice(&proposal.to_le_bytes());
            out.extend_from_slice(&stake.to_le_bytes());
        }
    }

    fn restore(&mut self, _bytes: &[u8]) -> Result<(), RestoreError> {
        Err(RestoreError::ConfigMismatch)
    }

    fn digest(&self) -> Digest256 {
        let mut totals: Vec<_> = self.totals.iter().filter(|(id, _)| *id != 0).collect();
        totals.sort();
        let mut hasher = Digest256Hasher::new();
        for (proposal, stake) in totals {
            hasher.update(&proposal.to_le_bytes());
            hasher.update(&stake.to_le_bytes());
        }
        hasher.finalize()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = NodeConfig {
        cores: (0..2).map(|i| i % online).collect(),
        client_port_base: 0,
        allow_shared_cores: true,
        ..NodeConfig::default()
    };
    let node = Node::start(config, |_shard, _shards| Tally::new(100_000, 1_000))?;
    println!(
        "validator shards listening on {:?}",
        node.client_addresses()
    );

    let shards = node.client_addresses().len() as u32;
    let mut client = Client::new(ClientConfig::new(node.client_addresses().to_vec(), 7));
    client.ping_all(Instant::now() + Duration::from_secs(10))?;
    let proposals = [11u128, 22, 33];
    let mut votes = Vec::new();
    for voter in 1..=300u128 {
        let proposal = proposals[(voter % 3) as usize];
        votes.push(Vote {
            proposal,
            voter,
            stake: voter as u64,
            reserved: [0; 88],
        });
    }
    // Voter 3 tries to vote twice.
    votes.push(Vote {
        proposal: proposals[0],
        voter: 3,
        stake: 1_000,
        reserved: [0; 88],
    });
    let results: Vec<VoteResult> = client.submit(CAST_VOTES, &votes, |v: &Vote| {
        shard_of(v.proposal, shards) as usize
    })?;
    let refused = results.iter().filter(|r| r.code == ALREADY_VOTED).count();
    println!(
        "{} votes cast, {} refused as double votes",
        votes.len(),
        refused
    );
    assert_eq!(refused, 1);

    // In-process: the validator's own RPC workers (plain threads, not pinned) submit
    // without a socket, each a batch of votes on proposal 44 that its shard tallies.
    let submitter = node.submitter();
    let workers = 4u128;
    let votes_per_worker = 250u128;
    let in_process_refused: usize = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..workers)
            .map(|worker| {
                let submitter = submitter.clone();
                scope.spawn(move || {
                    let votes: Vec<Vote> = (0..votes_per_worker)
                        .map(|seq| Vote {
                            proposal: 44,
                            voter: 1_000 + worker * votes_per_worker + seq,
                            stake: 1,
                            reserved: [0; 88],
                        })
                        .collect();
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut tickets = Vec::with_capacity(votes.len());
                    submitter
                        .submit_batch_wait(CastVotes, &votes, deadline, |ticket| {
                            tickets.push(ticket);
                        })
                        .expect("room for the votes before the deadline");
                    tickets
                        .into_iter()
                        .map(|ticket| ticket.wait(deadline).expect("a result"))
                        .filter(|result| result.code != OK)
                        .count()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a worker finished"))
            .sum()
    });
    println!(
        "{} votes submitted in process by {workers} threads, {in_process_refused} refused",
        workers * votes_per_worker
    );
    assert_eq!(in_process_refused, 0);

    let reports = node.shutdown()?;
    for proposal in proposals {
        let shard = shard_of(proposal, shards) as usize;
        let total = reports[shard].state_machine.total(proposal);
        let expected: u64 = (1..=300u64)
            .filter(|v| proposals[(v % 3) as usize] == proposal)
            .sum();
        println!("proposal {proposal}: stake {total} (shard {shard})");
        assert_eq!(total, expected);
    }
    let shard = shard_of(44, shards) as usize;
    let total = reports[shard].state_machine.total(44);
    println!("proposal 44: stake {total} (shard {shard}, in process)");
    assert_eq!(u128::from(total), workers * votes_per_worker);
    Ok(())
}
