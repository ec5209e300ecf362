//! BFT state transfer from a certified snapshot (`docs/bft.md` §5 and §12): the driver's
//! part of `Action::FetchSnapshot`, and the snapshot checkpoints that certify state.
//!
//! **Snapshot checkpoints.** In BFT mode the checkpoint follower is driven
//! ([`crate::checkpoint::FollowerConfig::driven`]): at every BFT op that
//! [`checkpoint_due`] names for `--checkpoint-interval-ops` (counted in BFT ops, so every
//! replica picks the same ones), the driver asks it for a snapshot at the journal op that BFT
//! op ends at. Once the file is written and installed as the journal's checkpoint, the core
//! signs `StateCheckpoint(op, chain, journal op, state digest)`; `2f + 1` matching votes
//! make a state certificate.
//!
//! **Fetch.** A peer asked for ops its log no longer holds offers its latest state
//! certificate (`StateSnapshot`). The core verifies it and asks for the snapshot; this
//! module fetches the file one [`SNAPSHOT_CHUNK_BYTES`] chunk at a time (at most
//! [`SNAPSHOT_CHUNKS_INFLIGHT_MAX`] asked ahead) into a buffer sized by the first chunk and
//! bounded by the state machine's largest snapshot. Serving, each peer's chunk requests
//! wait in a queue of their own and spend a budget of [`SNAPSHOT_SERVE_BYTES_PER_S`].
//!
//! **Verify before adopting.** The file's header (cluster, shard, journal op), its
//! checksum, its recorded digest, and then the state itself: the body is restored into a
//! scratch state machine and its `digest()` must equal the certified `state_digest`.
//! Nothing of this replica changed up to here; a peer serving other bytes costs one retry
//! with the next peer (`percore_bft_snapshot_fetches_failed_total`).
//!
//! **Install.** The state certificate is journaled in the certificate journal (made
//! durable first: a restart finds the base of the ops above it), then the snapshot becomes
//! the journal's base as in crash-mode state sync (`sync::switch_to_snapshot`),
//! and the core continues by log from the snapshot's op. The buffer is allocated per fetch:
//! a rare path.

use std::collections::VecDeque;
use std::rc::Rc;

use glommio::io::DmaFile;
use percore_engine::bft::{self, Digest, Message, SnapshotStatement, StateCert};
use percore_engine::journal::{self as format, JournalChecksum, SNAPSHOT_HEADER_BYTES};
use percore_engine::state_machine::StateMachine;

use crate::bft::{CERT_KIND_SNAPSHOT, run_actions, send, stage_cert};
use crate::checkpoint::checkpoint_due;
use crate::journal::{Journal, JournalOptions};
use crate::metrics::ShardMetrics;
use crate::runtime::Shard;
use crate::sync::{SNAPSHOT_CHUNK_BYTES, SNAPSHOT_CHUNKS_INFLIGHT_MAX, SYNC_CHUNK_TIMEOUT_US};
use percore_engine::bft::serve_budget::ServeBudget;

/// Snapshot ops asked of the follower and not yet written, remembered with their BFT op and
/// chain digest (a follower that falls this far behind skips some; each skip only means
/// one certificate fewer).
pub const SNAPSHOT_POINTS_TRACKED: usize = 8;

/// Snapshot bytes one peer's chunk requests may make this replica read and send, per
/// second. A Byzantine peer can ask for chunks without end; an honest fetch keeps at most
/// [`SNAPSHOT_CHUNKS_INFLIGHT_MAX`] chunks asked ahead and asks one peer at a time. At this
/// rate a 130 MB snapshot (the default ledger's) takes about half a second; a chunk refused
/// for now is served when the peer's budget holds it again (the shard's tick wakes the
/// batcher then).
pub const SNAPSHOT_SERVE_BYTES_PER_S: u64 = 256 << 20;
/// What a full budget holds: one fetch's window of chunks.
const SNAPSHOT_SERVE_BURST_BYTES: u64 = SNAPSHOT_CHUNKS_INFLIGHT_MAX * SNAPSHOT_CHUNK_BYTES as u64;
const SNAPSHOT_SERVE_RATE: (u64, u64) = (SNAPSHOT_SERVE_BYTES_PER_S, SNAPSHOT_SERVE_BURST_BYTES);

/// Chunk requests waiting to be served, per peer, and each peer's serve budget
/// ([`SNAPSHOT_SERVE_BYTES_PER_S`]): a peer keeps at most a fetch's window of requests
/// waiting (more are dropped), and peers are served in turn, each while its budget holds a
/// chunk. One queue shared by all peers let a flooding peer keep it full, dropping an
/// honest fetch's requests, and read the files as fast as the batcher turned. Allocated
/// whole at start.
#[derive(Debug)]
pub(crate) struct ServeQueue {
    /// Per peer: `(journal op, offset)` requests, oldest first.
    waiting: Vec<VecDeque<(u64, u64)>>,
    budgets: Vec<ServeBudget>,
    /// The peer served first next time (round robin).
    next: usize,
}

impl ServeQueue {
    /// An empty queue for `peers` peers, every budget full.
    pub(crate) fn new(peers: usize) -> Self {
        Self {
            waiting: (0..peers)
                .map(|_| VecDeque::with_capacity(SNAPSHOT_CHUNKS_INFLIGHT_MAX as usize))
                .collect(),
            budgets: vec![ServeBudget::full(SNAPSHOT_SERVE_BURST_BYTES, 0); peers],
            next: 0,
        }
    }

    /// Queues `peer`'s request; `false` (dropped) if that peer already has a fetch's
    /// window waiting, or is not a peer.
    pub(crate) fn push(&mut self, peer: u8, journal_op: u64, offset: u64) -> bool {
        match self.waiting.get_mut(usize::from(peer)) {
            Some(waiting) if (waiting.len() as u64) < SNAPSHOT_CHUNKS_INFLIGHT_MAX => {
                waiting.push_back((journal_op, offset));
                true
            }
            _ => false,
        }
    }

    /// The next request to serve at `now_us`: the peers in turn, the first with a request
    /// waiting whose budget holds a chunk (spent here). `None` when none can be served now.
    pub(crate) fn pop(&mut self, now_us: u64) -> Option<(u8, u64, u64)> {
        let peers = self.waiting.len();
        for turn in 0..peers {
            let peer = (self.next + turn) % peers;
            if self.waiting[peer].is_empty()
                || !self.budgets[peer].try_spend(
                    now_us,
                    SNAPSHOT_CHUNK_BYTES as u64,
                    SNAPSHOT_SERVE_RATE,
                )
            {
                continue;
            }
            let (journal_op, offset) = self.waiting[peer].pop_front().expect("not empty");
            self.next = (peer + 1) % peers;
            return Some((peer as u8, journal_op, offset));
        }
        None
    }

    /// When a request held back by its peer's budget can be served (`None`: none waits).
    pub(crate) fn retry_at_us(&self) -> Option<u64> {
        self.waiting
            .iter()
            .zip(&self.budgets)
            .filter(|(waiting, _)| !waiting.is_empty())
            .map(|(_, budget)| {
                budget.available_at_us(SNAPSHOT_CHUNK_BYTES as u64, SNAPSHOT_SERVE_RATE)
            })
            .min()
    }
}

/// The driver's snapshot state, in [`crate::bft::Bft`].
#[derive(Debug)]
pub(crate) struct SnapshotState {
    /// The fetch in progress.
    fetch: Option<Fetch>,
    /// Chunk requests to serve, per peer ([`ServeQueue`]).
    requests: ServeQueue,
    /// The snapshot file being served, open: journal op, file, size.
    serving: Option<(u64, Rc<DmaFile>, u64)>,
    /// `(journal op, BFT op, chain)` of snapshots asked of the follower.
    points: VecDeque<(u64, u64, Digest)>,
    /// The chain digest of the last committed op staged, and that op.
    chain: Digest,
    chain_op: u64,
}

#[derive(Debug)]
struct Fetch {
    from: u8,
    cert: StateCert,
    /// The file's bytes received so far.
    file: Vec<u8>,
    /// The whole file's size (0 before the first chunk).
    file_bytes: u64,
    /// Offset up to which chunks were asked for.
    requested_to: u64,
    heard_us: u64,
}

impl SnapshotState {
    /// The state of a driver whose core executed up to `op`, with chain digest `chain`.
    pub(crate) fn new(op: u64, chain: Digest) -> Self {
        Self {
            fetch: None,
            requests: ServeQueue::new(bft::REPLICA_COUNT_MAX),
            serving: None,
            points: VecDeque::with_capacity(SNAPSHOT_POINTS_TRACKED),
            chain,
            chain_op: op,
        }
    }
}

/// A committed op was staged (`journal_op`: the journal's op after it). Keeps the chain
/// digest and, at a snapshot op, asks the follower for a snapshot at `journal_op`.
pub(crate) fn note_staged<S: StateMachine>(
    shard: &Shard<S>,
    op: u64,
    digest: &Digest,
    journal_op: u64,
) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut state = bft.snapshot.borrow_mut();
    debug_assert_eq!(op, state.chain_op + 1, "commits are staged in order");
    state.chain = bft::chain_digest(&state.chain, op, digest);
    state.chain_op = op;
    let interval = shard
        .config
        .journal
        .as_ref()
        .map_or(0, |journal| journal.checkpoint_interval_ops);
    if interval == 0 || journal_op == 0 {
        return;
    }
    if !checkpoint_due(op, shard.index, shard.config.cores.len(), interval) {
        return;
    }
    if state
        .points
        .back()
        .is_some_and(|(asked, _, _)| *asked >= journal_op)
    {
        return; // only null ops since the last one: the same state
    }
    let asked = shard
        .checkpoints
        .borrow()
        .as_ref()
        .map(|follower| follower.request(journal_op))
        .is_some();
    if !asked {
        return;
    }
    if state.points.len() == SNAPSHOT_POINTS_TRACKED {
        state.points.pop_front();
    }
    let chain = state.chain;
    state.points.push_back((journal_op, op, chain));
}

/// The follower's snapshot at `meta.op` became the journal's checkpoint: if it was asked for
/// at a snapshot op, the core signs its statement.
pub(crate) fn snapshot_written<S: StateMachine>(shard: &Shard<S>, meta: &format::SnapshotMeta) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let point = {
        let mut state = bft.snapshot.borrow_mut();
        let point = state
            .points
            .iter()
            .find(|(journal_op, _, _)| *journal_op == meta.op)
            .copied();
        state
            .points
            .retain(|(journal_op, _, _)| *journal_op > meta.op);
        point
    };
    let Some((journal_op, op, chain)) = point else {
        return;
    };
    let statement = SnapshotStatement {
        op,
        chain,
        journal_op,
        state_digest: meta.digest,
    };
    let mut actions = Vec::new();
    bft.replica
        .borrow_mut()
        .sign_snapshot(shard.now_us(), statement, &mut actions);
    if !actions.is_empty() {
        ShardMetrics::add(&shard.metrics.bft_snapshot_votes_total, 1);
        tracing::debug!(
            shard = shard.index,
            op,
            journal_op,
            "BFT snapshot checkpoint signed"
        );
    }
    run_actions(shard, &mut actions);
}

/// Starts the fetch the core asked for ([`Action::FetchSnapshot`]).
pub(crate) fn start<S: StateMachine>(shard: &Shard<S>, from: u8, cert: &StateCert) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    ShardMetrics::add(&shard.metrics.bft_snapshot_fetches_total, 1);
    tracing::info!(
        shard = shard.index,
        peer = from,
        op = cert.op(),
        journal_op = cert.statement.journal_op,
        "BFT state transfer: the ops are gone from the peers' logs; fetching the snapshot \
         2f+1 replicas certified"
    );
    let journal_op = cert.statement.journal_op;
    bft.snapshot.borrow_mut().fetch = Some(Fetch {
        from,
        cert: cert.clone(),
        file: Vec::new(),
        file_bytes: 0,
        requested_to: SNAPSHOT_CHUNK_BYTES as u64,
        heard_us: shard.now_us(),
    });
    // The first chunk alone: it tells the file's size.
    send(
        shard,
        &[from],
        &Message::SnapshotRequest {
            journal_op,
            offset: 0,
        },
    );
}

/// When chunk requests held back by their peers' budgets can be served (`None`: none
/// waits): the tick wakes the batcher then.
pub(crate) fn serve_retry_at_us<S: StateMachine>(shard: &Shard<S>) -> Option<u64> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    bft.snapshot.borrow().requests.retry_at_us()
}

/// A peer's `SnapshotRequest`: queued for the batcher, which reads the file.
pub(crate) fn request_received<S: StateMachine>(
    shard: &Shard<S>,
    from: u8,
    journal_op: u64,
    offset: u64,
) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    if !bft
        .snapshot
        .borrow_mut()
        .requests
        .push(from, journal_op, offset)
    {
        ShardMetrics::add(&shard.metrics.bft_snapshot_requests_dropped_total, 1);
    }
    shard.batcher.notify();
}

/// A `SnapshotChunk` from `from`: appended if it is the next one of the fetch in progress;
/// then more are asked for, or the batcher verifies and installs the file.
pub(crate) fn chunk_received<S: StateMachine>(
    shard: &Shard<S>,
    from: u8,
    (journal_op, offset, file_bytes): (u64, u64, u64),
    body: &[u8],
) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let bytes_max = crate::sync::snapshot_file_bytes_max(shard);
    let outcome = {
        let mut state = bft.snapshot.borrow_mut();
        let Some(fetch) = state.fetch.as_mut() else {
            return;
        };
        if fetch.from != from
            || fetch.cert.statement.journal_op != journal_op
            || fetch.file.len() as u64 != offset
        {
            return;
        }
        let accepted = crate::sync::accept_chunk(
            (
                &mut fetch.file,
                &mut fetch.file_bytes,
                &mut fetch.requested_to,
            ),
            (offset, file_bytes, body),
            bytes_max,
        );
        if accepted.is_ok() {
            fetch.heard_us = shard.now_us();
        }
        accepted
    };
    ShardMetrics::add(&shard.metrics.bft_snapshot_bytes_total, body.len() as u64);
    let (requests, done) = match outcome {
        Ok(next) => next,
        Err(why) => return fail(shard, why),
    };
    let mut offset = requests.start;
    // Bounded by the window: at most SNAPSHOT_CHUNKS_INFLIGHT_MAX requests.
    while offset < requests.end {
        send(
            shard,
            &[from],
            &Message::SnapshotRequest { journal_op, offset },
        );
        offset += SNAPSHOT_CHUNK_BYTES as u64;
    }
    if done {
        shard.batcher.notify();
    }
}

/// Ends the fetch in progress without changing anything; the core asks the next peer.
fn fail<S: StateMachine>(shard: &Shard<S>, why: &str) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let Some(fetch) = bft.snapshot.borrow_mut().fetch.take() else {
        return;
    };
    tracing::warn!(
        shard = shard.index,
        peer = fetch.from,
        op = fetch.cert.op(),
        why,
        "BFT snapshot fetch failed; asking the next peer"
    );
    ShardMetrics::add(&shard.metrics.bft_snapshot_fetches_failed_total, 1);
    let mut actions = Vec::new();
    bft.replica
        .borrow_mut()
        .on_snapshot_failed(shard.now_us(), &mut actions);
    run_actions(shard, &mut actions);
}

/// The batcher's part, once per turn: serves queued chunk requests, fails a fetch whose
/// peer went quiet, installs a complete one. Returns whether it did anything.
pub(crate) async fn step<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    release_stale(shard, journal).await;
    let mut progressed = serve(shard, journal).await;
    let (complete, quiet) = match bft.snapshot.borrow().fetch.as_ref() {
        None => return progressed,
        Some(fetch) => (
            fetch.file_bytes > 0 && fetch.file.len() as u64 == fetch.file_bytes,
            shard.now_us().saturating_sub(fetch.heard_us) > SYNC_CHUNK_TIMEOUT_US,
        ),
    };
    if complete {
        progressed |= install(shard, journal).await;
    } else if quiet {
        fail(shard, "the peer stopped answering");
        progressed = true;
    }
    progressed
}

/// Serves the queued chunk requests from the journal's retained snapshot files (the
/// checkpoint and the one before). A file that is not here is answered with an empty
/// chunk: the fetch fails at once and the requester asks the next peer.
async fn serve<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) -> bool {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut served = false;
    loop {
        let next = bft.snapshot.borrow_mut().requests.pop(shard.now_us());
        let Some((to, journal_op, offset)) = next else {
            return served;
        };
        served = true;
        let (file, size) = match open(shard, journal, journal_op).await {
            Some(open) => open,
            None => {
                let empty = Message::SnapshotChunk {
                    journal_op,
                    offset,
                    file_bytes: 0,
                    bytes: Vec::new(),
                };
                send(shard, &[to], &empty);
                continue;
            }
        };
        if offset >= size {
            continue;
        }
        let length = (size - offset).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
        let Ok(chunk) = file.read_at(offset, length).await else {
            continue;
        };
        if chunk.len() != length {
            continue;
        }
        let mut bytes = chunk.to_vec();
        if bft.settings.byzantine == Some(crate::bft::Byzantine::CorruptSnapshot)
            && let Some(byte) = bytes.last_mut()
        {
            // Test only: a lie the requester must catch (checksum or state digest).
            *byte ^= 0x5A;
        }
        send(
            shard,
            &[to],
            &Message::SnapshotChunk {
                journal_op,
                offset,
                file_bytes: size,
                bytes,
            },
        );
        ShardMetrics::add(
            &shard.metrics.bft_snapshot_bytes_served_total,
            length as u64,
        );
    }
}

/// Closes the snapshot file kept open for serving once the journal no longer retains it
/// (neither its checkpoint nor the one before): the journal removed the file, and an open
/// descriptor held its space, possibly gigabytes, until the next serve or a restart.
async fn release_stale<S: StateMachine>(shard: &Shard<S>, journal: &Journal) {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let superblock = *journal.superblock();
    let stale = bft
        .snapshot
        .borrow()
        .serving
        .as_ref()
        .is_some_and(|(op, _, _)| {
            *op != superblock.checkpoint.op && *op != superblock.checkpoint_previous.op
        });
    if !stale {
        return;
    }
    let released = bft.snapshot.borrow_mut().serving.take();
    if let Some((_, file, _)) = released
        && let Ok(file) = Rc::try_unwrap(file)
    {
        let _ = file.close().await;
    }
}

/// The snapshot file at `journal_op`, open (cached while it is served), if the journal
/// still retains it.
async fn open<S: StateMachine>(
    shard: &Shard<S>,
    journal: &Journal,
    journal_op: u64,
) -> Option<(Rc<DmaFile>, u64)> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    if let Some((op, file, size)) = bft.snapshot.borrow().serving.as_ref()
        && *op == journal_op
    {
        return Some((file.clone(), *size));
    }
    let superblock = *journal.superblock();
    if journal_op == 0
        || (journal_op != superblock.checkpoint.op
            && journal_op != superblock.checkpoint_previous.op)
    {
        return None;
    }
    let path = journal
        .config()
        .dir
        .join(format::snapshot_file_name(journal_op));
    let file = DmaFile::open(&path).await.ok()?;
    let size = file.file_size().await.ok()?;
    // Held shared while it is served, as in crash mode (`sync::serve`): a follower that
    // releases it as stale then neither keeps it as the spare snapshot, which its next
    // write would overwrite under this open file, nor shrinks it
    // (`checkpoint::snapshot_keep_as_spare`, `checkpoint::snapshot_release`).
    crate::io_fence::hold(&file).ok()?;
    let file = Rc::new(file);
    let old = bft
        .snapshot
        .borrow_mut()
        .serving
        .replace((journal_op, file.clone(), size));
    if let Some((_, old, _)) = old
        && let Ok(old) = Rc::try_unwrap(old)
    {
        let _ = old.close().await;
    }
    Some((file, size))
}

/// Verifies the fetched file against the state certificate and, if it holds, makes it
/// this replica's state and journal base. Returns whether it did anything.
async fn install<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    if journal.op_staged() != journal.op_durable() || bft.commits_queued() {
        return false; // commits still being journaled: next turn
    }
    let Some(mut certs) = bft.certs.borrow_mut().take() else {
        return false;
    };
    let fetch = bft.snapshot.borrow_mut().fetch.take().expect("a fetch");
    let verified = verify(shard, journal, &fetch);
    let meta = match verified {
        Ok(meta) => meta,
        Err(why) => {
            *bft.certs.borrow_mut() = Some(certs);
            bft.snapshot.borrow_mut().fetch = Some(fetch);
            fail(shard, why);
            return true;
        }
    };
    let statement = fetch.cert.statement;
    let body = &fetch.file[SNAPSHOT_HEADER_BYTES..][..meta.snapshot_bytes as usize];
    // The base of the ops above, durable before the journal changes: a restart between
    // the two finds a record above its journal and cuts it.
    stage_cert(
        shard,
        &mut certs,
        (CERT_KIND_SNAPSHOT, &[]),
        (statement.op, statement.journal_op),
        (0, statement.chain),
        (&fetch.cert.votes, &[]),
    )
    .await;
    if let Err(error) = certs.commit().await {
        panic!(
            "shard {}: BFT certificate journal write failed, stopping: {error}",
            shard.index
        );
    }
    let cert_op = certs.op_durable();
    *bft.certs.borrow_mut() = Some(certs);
    let options = JournalOptions {
        records_max: shard.core.borrow().batch_records_max(),
        ..JournalOptions::default()
    };
    crate::sync::switch_to_snapshot(shard, journal, &meta, body, options).await;
    {
        let mut state = bft.snapshot.borrow_mut();
        state.chain = statement.chain;
        state.chain_op = statement.op;
        state.points.clear();
    }
    crate::bft::note_base(bft, statement.op, statement.journal_op, cert_op);
    // The ops below the snapshot are not here: the legs they emitted that are still in
    // flight are certified again from the state, like the peers did at this op.
    crate::bft_xshard::produce_in_flight(shard, &shard.core.borrow(), statement.journal_op);
    crate::bft::answer_applied(shard);
    ShardMetrics::add(&shard.metrics.bft_snapshot_installs_total, 1);
    tracing::info!(
        shard = shard.index,
        peer = fetch.from,
        op = statement.op,
        journal_op = statement.journal_op,
        snapshot_bytes = meta.snapshot_bytes,
        "BFT state transfer: certified snapshot verified and installed; the ops above \
         follow by log"
    );
    let mut actions = Vec::new();
    let installed =
        bft.replica
            .borrow_mut()
            .on_snapshot_installed(shard.now_us(), &statement, &mut actions);
    debug_assert!(installed.is_ok(), "{installed:?}");
    run_actions(shard, &mut actions);
    true
}

/// Checks the fetched file against the certificate: header (cluster, shard, journal op,
/// recorded digest), checksum, and the digest of the state it restores to, computed on a
/// scratch state machine so that nothing here changes before it matches.
fn verify<S: StateMachine>(
    shard: &Shard<S>,
    journal: &Journal,
    fetch: &Fetch,
) -> Result<format::SnapshotMeta, &'static str> {
    let statement = &fetch.cert.statement;
    let meta =
        format::decode_snapshot_header(&fetch.file).map_err(|_| "the header does not decode")?;
    if meta.op != statement.journal_op
        || meta.shard as usize != shard.index
        || meta.cluster_id != journal.config().cluster_id
    {
        return Err("the snapshot is not the certified one");
    }
    if meta.digest != statement.state_digest {
        return Err("the snapshot records another state digest than the certified one");
    }
    if meta.op <= journal.op_durable() {
        return Err("the journal is at or past the snapshot");
    }
    let end = (SNAPSHOT_HEADER_BYTES as u64).saturating_add(meta.snapshot_bytes);
    let body = usize::try_from(end)
        .ok()
        .and_then(|end| fetch.file.get(SNAPSHOT_HEADER_BYTES..end))
        .ok_or("the snapshot is shorter than its header says")?;
    let checksum: JournalChecksum = format::journal_checksum(body);
    if checksum != meta.snapshot_checksum {
        return Err("the snapshot's checksum does not match");
    }
    let mut scratch = (shard.make_follower)();
    scratch
        .restore(body)
        .map_err(|_| "the snapshot does not restore")?;
    if scratch.digest() != statement.state_digest {
        return Err("the restored state's digest is not the certified one");
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Microseconds for a budget to refill one chunk.
    fn chunk_refill_us() -> u64 {
        (SNAPSHOT_CHUNK_BYTES as u64 * 1_000_000).div_ceil(SNAPSHOT_SERVE_BYTES_PER_S)
    }

    #[test]
    fn a_flooding_peer_neither_pushes_out_an_honest_fetch_nor_exceeds_its_budget() {
        let window = SNAPSHOT_CHUNKS_INFLIGHT_MAX;
        let mut queue = ServeQueue::new(4);
        // Peer 3 floods; only a fetch's window of its requests waits.
        let flooded = (0..1_000).filter(|&k| queue.push(3, 7, k * 65_536)).count();
        assert_eq!(flooded as u64, window);
        // An honest fetch from peer 1 still finds room, and is served in turn.
        for k in 0..window {
            assert!(queue.push(1, 7, k * 65_536));
        }
        assert!(!queue.push(1, 7, 0), "beyond its window");
        assert!(!queue.push(9, 7, 0), "not a peer");
        let mut served = [0u64; 4];
        while let Some((peer, _, _)) = queue.pop(0) {
            served[usize::from(peer)] += 1;
        }
        // A full budget is one window each: both windows served, alternating.
        assert_eq!(served, [0, window, 0, window]);
        // The flooder refills its window; now its budget is spent: nothing until it
        // refills, and then one chunk per refill time.
        for k in 0..window {
            assert!(queue.push(3, 7, k * 65_536));
        }
        assert_eq!(queue.pop(0), None);
        let at = queue.retry_at_us().expect("requests wait");
        assert_eq!(at, chunk_refill_us());
        assert_eq!(queue.pop(at - 1), None);
        assert_eq!(queue.pop(at), Some((3, 7, 0)));
        assert_eq!(queue.pop(at), None);
        // Over a second, at most the budget's rate (plus the burst it started with).
        let mut bytes = 0u64;
        let mut now_us = at;
        while now_us <= at + 1_000_000 {
            while queue.pop(now_us).is_some() {
                bytes += SNAPSHOT_CHUNK_BYTES as u64;
                assert!(queue.push(3, 7, 0));
            }
            assert!(queue.push(3, 7, 0) || queue.waiting[3].len() as u64 == window);
            now_us += 1_000;
        }
        assert!(
            bytes <= SNAPSHOT_SERVE_BYTES_PER_S + SNAPSHOT_SERVE_BURST_BYTES,
            "{bytes} bytes served in a second"
        );
        assert!(
            bytes >= SNAPSHOT_SERVE_BYTES_PER_S / 2,
            "{bytes}: far below the rate"
        );
    }

    #[test]
    fn an_empty_queue_has_nothing_to_retry() {
        let mut queue = ServeQueue::new(4);
        assert_eq!(queue.retry_at_us(), None);
        assert!(queue.push(2, 1, 0));
        assert_eq!(queue.retry_at_us(), Some(0), "a full budget: at once");
        assert_eq!(queue.pop(5), Some((2, 1, 0)));
        assert_eq!(queue.retry_at_us(), None);
    }
}
