//! State sync: a replica further behind than its peers retain catches up from a checkpoint
//! (`docs/protocol.md` section 9).
//!
//! Peers remove journal segments below their previous checkpoint once no peer within
//! `--retain-ops` of it still needs them. A replica asking for an op that is gone gets
//! `NotRetained` (with the peer's first retained op and latest checkpoint); its core then
//! asks for a state sync ([`Action::StateSync`]). This module runs it:
//!
//! 1. **Fetch.** `RequestSnapshot(checkpoint_op, offset)` to the peer, one
//!    [`SNAPSHOT_CHUNK_BYTES`] chunk in flight, into a buffer sized by the first chunk's
//!    `snapshot_bytes` (the snapshot file's size; bounded by the state machine's largest
//!    snapshot). The peer answers `SnapshotChunk`s read from its snapshot file, or
//!    `NotRetained` if its checkpoint moved on (the sync fails and the next repair starts
//!    one at the new checkpoint). No answer for [`SYNC_CHUNK_TIMEOUT_US`] fails it too.
//! 2. **Verify.** The file's header (cluster, shard, op, `checkpoint_checksum`) and the
//!    BLAKE3-128 of its bytes. A bad file fails the sync; nothing has changed yet.
//! 3. **Restore.** The state machine is replaced by the snapshot ([`ShardCore::resync`]),
//!    and its digest must be the one recorded in the file; if not, the process stops with
//!    its journal untouched (a restart recovers the old state).
//! 4. **Switch.** [`Journal::install_synced_checkpoint`] writes the snapshot file, an empty
//!    next segment and the superblock naming the checkpoint (the commit point: a crash
//!    before it recovers the old journal, after it the new one), removes the old files,
//!    and the journal is opened again. The checkpoint follower restarts from it.
//! 5. **Resume.** The core learns the new head ([`Replica::on_state_synced`]) and repairs
//!    the ops after the checkpoint as usual.
//!
//! The checkpoint is committed (peers checkpoint applied ops only), so installing it never
//! contradicts a later log; until the switch the replica's old log stays intact. The
//! buffer is allocated per sync: a sync is a rare, exceptional path, not the steady state.
//!
//! [`Action::StateSync`]: percore_engine::replica::Action::StateSync
//! [`Replica::on_state_synced`]: percore_engine::replica::Replica::on_state_synced
//! [`ShardCore::resync`]: crate::core::ShardCore::resync
//! [`Journal::install_synced_checkpoint`]: crate::journal::Journal::install_synced_checkpoint

use std::collections::VecDeque;
use std::rc::Rc;

use glommio::io::DmaFile;
use percore_engine::journal::{self as format, JournalChecksum, SNAPSHOT_HEADER_BYTES};
use percore_engine::message::{Command, PeerHeader, field};
use percore_engine::replica::ACTIONS_MAX;
use percore_engine::state_machine::StateMachine;

use crate::journal::{Journal, JournalOptions};
use crate::metrics::ShardMetrics;
use crate::runtime::Shard;

/// Snapshot bytes per `SnapshotChunk`.
pub const SNAPSHOT_CHUNK_BYTES: usize = 64 * 1024;
/// Chunk requests a syncing replica keeps outstanding (the peer answers them in order).
pub const SNAPSHOT_CHUNKS_INFLIGHT_MAX: u64 = 8;
/// A sync whose peer has not answered for this long fails (µs).
pub const SYNC_CHUNK_TIMEOUT_US: u64 = 5_000_000;
/// Snapshot chunk requests queued for serving; more are dropped (the requester times out
/// and starts again).
pub const SNAPSHOT_REQUESTS_QUEUED_MAX: usize = 16;

/// A state sync in progress.
#[derive(Debug)]
pub(crate) struct SyncProgress {
    from: u8,
    checkpoint_op: u64,
    /// The snapshot file's bytes received so far (header first).
    file: Vec<u8>,
    /// The whole file's size, from the first chunk (0 before it).
    file_bytes: u64,
    /// Offset of the next chunk to ask for.
    requested_to: u64,
    /// When the last chunk arrived or the sync started (µs).
    heard_us: u64,
}

/// The sync's and the snapshot server's state in [`crate::replication::Replication`].
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    progress: Option<SyncProgress>,
    /// Chunk requests to serve: `(peer, checkpoint op, offset)`.
    requests: VecDeque<(u8, u64, u64)>,
    /// The snapshot file being served, open, with its op and size.
    serving: Option<(u64, Rc<DmaFile>, u64)>,
}

impl SyncState {
    pub(crate) fn new() -> Self {
        SyncState {
            progress: None,
            requests: VecDeque::with_capacity(SNAPSHOT_REQUESTS_QUEUED_MAX),
            serving: None,
        }
    }
}

/// Starts the sync the core asked for: the first chunk request.
pub(crate) fn start<S: StateMachine>(shard: &Shard<S>, from: u8, checkpoint_op: u64) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    tracing::info!(
        shard = shard.index,
        peer = from,
        checkpoint_op,
        "state sync: fetching the checkpoint"
    );
    ShardMetrics::add(&shard.metrics.state_syncs_total, 1);
    replication.sync.borrow_mut().progress = Some(SyncProgress {
        from,
        checkpoint_op,
        file: Vec::new(),
        file_bytes: 0,
        requested_to: SNAPSHOT_CHUNK_BYTES as u64,
        heard_us: shard.now_us(),
    });
    // The first chunk alone: it tells the file's size.
    request_chunk(shard, from, checkpoint_op, 0);
}

fn request_chunk<S: StateMachine>(shard: &Shard<S>, to: u8, checkpoint_op: u64, offset: u64) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut header = replication.header(Command::RequestSnapshot);
    header.set_field_u64(field::SNAPSHOT_CHECKPOINT_OP, checkpoint_op);
    header.set_field_u64(field::SNAPSHOT_OFFSET, offset);
    let dropped = &shard.metrics.replication_messages_dropped_total;
    replication.outboxes[usize::from(to)].send(header, &[], dropped);
}

/// A `RequestSnapshot` from `from`: queued for the batcher, which reads the file.
pub(crate) fn request_received<S: StateMachine>(shard: &Shard<S>, from: u8, header: &PeerHeader) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut sync = replication.sync.borrow_mut();
    if sync.requests.len() < SNAPSHOT_REQUESTS_QUEUED_MAX {
        sync.requests.push_back((
            from,
            header.field_u64(field::SNAPSHOT_CHECKPOINT_OP),
            header.field_u64(field::SNAPSHOT_OFFSET),
        ));
    }
    shard.batcher.notify();
}

/// A `NotRetained` from `from` about `op_min`: if it is about the checkpoint being
/// fetched from it, that checkpoint is gone and the sync fails. Returns whether it was.
pub(crate) fn not_retained<S: StateMachine>(shard: &Shard<S>, from: u8, op_min: u64) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let matches = replication
        .sync
        .borrow()
        .progress
        .as_ref()
        .is_some_and(|progress| progress.from == from && progress.checkpoint_op == op_min);
    if matches {
        fail(shard, "the peer's checkpoint moved on");
    }
    matches
}

/// A `SnapshotChunk` from `from`: appended if it is the next one of the sync in progress;
/// then the next is asked for, or the batcher installs the whole file.
pub(crate) fn chunk_received<S: StateMachine>(
    shard: &Shard<S>,
    from: u8,
    header: &PeerHeader,
    body: &[u8],
) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let checkpoint_op = header.field_u64(field::SNAPSHOT_CHECKPOINT_OP);
    let offset = header.field_u64(field::SNAPSHOT_OFFSET);
    let file_bytes = header.field_u64(field::SNAPSHOT_CHUNK_SNAPSHOT_BYTES);
    let bytes_max = snapshot_file_bytes_max(shard);
    let (requests, done) = {
        let mut sync = replication.sync.borrow_mut();
        let Some(progress) = sync.progress.as_mut() else {
            return;
        };
        if progress.from != from
            || progress.checkpoint_op != checkpoint_op
            || progress.file.len() as u64 != offset
        {
            return;
        }
        let accepted = accept_chunk(
            (
                &mut progress.file,
                &mut progress.file_bytes,
                &mut progress.requested_to,
            ),
            (offset, file_bytes, body),
            bytes_max,
        );
        match accepted {
            Ok(next) => {
                progress.heard_us = shard.now_us();
                ShardMetrics::add(&shard.metrics.state_sync_bytes_total, body.len() as u64);
                next
            }
            Err(why) => {
                drop(sync);
                fail(shard, why);
                return;
            }
        }
    };
    let mut offset = requests.start;
    // Bounded by the window: at most SNAPSHOT_CHUNKS_INFLIGHT_MAX requests.
    while offset < requests.end {
        request_chunk(shard, from, checkpoint_op, offset);
        offset += SNAPSHOT_CHUNK_BYTES as u64;
    }
    if done {
        shard.batcher.notify();
    }
}

/// Largest snapshot file this shard's state machine can have (header and sector-padded
/// body): a peer announcing a larger one is refused before anything is allocated.
pub(crate) fn snapshot_file_bytes_max<S: StateMachine>(shard: &Shard<S>) -> u64 {
    shard
        .core
        .borrow()
        .state_machine()
        .snapshot_bytes_max()
        .map_or(u64::MAX, |max| {
            (SNAPSHOT_HEADER_BYTES + max.next_multiple_of(format::SECTOR_BYTES)) as u64
        })
}

/// Appends a snapshot chunk (`body` at `offset` of a file of `file_bytes`, at most
/// `bytes_max`) to a download: `file` (allocated at the first chunk, whose size then holds
/// for the rest), `expected` (the file's size, 0 before the first chunk) and
/// `requested_to` (offset up to which chunks were asked for). The caller has checked that
/// `offset` is where `file` ends. Returns the offsets to ask for next, keeping
/// [`SNAPSHOT_CHUNKS_INFLIGHT_MAX`] chunks asked for beyond what arrived, and whether the
/// file is complete.
pub(crate) fn accept_chunk(
    (file, expected, requested_to): (&mut Vec<u8>, &mut u64, &mut u64),
    (offset, file_bytes, body): (u64, u64, &[u8]),
    bytes_max: u64,
) -> Result<(std::ops::Range<u64>, bool), &'static str> {
    debug_assert_eq!(file.len() as u64, offset);
    if *expected == 0 {
        if file_bytes <= SNAPSHOT_HEADER_BYTES as u64 || file_bytes > bytes_max {
            return Err("the snapshot's size is out of bounds");
        }
        *expected = file_bytes;
        *file = Vec::with_capacity(file_bytes as usize);
    }
    if file_bytes != *expected || body.is_empty() || offset + body.len() as u64 > file_bytes {
        return Err("a chunk does not fit the snapshot (or the peer has no file)");
    }
    file.extend_from_slice(body);
    let received = file.len() as u64;
    let window_end =
        (received + SNAPSHOT_CHUNKS_INFLIGHT_MAX * SNAPSHOT_CHUNK_BYTES as u64).min(file_bytes);
    let from_offset = (*requested_to).max(received);
    *requested_to = (*requested_to).max(window_end);
    Ok((from_offset..window_end, received == file_bytes))
}

/// Ends the sync in progress without installing anything; the core may start another.
fn fail<S: StateMachine>(shard: &Shard<S>, why: &str) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let Some(progress) = replication.sync.borrow_mut().progress.take() else {
        return;
    };
    tracing::warn!(
        shard = shard.index,
        peer = progress.from,
        checkpoint_op = progress.checkpoint_op,
        why,
        "state sync failed"
    );
    ShardMetrics::add(&shard.metrics.state_syncs_failed_total, 1);
    // A rare path, called while the shared action buffers may be in use.
    let mut actions = Vec::with_capacity(ACTIONS_MAX);
    replication
        .replica
        .borrow_mut()
        .on_state_sync_failed(shard.now_us(), &mut actions);
    crate::replication::submit_actions(shard, &actions);
}

/// The batcher's part, once per turn: serves queued chunk requests, fails a sync whose
/// peer went quiet, installs a fetched snapshot. Returns whether it did anything.
pub(crate) async fn step<S>(shard: &Shard<S>, journal: &mut Journal) -> bool
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let mut progressed = serve(shard, journal).await;
    let replication = shard.replication.as_ref().expect("replicated shard");
    let (complete, quiet) = {
        let sync = replication.sync.borrow();
        match sync.progress.as_ref() {
            None => return progressed,
            Some(progress) => (
                progress.file_bytes > 0 && progress.file.len() as u64 == progress.file_bytes,
                shard.now_us().saturating_sub(progress.heard_us) > SYNC_CHUNK_TIMEOUT_US,
            ),
        }
    };
    if complete {
        install(shard, journal).await;
        progressed = true;
    } else if quiet {
        fail(shard, "the peer stopped answering");
        progressed = true;
    }
    progressed
}

/// Serves the queued chunk requests from the latest checkpoint's snapshot file.
async fn serve<S: StateMachine>(shard: &Shard<S>, journal: &mut Journal) -> bool {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut served = false;
    loop {
        let Some((to, checkpoint_op, offset)) = replication.sync.borrow_mut().requests.pop_front()
        else {
            return served;
        };
        served = true;
        let superblock = *journal.superblock();
        let dropped = &shard.metrics.replication_messages_dropped_total;
        // A file being served stays readable after a newer checkpoint removes it (it is
        // open, and held shared so that the follower unlinks it without shrinking it);
        // otherwise only the retained checkpoints' files are served.
        let cached = replication
            .sync
            .borrow()
            .serving
            .as_ref()
            .is_some_and(|(op, _, _)| *op == checkpoint_op);
        let retained = checkpoint_op > 0
            && (checkpoint_op == superblock.checkpoint.op
                || checkpoint_op == superblock.checkpoint_previous.op);
        if !cached && !retained {
            send_not_retained(shard, journal, to, checkpoint_op);
            continue;
        }
        if !cached {
            let path = journal
                .config()
                .dir
                .join(format::snapshot_file_name(checkpoint_op));
            // Held shared while it is served: a follower that releases it as stale then
            // unlinks it without shrinking it under this open file
            // (`checkpoint::snapshot_release`).
            let opened = match DmaFile::open(&path).await {
                Ok(file) => match file.file_size().await {
                    Ok(size) if crate::io_fence::hold(&file).is_ok() => Some((file, size)),
                    _ => None,
                },
                Err(_) => None,
            };
            let Some((file, size)) = opened else {
                send_not_retained(shard, journal, to, checkpoint_op);
                continue;
            };
            let old =
                replication
                    .sync
                    .borrow_mut()
                    .serving
                    .replace((checkpoint_op, Rc::new(file), size));
            if let Some((_, old, _)) = old
                && let Ok(old) = Rc::try_unwrap(old)
            {
                let _ = old.close().await;
            }
        }
        let (file, size) = {
            let sync = replication.sync.borrow();
            let (_, file, size) = sync.serving.as_ref().expect("opened above");
            (file.clone(), *size)
        };
        if offset >= size {
            continue;
        }
        let length = (size - offset).min(SNAPSHOT_CHUNK_BYTES as u64) as usize;
        let chunk = match file.read_at(offset, length).await {
            Ok(chunk) if chunk.len() == length => chunk,
            _ => {
                send_not_retained(shard, journal, to, checkpoint_op);
                continue;
            }
        };
        let mut header = replication.header(Command::SnapshotChunk);
        header.set_field_u64(field::SNAPSHOT_CHECKPOINT_OP, checkpoint_op);
        header.set_field_u64(field::SNAPSHOT_OFFSET, offset);
        header.set_field_u64(field::SNAPSHOT_CHUNK_SNAPSHOT_BYTES, size);
        // The snapshot and checkpoint checksums travel in the file's own header (the
        // first chunk), which the receiver verifies; the header fields stay zero.
        header.checksum_body = percore_engine::message::body_checksum(&chunk);
        replication.outboxes[usize::from(to)].send(header, &chunk, dropped);
        ShardMetrics::add(&shard.metrics.state_sync_bytes_served_total, length as u64);
    }
}

/// Tells `to` that `op_min` is not here (any more): what this journal retains and its
/// latest checkpoint.
pub(crate) fn send_not_retained<S: StateMachine>(
    shard: &Shard<S>,
    journal: &Journal,
    to: u8,
    op_min: u64,
) {
    let replication = shard.replication.as_ref().expect("replicated shard");
    let mut header = replication.header(Command::NotRetained);
    header.set_field_u64(field::NOT_RETAINED_OP_MIN, op_min);
    header.set_field_u64(field::NOT_RETAINED_OP_RETAINED_MIN, journal.op_first());
    header.set_field_u64(field::NOT_RETAINED_OP_CHECKPOINT, journal.checkpoint_op());
    let dropped = &shard.metrics.replication_messages_dropped_total;
    replication.outboxes[usize::from(to)].send(header, &[], dropped);
}

/// Verifies the fetched snapshot file and switches this replica to it (module docs,
/// steps 2 to 5).
async fn install<S>(shard: &Shard<S>, journal: &mut Journal)
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let replication = shard.replication.as_ref().expect("replicated shard");
    if journal.op_staged() != journal.op_durable() {
        // Entries are staged but not committed yet: next turn.
        return;
    }
    let progress = replication
        .sync
        .borrow_mut()
        .progress
        .take()
        .expect("a sync in progress");
    let meta = match verify(shard, journal, &progress) {
        Ok(meta) => meta,
        Err(why) => {
            replication.sync.borrow_mut().progress = Some(progress);
            fail(shard, why);
            return;
        }
    };
    let body = &progress.file[SNAPSHOT_HEADER_BYTES..][..meta.snapshot_bytes as usize];
    let op = meta.op;
    if op <= journal.op_durable() {
        replication.sync.borrow_mut().progress = Some(progress);
        fail(shard, "the journal reached the checkpoint meanwhile");
        return;
    }
    let options = JournalOptions {
        replay_committed_only: replication.settings.view_change,
        records_max: shard.core.borrow().batch_records_max(),
        ..JournalOptions::default()
    };
    switch_to_snapshot(shard, journal, &meta, body, options).await;
    ShardMetrics::add(&shard.metrics.state_syncs_installed_total, 1);
    tracing::info!(
        shard = shard.index,
        peer = progress.from,
        checkpoint_op = op,
        snapshot_bytes = meta.snapshot_bytes,
        "state sync: installed"
    );
    let mut actions = Vec::with_capacity(ACTIONS_MAX);
    replication.replica.borrow_mut().on_state_synced(
        shard.now_us(),
        op,
        meta.checkpoint_checksum,
        &mut actions,
    );
    crate::replication::submit_actions(shard, &actions);
}

/// Replaces the shard's state machine and journal with a verified snapshot file's `meta`
/// and `body` (module docs, steps 3 and 4; BFT state transfer uses it too): restore (the
/// digest must be the file's, else the process stops with the journal untouched), stop the
/// checkpoint follower, write the checkpoint, reopen the journal with `options` and start
/// a follower from it. Panics on I/O errors: the journal's state would be unknown.
pub(crate) async fn switch_to_snapshot<S>(
    shard: &Shard<S>,
    journal: &mut Journal,
    meta: &format::SnapshotMeta,
    body: &[u8],
    options: JournalOptions,
) where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let op = meta.op;
    // Restore first: a snapshot this state machine does not accept, or whose digest
    // differs, stops the process with the journal untouched.
    {
        let mut core = shard.core.borrow_mut();
        let restored = core.resync(op, body, |origin| {
            crate::runtime::abort_local(shard, origin)
        });
        if let Err(error) = restored {
            panic!(
                "shard {}: state sync to op {op}: the snapshot does not restore, stopping: {error}",
                shard.index
            );
        }
        if core.state_machine().digest() != meta.digest {
            panic!(
                "shard {}: state sync to op {op}: the restored state's digest is not the \
                 snapshot's, stopping",
                shard.index
            );
        }
    }
    // Stop the checkpoint follower before its journal changes under it, and the spare
    // preparer before the reopen removes its file: it prepared the old journal's next
    // segment, and a new one is started for the reopened journal below.
    drop(shard.checkpoints.borrow_mut().take());
    let spare_preparer = crate::runtime::spare_preparer_stop(shard).await;
    if let Err(error) = journal.install_synced_checkpoint(meta, body).await {
        panic!(
            "shard {}: state sync to op {op}: installing the checkpoint failed, stopping: {error}",
            shard.index
        );
    }
    let reopened = Journal::open_checkpointed(
        journal.config().clone(),
        options,
        |_, _| Ok(()),
        |entry| {
            panic!(
                "shard {}: op {} after a synced checkpoint",
                shard.index, entry.meta.op
            )
        },
    )
    .await;
    let (reopened, recovered) = match reopened {
        Ok(reopened) => reopened,
        Err(error) => panic!(
            "shard {}: state sync to op {op}: reopening the journal failed, stopping: {error}",
            shard.index
        ),
    };
    assert_eq!(
        recovered.op_last, op,
        "the synced journal ends at its checkpoint"
    );
    let mut reopened = reopened;
    reopened.count_from(journal);
    let old = std::mem::replace(journal, reopened);
    let _ = old.close().await;
    if spare_preparer {
        crate::runtime::spare_preparer_start(shard, journal);
    }
    match crate::runtime::start_checkpoints(
        shard.index,
        &shard.config,
        Some(journal),
        op,
        &shard.metrics,
        shard.make_follower.clone(),
        &shard.followers,
    ) {
        Ok(follower) => *shard.checkpoints.borrow_mut() = follower,
        Err(error) => panic!(
            "shard {}: state sync to op {op}: {error}, stopping",
            shard.index
        ),
    }
}

/// Checks the fetched file: its header belongs to this cluster, shard and checkpoint, and
/// its bytes have the checksum the header records.
fn verify<S: StateMachine>(
    shard: &Shard<S>,
    journal: &Journal,
    progress: &SyncProgress,
) -> Result<format::SnapshotMeta, &'static str> {
    let meta =
        format::decode_snapshot_header(&progress.file).map_err(|_| "the header does not decode")?;
    if meta.op != progress.checkpoint_op
        || meta.shard as usize != shard.index
        || meta.cluster_id != journal.config().cluster_id
    {
        return Err("the snapshot is not the checkpoint asked for");
    }
    let end = (SNAPSHOT_HEADER_BYTES as u64).saturating_add(meta.snapshot_bytes);
    let body = usize::try_from(end)
        .ok()
        .and_then(|end| progress.file.get(SNAPSHOT_HEADER_BYTES..end))
        .ok_or("the snapshot is shorter than its header says")?;
    let checksum: JournalChecksum = format::journal_checksum(body);
    if checksum != meta.snapshot_checksum {
        return Err("the snapshot's checksum does not match");
    }
    Ok(meta)
}
