//! `percore bench --fault-model bft`: the same closed-loop transfer load on a crash-fault
//! cluster (3 replicas, VSR) and on a BFT cluster (4 replicas, f = 1), one after the other
//! in one run, plus the cost of the signatures a BFT replica makes and checks per batch.
//!
//! The load: `threads` client threads per shard, each sending one request of
//! `records_per_request` transfers at a time (window 1: the BFT client waits for `f + 1`
//! matching replies, the crash-fault client for its group leader's), between accounts
//! created first. A thread's transfers are debited on its own shard; `cross_shard_percent`
//! of them are credited on another shard (with several shards), so their credit legs travel
//! between groups (certified in BFT mode, `docs/bft.md` §14). Committed tx/s counts
//! acknowledged transfers over the measured window (a crossing transfer counts when its
//! debit group acknowledges it; its leg settles after); latency is per request. BFT
//! clients sign every request (one signature per request) with the client keys `percore
//! keygen --clients` wrote: client 1 creates the accounts, load thread `t` is client `t +
//! 2`. This module drives clusters someone else started; it owns no processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use percore_engine::bft::{SigningKey, Vote, VoteKind};
use percore_engine::frame::Operation;
use percore_engine::record::{Account, RecordResult, Transfer, account_flags};
use percore_net::client::{BftClient, Client, ClientConfig, ClientError};
use serde::Serialize;

use crate::loadgen::{account, accounts_of_shard, route_transfer, transfer};

/// The load's shape: shards, client threads per shard, transfers per request and the
/// share of them credited on another shard.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Shards (groups) of the cluster.
    pub shards: usize,
    /// Client threads per shard.
    pub threads_per_shard: usize,
    /// Transfers per request.
    pub records_per_request: usize,
    /// Percentage of transfers credited on another shard (0 with one shard).
    pub cross_shard_percent: u32,
}

/// Accounts per shard the load moves money between (besides each shard's mint).
pub const BENCH_ACCOUNTS: usize = 64;
/// Funding of each account.
pub const BENCH_FUNDING: u128 = 1 << 50;
/// Signatures timed (each of sign and verify) by [`signature_cost`].
pub const SIGNATURE_SAMPLES: usize = 2_000;

/// Which cluster a load runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Crash faults: requests go to the group's leader.
    Crash,
    /// Byzantine faults: requests go to every replica, `f + 1` matching replies accepted.
    Bft {
        /// `f`.
        faults_max: usize,
    },
}

/// One mode's measured load.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    /// `crash` or `bft`.
    pub mode: &'static str,
    /// Replicas in each group.
    pub replicas: usize,
    /// Shards (groups).
    pub shards: usize,
    /// Percentage of transfers credited on another shard.
    pub cross_shard_percent: u32,
    /// Transfers acknowledged in the measured window.
    pub transfers: u64,
    /// Requests acknowledged in the measured window.
    pub requests: u64,
    /// Length of the measured window (s).
    pub seconds: f64,
    /// Committed (acknowledged) transfers per second.
    pub tps: f64,
    /// Request latency percentiles (µs).
    pub latency_p50_us: u64,
    /// See `latency_p50_us`.
    pub latency_p99_us: u64,
    /// Requests that failed (timed out or refused).
    pub failed: u64,
}

/// The cost of the signatures of one batch on one replica.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SignatureCost {
    /// One ed25519 signature of a 69-byte statement (µs, mean).
    pub sign_us: f64,
    /// One `verify_strict` (µs, mean).
    pub verify_us: f64,
    /// Signatures a replica makes per batch at n = 4 (a Prepare or the PrePrepare, and a
    /// Commit).
    pub signs_per_batch: u32,
    /// Signatures a replica checks per batch at n = 4 (the proposal or 2 other Prepares
    /// and the proposal, 3 Commits).
    pub verifies_per_batch: u32,
    /// `signs · sign_us + verifies · verify_us` (µs per batch per replica, whatever the
    /// batch holds).
    pub per_batch_us: f64,
    /// Client signatures a replica checks per client request (`verify_strict`, once per
    /// request per replica: a request verified at admission is not verified again when
    /// proposed, voted for or executed), on top of the per-batch cost.
    pub verifies_per_request: u32,
}

/// Times ed25519 signing and strict verification of the BFT statement in this process.
pub fn signature_cost() -> SignatureCost {
    let key = SigningKey::from_bytes(&[7; 32]);
    let verifying = key.verifying_key();
    let started = Instant::now();
    let mut votes = Vec::with_capacity(SIGNATURE_SAMPLES);
    for op in 0..SIGNATURE_SAMPLES as u64 {
        votes.push(Vote::sign(
            &key,
            0,
            VoteKind::Commit,
            0,
            1,
            op,
            [op as u8; 32],
        ));
    }
    let sign_us = started.elapsed().as_secs_f64() * 1e6 / SIGNATURE_SAMPLES as f64;
    let started = Instant::now();
    for vote in &votes {
        let bytes = Vote::signing_bytes(0, vote.kind, 0, vote.view, vote.op, &vote.digest);
        verifying
            .verify_strict(&bytes, &vote.signature)
            .expect("a fresh signature verifies");
    }
    let verify_us = started.elapsed().as_secs_f64() * 1e6 / SIGNATURE_SAMPLES as f64;
    let (signs_per_batch, verifies_per_batch) = (2, 6);
    SignatureCost {
        sign_us,
        verify_us,
        signs_per_batch,
        verifies_per_batch,
        per_batch_us: f64::from(signs_per_batch) * sign_us
            + f64::from(verifies_per_batch) * verify_us,
        verifies_per_request: 1,
    }
}

/// A client of either mode.
enum AnyClient {
    Crash(Client),
    Bft(Box<BftClient>),
}

impl AnyClient {
    /// Client `client_id`; in BFT mode it signs with `client_keys[client_id - 1]`.
    fn new(
        mode: Mode,
        replicas: &[Vec<SocketAddr>],
        client_id: u128,
        client_keys: &[SigningKey],
    ) -> Self {
        let mut config = ClientConfig::replicated(replicas.to_vec(), client_id);
        config.request_timeout = Some(Duration::from_secs(30));
        match mode {
            Mode::Crash => AnyClient::Crash(Client::new(config)),
            Mode::Bft { faults_max } => {
                let key = client_keys[client_id as usize - 1].clone();
                AnyClient::Bft(Box::new(BftClient::new(config, faults_max, key)))
            }
        }
    }

    /// Submits `records`, each to shard `route(record)`.
    fn submit<R: bytemuck::Pod>(
        &mut self,
        operation: Operation,
        records: &[R],
        route: impl Fn(&R) -> usize,
    ) -> Result<Vec<RecordResult>, ClientError> {
        match self {
            AnyClient::Crash(client) => client.submit(operation.into(), records, route),
            AnyClient::Bft(client) => client.submit(operation.into(), records, route),
        }
    }
}

/// Shard `k`'s accounts: its mint first, then the `BENCH_ACCOUNTS` the load uses.
fn shard_accounts(shard: usize, shards: usize) -> Vec<u128> {
    accounts_of_shard(shard, shards, BENCH_ACCOUNTS + 1)
}

/// Creates every shard's mint and accounts, each account funded by its own shard's mint
/// (so setup crosses no shard).
fn setup(
    mode: Mode,
    replicas: &[Vec<SocketAddr>],
    client_keys: &[SigningKey],
    shards: usize,
) -> Result<(), ClientError> {
    let mut client = AnyClient::new(mode, replicas, 1, client_keys);
    let by_shard: Vec<Vec<u128>> = (0..shards).map(|k| shard_accounts(k, shards)).collect();
    let accounts: Vec<Account> = by_shard
        .iter()
        .flat_map(|ids| {
            ids.iter().enumerate().map(|(index, &id)| {
                let flags = if index == 0 {
                    account_flags::ALLOW_NEGATIVE
                } else {
                    0
                };
                account(id, flags)
            })
        })
        .collect();
    let shard_of = |id: u128| percore_engine::record::shard_of(id, shards as u32) as usize;
    client.submit(Operation::CreateAccounts, &accounts, |a: &Account| {
        shard_of(a.id)
    })?;
    let funding: Vec<Transfer> = by_shard
        .iter()
        .flat_map(|ids| {
            let mint = ids[0];
            ids[1..]
                .iter()
                .map(move |&id| transfer(1 << 120 | id, mint, id, BENCH_FUNDING))
        })
        .collect();
    client.submit(Operation::CreateTransfers, &funding, |t: &Transfer| {
        route_transfer(t, shards)
    })?;
    Ok(())
}

/// Runs `shape.threads_per_shard` closed-loop clients per shard against the groups at
/// `replicas` (`replicas[r][k]`: replica `r`'s client address of shard `k`) for `warmup +
/// duration`; reports the measured window. BFT clients sign with `client_keys` (client `c`
/// with `client_keys[c - 1]`; at least `threads + 1` of them).
pub fn closed_loop(
    mode: Mode,
    (replicas, client_keys): (&[Vec<SocketAddr>], &[SigningKey]),
    shape: LoadShape,
    warmup: Duration,
    duration: Duration,
) -> Result<ModeReport, ClientError> {
    let shards = shape.shards;
    setup(mode, replicas, client_keys, shards)?;
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from = Instant::now() + warmup;
    let measure_end = measure_from + duration;
    let accounts: Arc<Vec<Vec<u128>>> = Arc::new(
        (0..shards)
            .map(|k| shard_accounts(k, shards)[1..].to_vec())
            .collect(),
    );
    let handles: Vec<_> = (0..shards * shape.threads_per_shard)
        .map(|thread| {
            let (stop, replicas) = (stop.clone(), replicas.to_vec());
            let (client_keys, accounts) = (client_keys.to_vec(), accounts.clone());
            std::thread::spawn(move || {
                let client_id = 2 + thread as u128;
                let home = thread % shards;
                let mut client = AnyClient::new(mode, &replicas, client_id, &client_keys);
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ thread as u64;
                let mut next_id = (thread as u128 + 1) << 80;
                let (mut latencies, mut transfers, mut failed) = (Vec::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<Transfer> = (0..shape.records_per_request)
                        .map(|_| {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let debit_index = (rng % BENCH_ACCOUNTS as u64) as usize;
                            let cross = shards > 1
                                && ((rng >> 32) % 100) < u64::from(shape.cross_shard_percent);
                            let credit_shard = if cross {
                                (home + 1 + (rng >> 40) as usize % (shards - 1)) % shards
                            } else {
                                home
                            };
                            let credit_index = (debit_index + 1) % BENCH_ACCOUNTS;
                            next_id += 1;
                            transfer(
                                next_id,
                                accounts[home][debit_index],
                                accounts[credit_shard][credit_index],
                                1,
                            )
                        })
                        .collect();
                    let started = Instant::now();
                    let outcome = client.submit(Operation::CreateTransfers, &batch, |t| {
                        route_transfer(t, shards)
                    });
                    if started < measure_from || Instant::now() > measure_end {
                        continue;
                    }
                    match outcome {
                        Ok(_) => {
                            latencies.push(started.elapsed().as_micros() as u64);
                            transfers += batch.len() as u64;
                        }
                        Err(_) => failed += 1,
                    }
                }
                (latencies, transfers, failed)
            })
        })
        .collect();
    std::thread::sleep(warmup + duration);
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut transfers, mut failed) = (Vec::new(), 0, 0);
    for handle in handles {
        let (thread_latencies, thread_transfers, thread_failed) =
            handle.join().expect("load thread");
        latencies.extend(thread_latencies);
        transfers += thread_transfers;
        failed += thread_failed;
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let seconds = duration.as_secs_f64();
    Ok(ModeReport {
        mode: match mode {
            Mode::Crash => "crash",
            Mode::Bft { .. } => "bft",
        },
        replicas: replicas.len(),
        shards,
        cross_shard_percent: if shards > 1 {
            shape.cross_shard_percent
        } else {
            0
        },
        transfers,
        requests: latencies.len() as u64,
        seconds,
        tps: transfers as f64 / seconds,
        latency_p50_us: percentile(0.50),
        latency_p99_us: percentile(0.99),
        failed,
    })
}
