//! Ad-hoc apply throughput check, not a benchmark (the `bench` crate owns those) and not an
//! assertion (timings vary by machine). Run in release:
//! `cargo test --release -p percore-engine --test ledger_throughput -- --ignored --nocapture`
//!
//! "window not full" runs keep every transfer (`transfers_max` above the count); "window
//! full" runs fill the window first, so every measured transfer evicts the oldest one (the
//! steady state of a long run).

use std::time::Instant;

use bytemuck::Zeroable;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation, LedgerOutbound};
use percore_engine::record::{
    Account, RecordResult, RecordSlot, Transfer, account_flags, shard_of,
};
use percore_engine::state_machine::StateMachine;

const BATCH_ENTRIES: usize = 1_000;
const ACCOUNTS: usize = 10_000;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One run of `measure`.
struct Run {
    shard_count: u32,
    /// Transfers measured.
    transfers: usize,
    /// Transfer window; `None`: room for every transfer.
    transfers_max: Option<usize>,
    /// Credit every transfer to an account on another shard.
    remote_credits: bool,
    /// Acknowledge each batch's credit legs right after it (an `AckCreditLegs` batch, timed
    /// too), as the credit shards would; otherwise legs stay in flight.
    acknowledge: bool,
}

/// Applies `run.transfers` simple transfers between funded accounts on shard 0 of
/// `run.shard_count` and prints transfers per second for prepare + apply.
fn measure(label: &str, run: Run) {
    let Run {
        shard_count,
        transfers,
        transfers_max,
        remote_credits,
        acknowledge,
    } = run;
    assert!(
        !remote_credits || shard_count > 1,
        "remote credits need another shard"
    );
    let transfers_max = transfers_max.unwrap_or(transfers + ACCOUNTS);
    let mut ledger = Ledger::new(LedgerConfig {
        shard_index: 0,
        shard_count,
        accounts_max: ACCOUNTS + 1,
        transfers_max,
        credit_legs_in_flight_max: if acknowledge { 1 << 16 } else { transfers + 1 },
        batch_entries_max: BATCH_ENTRIES,
    });
    let local: Vec<u128> = (1..)
        .filter(|&id| shard_of(id, shard_count) == 0)
        .take(ACCOUNTS + 1)
        .collect();
    let remote: Vec<u128> = if remote_credits {
        (1..)
            .filter(|&id| shard_of(id, shard_count) != 0)
            .take(ACCOUNTS)
            .collect()
    } else {
        Vec::new()
    };
    let (mint, accounts) = (local[0], &local[1..]);
    let mut op = 0;
    let mut now_ns = 1;
    let mut acks: Vec<RecordSlot> = Vec::with_capacity(BATCH_ENTRIES);
    let mut run = |ledger: &mut Ledger, operation, batch: &mut [RecordSlot]| {
        op += 1;
        now_ns += 1_000;
        ledger.prepare(operation, now_ns, batch);
        let mut results = [RecordResult::zeroed(); BATCH_ENTRIES];
        ledger.apply(op, operation, batch, &mut results[..batch.len()]);
        acks.clear();
        while let Some(LedgerOutbound { record, .. }) = ledger.poll_outbound() {
            acks.push(record); // a leg, echoed back as its own acknowledgement
        }
        if acknowledge && !acks.is_empty() {
            op += 1;
            let mut ack_results = [RecordResult::zeroed(); BATCH_ENTRIES];
            let ack_results = &mut ack_results[..acks.len()];
            ledger.apply(op, LedgerOperation::AckCreditLegs, &acks, ack_results);
            assert!(ack_results.iter().all(|result| result.code == 0));
        }
        results[..batch.len()]
            .iter()
            .filter(|result| result.code == 0)
            .count()
    };

    let mut setup: Vec<RecordSlot> = std::iter::once(mint)
        .chain(accounts.iter().copied())
        .map(|id| {
            RecordSlot::from_account(&Account {
                id,
                ledger: 1,
                code: 1,
                flags: if id == mint {
                    account_flags::ALLOW_NEGATIVE
                } else {
                    0
                },
                ..Account::zeroed()
            })
        })
        .collect();
    for chunk in setup.chunks_mut(BATCH_ENTRIES) {
        run(&mut ledger, LedgerOperation::CreateAccounts, chunk);
    }
    let transfer = |id: u128, debit: u128, credit: u128, amount: u128| {
        RecordSlot::from_transfer(&Transfer {
            id,
            debit_account_id: debit,
            credit_account_id: credit,
            amount,
            ledger: 1,
            code: 1,
            ..Transfer::zeroed()
        })
    };
    let mut funding: Vec<RecordSlot> = accounts
        .iter()
        .enumerate()
        .map(|(index, &id)| transfer(index as u128 + 1, mint, id, 1 << 40))
        .collect();
    for chunk in funding.chunks_mut(BATCH_ENTRIES) {
        run(&mut ledger, LedgerOperation::CreateTransfers, chunk);
    }

    let mut rng = 42;
    let mut id_base = ACCOUNTS as u128 + 1;
    let mut make_workload = |id_base: u128, transfers: usize| -> Vec<RecordSlot> {
        (0..transfers)
            .map(|index| {
                let debit = accounts[splitmix(&mut rng) as usize % accounts.len()];
                let targets = if remote_credits {
                    &remote[..]
                } else {
                    accounts
                };
                let mut credit = targets[splitmix(&mut rng) as usize % targets.len()];
                if credit == debit {
                    credit = accounts[(splitmix(&mut rng) as usize) % accounts.len()];
                }
                transfer(
                    id_base + index as u128,
                    debit,
                    credit,
                    1 + splitmix(&mut rng) as u128 % 100,
                )
            })
            .collect()
    };
    // Fill the window (untimed) unless it has room for the whole run.
    let fill = if transfers_max < transfers {
        transfers_max
    } else {
        0
    };
    for chunk in make_workload(id_base, fill).chunks_mut(BATCH_ENTRIES) {
        run(&mut ledger, LedgerOperation::CreateTransfers, chunk);
    }
    id_base += fill as u128;
    let mut workload = make_workload(id_base, transfers);

    let start = Instant::now();
    let mut ok = 0;
    for chunk in workload.chunks_mut(BATCH_ENTRIES) {
        ok += run(&mut ledger, LedgerOperation::CreateTransfers, chunk);
    }
    let elapsed = start.elapsed();
    let rate = transfers as f64 / elapsed.as_secs_f64();
    println!(
        "{label}: {transfers} transfers ({ok} ok) in {:.3} s = {:.2} M transfers/s",
        elapsed.as_secs_f64(),
        rate / 1e6
    );
    assert!(
        ok > transfers * 9 / 10,
        "the workload is mostly valid transfers"
    );
}

#[test]
#[ignore = "ad-hoc throughput check; run in release with --ignored --nocapture"]
fn apply_throughput() {
    let local = |transfers, transfers_max| Run {
        shard_count: 1,
        transfers,
        transfers_max,
        remote_credits: false,
        acknowledge: false,
    };
    for transfers in [20_000, 100_000, 1_000_000, 10_000_000] {
        let label = format!("local, {transfers} stored (window not full)");
        measure(&label, local(transfers, None));
    }
    for window in [1 << 16, 1 << 20, 1 << 23] {
        let label = format!("local, window {window} full, 10000000 evicting");
        measure(&label, local(10_000_000, Some(window)));
    }
    let remote = |transfers_max, acknowledge| Run {
        shard_count: 4,
        transfers: 1_000_000,
        transfers_max,
        remote_credits: true,
        acknowledge,
    };
    measure(
        "cross-shard credits, 1000000 stored, unacknowledged",
        remote(None, false),
    );
    measure(
        "cross-shard credits, window 1048576 full, acknowledged per batch",
        remote(Some(1 << 20), true),
    );
}

/// The state digest's cost with the account table full (the transfer window empty: it is
/// hashed in order either way), at the default `accounts_max` and 16 times it: median of 5.
#[test]
#[ignore = "ad-hoc timing; run in release with --ignored --nocapture"]
fn digest_time() {
    for accounts_max in [1 << 16, 1 << 20] {
        let mut ledger = Ledger::new(LedgerConfig {
            accounts_max,
            ..LedgerConfig::new(0, 1)
        });
        let mut batch: Vec<RecordSlot> = (1..accounts_max as u128)
            .map(|id| {
                RecordSlot::from_account(&Account {
                    id,
                    ledger: 1,
                    code: 1,
                    ..Account::zeroed()
                })
            })
            .collect();
        let mut op = 0;
        for chunk in batch.chunks_mut(BATCH_ENTRIES) {
            op += 1;
            ledger.prepare(LedgerOperation::CreateAccounts, op, chunk);
            let mut results = [RecordResult::zeroed(); BATCH_ENTRIES];
            ledger.apply(
                op,
                LedgerOperation::CreateAccounts,
                chunk,
                &mut results[..chunk.len()],
            );
        }
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(ledger.digest());
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        println!(
            "digest, {} accounts: median {:.2} ms (min {:.2}, max {:.2})",
            accounts_max - 1,
            times[2],
            times[0],
            times[4]
        );
    }
}
