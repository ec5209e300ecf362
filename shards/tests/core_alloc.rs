//! Zero heap allocations per transaction in steady state.
//!
//! A counting global allocator wraps the system allocator. The test drives the shard's hot
//! path — submit into the pooled ring, adaptive sealing, `prepare`, `apply` with per-record
//! completions, cross-shard outbound messages — first to warm up, then for many batches,
//! and asserts that the steady-state phase allocated nothing at all.

use std::sync::Arc;

use percore_engine::batch::BatchLimits;
use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
use percore_engine::record::{RecordSlot, account_flags};
use percore_shards::core::{CoreConfig, Origin, ShardCore};
use percore_shards::loadgen::{account, accounts_of_shard, transfer};
use percore_shards::metrics::ShardMetrics;

#[path = "../../tests/support/counting_allocator.rs"]
mod counting_allocator;

use counting_allocator::{CountingAllocator, allocations};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const SHARDS: u32 = 2;
const BATCH: usize = 1_000;

/// Runs one batch through the core: submit, seal, apply; returns results seen as Ok.
fn run_batch(
    core: &mut ShardCore<Ledger>,
    operation: LedgerOperation,
    records: &[RecordSlot],
    now_us: &mut u64,
) -> usize {
    for (index, record) in records.iter().enumerate() {
        let origin = Origin::Local {
            connection: 0,
            generation: 1,
            index: index as u32,
        };
        core.submit(operation, record, origin)
            .expect("room for a batch");
    }
    let mut ok = 0;
    let mut applied = 0;
    while applied < records.len() {
        *now_us += 10;
        core.observe_depth();
        if core.poll_seal(*now_us).is_some() {
            core.apply_next(|_, result| {
                applied += 1;
                ok += usize::from(result.code == 0);
            })
            .expect("a sealed batch");
        }
    }
    // Cross-shard credit legs leave through the outbox; drain them as the runtime does.
    while core.poll_outbound().is_some() {}
    ok
}

#[test]
fn steady_state_hot_path_allocates_nothing() {
    let built_before = allocations();
    let metrics = Arc::new(ShardMetrics::new(0));
    let ledger = Ledger::new(LedgerConfig {
        shard_index: 0,
        shard_count: SHARDS,
        accounts_max: 1_024,
        transfers_max: 200_000,
        credit_legs_in_flight_max: 16_384,
        batch_entries_max: BATCH,
    });
    let config = CoreConfig {
        shard: 0,
        shard_count: SHARDS,
        transactions: 4_096,
        batches: 16,
        tx_ring_capacity: 4_096,
        batch: BatchLimits {
            linger_us_max: 0,
            ..BatchLimits::default()
        },
    };
    let mut core = ShardCore::new(config, ledger, metrics).expect("valid config");
    assert!(
        allocations() > built_before,
        "the counter sees start-up allocations"
    );

    // Set-up (allowed to allocate: it builds test data).
    let local = accounts_of_shard(0, SHARDS as usize, 65);
    let remote = accounts_of_shard(1, SHARDS as usize, 8);
    let accounts: Vec<RecordSlot> = local
        .iter()
        .map(|id| RecordSlot::from_account(&account(*id, account_flags::ALLOW_NEGATIVE)))
        .collect();
    let mut now_us = 0;
    assert_eq!(
        run_batch(
            &mut core,
            LedgerOperation::CreateAccounts,
            &accounts,
            &mut now_us
        ),
        accounts.len()
    );
    let batches = 120;
    let all: Vec<Vec<RecordSlot>> = (0..batches)
        .map(|b| {
            (0..BATCH)
                .map(|k| {
                    let debit = local[k % local.len()];
                    // One in ten crosses shards and emits a credit leg.
                    let credit = if k % 10 == 0 {
                        remote[k % remote.len()]
                    } else {
                        local[(k + 1) % local.len()]
                    };
                    RecordSlot::from_transfer(&transfer(
                        ((b as u128) << 32) | k as u128 | 1 << 100,
                        debit,
                        credit,
                        1,
                    ))
                })
                .collect()
        })
        .collect();

    // Warm-up: first batches may touch lazily created state.
    for records in &all[..20] {
        assert_eq!(
            run_batch(
                &mut core,
                LedgerOperation::CreateTransfers,
                records,
                &mut now_us
            ),
            BATCH
        );
    }
    let before = allocations();
    let mut ok = 0;
    for records in &all[20..] {
        ok += run_batch(
            &mut core,
            LedgerOperation::CreateTransfers,
            records,
            &mut now_us,
        );
    }
    let steady = allocations() - before;
    assert_eq!(ok, (batches - 20) * BATCH, "every transfer applied");
    assert_eq!(
        steady,
        0,
        "{steady} heap allocations for {} transactions in steady state",
        (batches - 20) * BATCH
    );
}
