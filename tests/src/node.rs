//! What the multi-process tests share about `percore node` processes: node sizes small
//! enough for a dozen processes on a CI box, reading a replica's data directory back with
//! `percore inspect --replay`, and the random transfer mix they load clusters with.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use percore_engine::record::Transfer;
use percore_shards::loadgen::transfer;

use crate::support::Rng;

/// Node sizes small enough for three or four nodes per test on a 2-core CI box.
pub const SMALL_NODE_ARGS: [&str; 16] = [
    "--segment-mib",
    "4",
    "--accounts-max",
    "1024",
    "--transfers-max",
    "65536",
    "--credit-legs-max",
    "4096",
    "--io-memory-kib",
    "512",
    "--transactions",
    "4096",
    "--batches",
    "64",
    "--connections-max",
    "16",
];

/// The ledger sizes of [`SMALL_NODE_ARGS`] (its flags 2..8), for `percore inspect --replay`.
pub const SMALL_INSPECT_ARGS: &[&str] = SMALL_NODE_ARGS.split_at(2).1.split_at(6).0;

/// What `percore inspect --replay` found in one replica's data directory.
#[derive(Debug, PartialEq, Eq)]
pub struct Inspected {
    /// Per shard, in shard order: the last op in its journal and that entry's checksum
    /// (the hash-chain head); `(0, "")` for an empty journal.
    pub heads: Vec<(u64, String)>,
    /// Every balance line, and the in-flight and conservation sums, as printed.
    pub state: Vec<String>,
    /// Every account's balance.
    pub balances: HashMap<u128, i128>,
}

/// Runs `binary inspect --replay` on `data_dir` with [`SMALL_INSPECT_ARGS`] and parses
/// what it prints. Panics (with its output) if inspect finds a problem.
pub fn inspect_replay(binary: &str, data_dir: &Path) -> Inspected {
    inspect_replay_with(binary, data_dir, &[])
}

/// [`inspect_replay`] with `overrides` (flag, value) replacing [`SMALL_INSPECT_ARGS`]'
/// values (the node ran with them too).
pub fn inspect_replay_with(binary: &str, data_dir: &Path, overrides: &[(&str, &str)]) -> Inspected {
    let args: Vec<&str> = SMALL_INSPECT_ARGS
        .chunks(2)
        .flat_map(|pair| {
            let value = overrides
                .iter()
                .find(|(flag, _)| *flag == pair[0])
                .map_or(pair[1], |(_, value)| *value);
            [pair[0], value]
        })
        .collect();
    let output = Command::new(binary)
        .arg("inspect")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--replay")
        .args(args)
        .output()
        .expect("percore inspect runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "inspect {} found a problem:\n{text}\n{}",
        data_dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_inspect(&text)
}

/// Parses `percore inspect --replay` output (see [`inspect_replay`]).
pub fn parse_inspect(text: &str) -> Inspected {
    let mut inspected = Inspected {
        heads: Vec::new(),
        state: Vec::new(),
        balances: HashMap::new(),
    };
    for line in text.lines() {
        if line.starts_with("shard ") {
            inspected.heads.push((0, String::new()));
        } else if let Some(head) = line.trim_start().strip_prefix("head: op ") {
            // "head: op 12, checksum 0123...": the last entry's, or the checkpoint's of a
            // journal that a state sync started there and that holds no entry after it.
            let (op, checksum) = head.split_once(", checksum ").expect("op and checksum");
            *inspected.heads.last_mut().expect("a shard line first") =
                (op.parse().expect("op"), checksum.to_string());
        } else if let Some(balance) = line.strip_prefix("balance ") {
            let (id, value) = balance.split_once(' ').expect("id and balance");
            let id = u128::from_str_radix(id.trim_start_matches("0x"), 16).expect("hex id");
            inspected
                .balances
                .insert(id, value.parse().expect("balance"));
            inspected.state.push(line.to_string());
        } else if line.starts_with("in_flight ") || line.starts_with("conservation ") {
            inspected.state.push(line.to_string());
        }
    }
    inspected
}

/// Every replica's journal ends, per shard, on the same op and checksum (the hash-chain
/// head), at or past what that shard's group committed, and every replica replays to the
/// same state with money conserved and no credit leg in flight.
pub fn assert_replicas_agree(inspected: &[Inspected], committed: &[u64]) {
    let reference = &inspected[0];
    for (replica, found) in inspected.iter().enumerate() {
        assert_eq!(
            found.heads.len(),
            committed.len(),
            "replica {replica}: shards"
        );
        for (shard, (op_last, checksum)) in found.heads.iter().enumerate() {
            assert!(
                *op_last >= committed[shard],
                "replica {replica} shard {shard}: journal ends at op {op_last}, the group committed {}",
                committed[shard]
            );
            assert_eq!(
                (op_last, checksum),
                (&reference.heads[shard].0, &reference.heads[shard].1),
                "replica {replica} shard {shard}: hash chain head differs from replica 0's"
            );
        }
        assert_eq!(
            found.state, reference.state,
            "replica {replica} replays to a different state than replica 0"
        );
        for sum in ["in_flight 0", "conservation 0"] {
            assert!(
                found.state.iter().any(|line| line == sum),
                "replica {replica}: no `{sum}` in {:?}",
                &found.state[found.state.len().saturating_sub(2)..]
            );
        }
    }
}

/// `count` transfers between non-mint accounts (`accounts[shard][0]` is the shard's mint),
/// a quarter of them to the next shard when there are several, amounts 1..=5, ids from
/// `next_id` upwards.
pub fn random_transfers(
    rng: &mut Rng,
    accounts: &[Vec<u128>],
    next_id: &mut u128,
    count: usize,
) -> Vec<Transfer> {
    let shards = accounts.len();
    (0..count)
        .map(|_| {
            let r = rng.next();
            let debit_shard = (r % shards as u64) as usize;
            let credit_shard = if (r >> 8).is_multiple_of(4) {
                (debit_shard + 1) % shards
            } else {
                debit_shard
            };
            let pick = |shard: usize, shift: u32| {
                let choices = accounts[shard].len() - 1;
                1 + (r >> shift) as usize % choices
            };
            let debit = accounts[debit_shard][pick(debit_shard, 16)];
            let mut credit = accounts[credit_shard][pick(credit_shard, 24)];
            if credit == debit {
                let choices = accounts[credit_shard].len() - 1;
                credit = accounts[credit_shard][1 + pick(credit_shard, 24) % choices];
            }
            *next_id += 1;
            transfer(*next_id, debit, credit, 1 + u128::from((r >> 32) % 5))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_gets_the_ledger_sizes_of_the_node() {
        assert_eq!(
            SMALL_INSPECT_ARGS,
            [
                "--accounts-max",
                "1024",
                "--transfers-max",
                "65536",
                "--credit-legs-max",
                "4096"
            ]
        );
    }

    #[test]
    fn inspect_output_parses_into_heads_and_state() {
        // Shard 1's journal was started at checkpoint 40 by a state sync and holds no
        // entry after it: its head is the checkpoint's.
        let text = "shard 0\n  segment 0: 3 entries, ops 1..=3, 4096 bytes used, last checksum ab12\n\
                    \x20 head: op 3, checksum ab12\n\
                    shard 1\n  segment 2: 0 entries, ops 41..=0, 0 bytes used, last checksum 00\n\
                    \x20 head: op 40, checksum cd34\n\
                    balance 0x10 -5\nbalance 0x11 5\nin_flight 0\nconservation 0\n";
        let inspected = parse_inspect(text);
        assert_eq!(
            inspected.heads,
            vec![(3, "ab12".to_string()), (40, "cd34".to_string())]
        );
        assert_eq!(inspected.balances[&0x10], -5);
        assert_eq!(inspected.balances[&0x11], 5);
        assert_eq!(inspected.state.len(), 4);
    }

    #[test]
    fn random_transfers_stay_between_distinct_non_mint_accounts() {
        let accounts = vec![vec![1, 2, 3], vec![10, 11, 12]];
        let mut next_id = 100;
        let transfers = random_transfers(&mut Rng(7), &accounts, &mut next_id, 500);
        assert_eq!(next_id, 600);
        for t in &transfers {
            assert_ne!(t.debit_account_id, t.credit_account_id);
            for id in [t.debit_account_id, t.credit_account_id] {
                assert!(![1, 10].contains(&id), "a mint in {t:?}");
            }
        }
        assert!(
            transfers
                .iter()
                .any(|t| (t.debit_account_id < 10) != (t.credit_account_id < 10)),
            "some cross the shards"
        );
    }
}
