//! `percore bench --fault-model bft`: the same closed-loop transfer load on a crash-fault
//! cluster (3 replicas, VSR) and on a BFT cluster (4 replicas, f = 1), one after the other
//! in one run, plus the cost of the signatures a BFT replica makes and checks per batch.
//!
//! The load: `threads` client threads, each sending one request of `records_per_request`
//! transfers at a time (window 1: the BFT client waits for `f + 1` matching replies, the
//! crash-fault client for its group leader's), between accounts created first. Committed
//! tx/s counts acknowledged transfers over the measured window; latency is per request.
//! BFT clients sign every request (one signature per request) with the client keys
//! `percore keygen --clients` wrote: client 1 creates the accounts, thread `t` is client
//! `t + 2`. This module drives clusters someone else started; it owns no processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use percore_engine::bft::{SigningKey, Vote, VoteKind};
use percore_engine::frame::Operation;
use percore_engine::record::{Account, RecordResult, Transfer, account_flags};
use percore_net::client::{BftClient, Client, ClientConfig, ClientError};
use serde::Serialize;

use crate::loadgen::{account, transfer};

/// Accounts the load moves money between (besides the mint, account 1).
pub const BENCH_ACCOUNTS: u128 = 64;
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
    /// Replicas in the group.
    pub replicas: usize,
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
        replicas: &[SocketAddr],
        client_id: u128,
        client_keys: &[SigningKey],
    ) -> Self {
        let addresses = replicas.iter().map(|address| vec![*address]).collect();
        let mut config = ClientConfig::replicated(addresses, client_id);
        config.request_timeout = Some(Duration::from_secs(30));
        match mode {
            Mode::Crash => AnyClient::Crash(Client::new(config)),
            Mode::Bft { faults_max } => {
                let key = client_keys[client_id as usize - 1].clone();
                AnyClient::Bft(Box::new(BftClient::new(config, faults_max, key)))
            }
        }
    }

    fn submit<R: bytemuck::Pod>(
        &mut self,
        operation: Operation,
        records: &[R],
    ) -> Result<Vec<RecordResult>, ClientError> {
        match self {
            AnyClient::Crash(client) => client.submit(operation.into(), records, |_| 0),
            AnyClient::Bft(client) => client.submit(operation.into(), records, |_| 0),
        }
    }
}

/// Creates the mint (1) and accounts 2..=BENCH_ACCOUNTS+1, funded.
fn setup(
    mode: Mode,
    replicas: &[SocketAddr],
    client_keys: &[SigningKey],
) -> Result<(), ClientError> {
    let mut client = AnyClient::new(mode, replicas, 1, client_keys);
    let accounts: Vec<Account> = (1..=BENCH_ACCOUNTS + 1)
        .map(|id| {
            account(
                id,
                if id == 1 {
                    account_flags::ALLOW_NEGATIVE
                } else {
                    0
                },
            )
        })
        .collect();
    client.submit(Operation::CreateAccounts, &accounts)?;
    let funding: Vec<Transfer> = (2..=BENCH_ACCOUNTS + 1)
        .map(|id| transfer(1 << 120 | id, 1, id, BENCH_FUNDING))
        .collect();
    client.submit(Operation::CreateTransfers, &funding)?;
    Ok(())
}

/// Runs `threads` closed-loop clients against a one-shard group at `replicas` (client
/// addresses in replica order) for `warmup + duration`; reports the measured window. BFT
/// clients sign with `client_keys` (client `c` with `client_keys[c - 1]`; at least
/// `threads + 1` of them).
pub fn closed_loop(
    mode: Mode,
    (replicas, client_keys): (&[SocketAddr], &[SigningKey]),
    threads: usize,
    records_per_request: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<ModeReport, ClientError> {
    setup(mode, replicas, client_keys)?;
    let stop = Arc::new(AtomicBool::new(false));
    let measure_from = Instant::now() + warmup;
    let measure_end = measure_from + duration;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (stop, replicas) = (stop.clone(), replicas.to_vec());
            let client_keys = client_keys.to_vec();
            std::thread::spawn(move || {
                let client_id = 2 + thread as u128;
                let mut client = AnyClient::new(mode, &replicas, client_id, &client_keys);
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ thread as u64;
                let mut next_id = (thread as u128 + 1) << 80;
                let (mut latencies, mut transfers, mut failed) = (Vec::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<Transfer> = (0..records_per_request)
                        .map(|_| {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let debit = 2 + u128::from(rng % BENCH_ACCOUNTS as u64);
                            let credit = 2 + (debit - 1) % BENCH_ACCOUNTS;
                            next_id += 1;
                            transfer(next_id, debit, credit, 1)
                        })
                        .collect();
                    let started = Instant::now();
                    let outcome = client.submit(Operation::CreateTransfers, &batch);
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
        transfers,
        requests: latencies.len() as u64,
        seconds,
        tps: transfers as f64 / seconds,
        latency_p50_us: percentile(0.50),
        latency_p99_us: percentile(0.99),
        failed,
    })
}
