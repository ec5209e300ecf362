//! BFT mode: transfers between shards (`docs/bft.md` §12 and §14). Drives the engine's
//! sans-IO [`OutputsCollector`] (sending side) and [`InboundProofs`] (receiving side) for
//! one shard's replica of its group.
//!
//! - **Sending**: after every applied op (`produce`), what the state machine emitted for
//!   other shards is grouped by destination ([`outputs_by_destination`]), signed and
//!   broadcast to the group's other replicas (peer command `BftOutputs`, the same
//!   authenticated connections as the group's BFT messages); peers' votes come back through
//!   `frame_received`. At `q` matching signatures the outputs are certified, and this
//!   replica hands the proof to this node's replica of the destination group over the
//!   in-node mesh ([`MeshMessage::Proven`]): every correct replica does, so neither group's
//!   leader can withhold a leg. A full mesh ring drops the proof; `tick` delivers
//!   certified outputs again every [`XSHARD_RESEND_INTERVAL_US`] until they are released.
//! - **Releasing**: outputs go once settled (the state machine says so from replicated
//!   state: a leg once its acknowledgement is applied), certified here or not, and not
//!   before [`XSHARD_SETTLED_KEEP_US`] after they were produced (acknowledgements are
//!   settled at once and are kept that long to be delivered); a collector found full
//!   releases every settled output at once, so legs, bounded by the ledger's in-flight
//!   window, always find room.
//! - **Receiving**: a proof from the mesh is verified and queued (`proven_received`); a
//!   non-empty queue is pending work for the progress timer (a leader that withholds proofs
//!   is suspected); a proof left queued [`XSHARD_FORWARD_AFTER_US`] is sent to the group's
//!   other replicas, so that every replica holds what any holds, and a copy of a proof
//!   applied less than [`XSHARD_RECENTLY_APPLIED_US`] ago is dropped; the ready leader
//!   proposes the oldest proofs as a proven batch (`propose_proven`), reserving the timestamps the batch will be stamped with; backups
//!   vote only for a batch that passes `Groups::verify_batch_bytes` (the core's proposal
//!   check, `SignedOrProven`); every replica checks it again before it journals and applies
//!   it (`stage_proven`, `apply_proven`), and a committed batch leaves the queue.
//!
//! - **Legs below a snapshot**: at every snapshot op, and once at start from a restored
//!   snapshot (or after installing one by state transfer), the legs in flight are signed
//!   from state as in-flight statements (`produce_in_flight`); certified chunks still
//!   unsettled after [`XSHARD_IN_FLIGHT_DELIVER_AFTER_US`] are delivered like outputs.
//!
//! Nothing here applies a record that `q` replicas of its origin group did not sign.

use std::cell::{Cell, RefCell};

use percore_engine::bft;
use percore_engine::bft::xshard::{
    CollectorConfig, CollectorMetrics, Groups, InFlightChunk, InboundMetrics, InboundProofs,
    OutputsCert, OutputsCollector, OutputsKind, OutputsStatement, OutputsVote,
    PROVEN_BATCH_PROOFS_MAX, ProducedOutputs, ProvenBatch, ProvenKey, XShardAction, XShardError,
    XShardMessage, decode_message, encode_message, in_flight_chunks, in_flight_chunks_max,
    is_proven_batch, outputs_by_destination, outputs_digest,
};
use percore_engine::message::{Command, PeerHeader, body_checksum};
use percore_engine::state_machine::StateMachine;

use crate::bft::{BftSettings, Byzantine};
use crate::core::{BatchInvalid, ShardCore};
use crate::mesh::MeshMessage;
use crate::metrics::ShardMetrics;
use crate::runtime::Shard;

/// How often uncertified outputs votes are broadcast again and certified outputs delivered
/// again until released (µs).
pub const XSHARD_RESEND_INTERVAL_US: u64 = 100_000;
/// How long settled outputs are kept after they were produced (µs): acknowledgements are
/// settled when produced and are delivered (again) meanwhile.
pub const XSHARD_SETTLED_KEEP_US: u64 = 4 * XSHARD_RESEND_INTERVAL_US;
/// Verified proofs a replica queues for its group to commit; a full queue drops a proof
/// and its origin delivers it again.
pub const XSHARD_INBOUND_PROOFS_MAX: usize = 4_096;
/// How long a proof stays queued at a replica before the replica sends it to the group's
/// other replicas, and again each time after that while it stays (µs).
pub const XSHARD_FORWARD_AFTER_US: u64 = 2 * XSHARD_RESEND_INTERVAL_US;
/// Outputs the collector keeps beyond the ops that can hold legs in flight: room for
/// acknowledgements, kept [`XSHARD_SETTLED_KEEP_US`] each.
pub const XSHARD_SETTLED_OUTPUTS_KEPT_MAX: usize = 4_096;

/// How long after this replica applied a proof's batch it drops further copies of that
/// proof (µs): late deliveries (this node's replica of the origin certified them after
/// the batch committed) and copies forwarded by replicas that have not applied it yet. Applying such a copy again is harmless
/// (a duplicate the state machine acknowledges again) but costs a proposal each, and a
/// replica that lags forwards what it holds every [`XSHARD_FORWARD_AFTER_US`]. After this
/// time a copy is taken again, which is how a lost acknowledgement gets repaired: the
/// origin delivers an unsettled leg until it is acknowledged.
pub const XSHARD_RECENTLY_APPLIED_US: u64 = 10 * XSHARD_RESEND_INTERVAL_US;
/// Proof keys remembered as recently applied at most (older ones are forgotten first).
pub const XSHARD_RECENTLY_APPLIED_MAX: usize = 65_536;

/// How long after a snapshot op its certified in-flight chunks are first delivered, if any
/// of their legs is still unacknowledged by then (µs). Normally the legs' own outputs
/// settle them within a few resend intervals and the chunks are released undelivered; a
/// chunk delivered anyway costs the destination a batch of duplicates.
pub const XSHARD_IN_FLIGHT_DELIVER_AFTER_US: u64 = 30 * XSHARD_RESEND_INTERVAL_US;

/// Shortest time between two timer turns of the cross-shard state (µs): each walks every
/// kept output and queued proof, and the BFT timer can turn every millisecond under load.
pub const XSHARD_TICK_INTERVAL_US: u64 = 10_000;

const _: () = assert!(XSHARD_SETTLED_KEEP_US >= 2 * XSHARD_RESEND_INTERVAL_US);
const _: () = assert!(XSHARD_IN_FLIGHT_DELIVER_AFTER_US > XSHARD_SETTLED_KEEP_US);
const _: () = assert!(XSHARD_TICK_INTERVAL_US <= XSHARD_RESEND_INTERVAL_US / 4);

/// The cross-shard state of one shard's BFT replica.
pub(crate) struct XShard {
    groups: Groups,
    collector: RefCell<OutputsCollector>,
    inbound: RefCell<InboundProofs>,
    /// Scratch: one op's outputs by destination; the collector's actions; an encoded vote;
    /// a proven batch's records.
    produced: RefCell<Vec<ProducedOutputs>>,
    actions: RefCell<Vec<XShardAction>>,
    encoded: RefCell<Vec<u8>>,
    records: RefCell<Vec<u8>>,
    /// Records one proven batch may hold (the batch cap: one op's outputs to one group are
    /// at most one record per record of the op).
    records_max: usize,
    record_bytes: usize,
    /// The collector's size: ops that can hold legs in flight, plus room for outputs
    /// settled when produced.
    outputs_kept_max: usize,
    collector_seen: Cell<CollectorMetrics>,
    inbound_seen: Cell<InboundMetrics>,
    /// Test only ([`Byzantine::ForgeLeg`]): made-up statements signed so far.
    forged: Cell<u64>,
    /// When [`tick`] next does its work (µs).
    tick_at_us: Cell<u64>,
    /// Proofs this replica applied within [`XSHARD_RECENTLY_APPLIED_US`].
    recently_applied: RefCell<RecentlyApplied>,
    /// Test only ([`Byzantine::ForgeLeg`]): the last view it made up a leg from nothing in.
    forged_view: Cell<Option<u64>>,
}

/// The `(origin, op, kind)` keys of proofs applied recently, with when; bounded, oldest forgotten
/// first.
#[derive(Debug, Default)]
struct RecentlyApplied {
    order: std::collections::VecDeque<(ProvenKey, u64)>,
    applied_at_us: std::collections::HashMap<ProvenKey, u64>,
}

impl RecentlyApplied {
    fn note(&mut self, key: ProvenKey, now_us: u64) {
        if self.order.len() == XSHARD_RECENTLY_APPLIED_MAX {
            self.pop_oldest();
        }
        self.order.push_back((key, now_us));
        self.applied_at_us.insert(key, now_us);
    }

    /// Whether `key` was applied within [`XSHARD_RECENTLY_APPLIED_US`] of `now_us`;
    /// forgets what is older.
    fn contains(&mut self, key: ProvenKey, now_us: u64) -> bool {
        while self
            .order
            .front()
            .is_some_and(|(_, at)| at.saturating_add(XSHARD_RECENTLY_APPLIED_US) <= now_us)
        {
            self.pop_oldest();
        }
        self.applied_at_us.contains_key(&key)
    }

    fn pop_oldest(&mut self) {
        if let Some((key, at)) = self.order.pop_front()
            && self.applied_at_us.get(&key) == Some(&at)
        {
            self.applied_at_us.remove(&key);
        }
    }
}

impl XShard {
    /// The cross-shard state of replica `settings.replica` of group `group` among `shards`
    /// groups, for batches of at most `records_max` records of `record_bytes` bytes.
    pub(crate) fn new(
        settings: &BftSettings,
        (group, shards): (u32, u32),
        (record_bytes, records_max): (usize, usize),
    ) -> Result<XShard, XShardError> {
        let groups = Groups::new(shards, settings.faults_max, &settings.public_keys)?;
        let outputs_kept_max = settings.outputs_legs_max + XSHARD_SETTLED_OUTPUTS_KEPT_MAX;
        let config = CollectorConfig {
            group,
            replica: settings.replica,
            outputs_kept_max,
            in_flight_chunks_max: in_flight_chunks_max(
                settings.outputs_legs_max.max(1),
                (record_bytes, records_max),
                (shards as usize).saturating_sub(1).max(1),
            ),
            resend_interval_us: XSHARD_RESEND_INTERVAL_US,
            in_flight_deliver_after_us: XSHARD_IN_FLIGHT_DELIVER_AFTER_US,
        };
        let collector = OutputsCollector::new(config, groups.clone(), settings.secret_key.clone())?;
        let inbound = InboundProofs::new(
            group,
            (record_bytes, records_max),
            groups.clone(),
            XSHARD_INBOUND_PROOFS_MAX,
        )?;
        Ok(XShard {
            groups,
            collector: RefCell::new(collector),
            inbound: RefCell::new(inbound),
            produced: RefCell::new(Vec::with_capacity(shards as usize)),
            actions: RefCell::new(Vec::with_capacity(2 * bft::REPLICA_COUNT_MAX)),
            encoded: RefCell::new(Vec::with_capacity(
                percore_engine::bft::xshard::OUTPUTS_VOTE_BYTES + 1,
            )),
            records: RefCell::new(Vec::with_capacity(records_max * record_bytes)),
            records_max,
            record_bytes,
            outputs_kept_max,
            collector_seen: Cell::new(CollectorMetrics::default()),
            inbound_seen: Cell::new(InboundMetrics::default()),
            forged: Cell::new(0),
            tick_at_us: Cell::new(0),
            recently_applied: RefCell::new(RecentlyApplied::default()),
            forged_view: Cell::new(None),
        })
    }

    /// The groups' committees (the proposal check verifies proven batches with them).
    pub(crate) fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Records one proven batch may hold.
    pub(crate) fn records_max(&self) -> usize {
        self.records_max
    }

    /// Bytes of the largest proven batch [`propose_proven`] can build for a group of
    /// `replicas`: [`PROVEN_BATCH_PROOFS_MAX`] proofs, each with a statement, a certificate
    /// of at most `replicas` signatures and its length fields, and `records_max` records.
    pub(crate) fn proven_batch_bytes_max(&self, replicas: usize) -> usize {
        // statement (kind and chunk included), signatures, operation, length
        let proof_overhead = 4 + 4 + 8 + 1 + 4 + 32 + 1 + replicas * (1 + 64) + 2 + 4;
        2 + 2
            + 2
            + 8
            + PROVEN_BATCH_PROOFS_MAX * proof_overhead
            + self.records_max * self.record_bytes
    }

    /// Whether verified proofs wait for this group to commit them (pending work: the
    /// progress timer runs).
    pub(crate) fn pending(&self) -> bool {
        !self.inbound.borrow().is_empty()
    }

    /// When the collector has something to resend (not before the next timer turn).
    pub(crate) fn poll_timeout(&self) -> Option<u64> {
        let due = self.collector.borrow().poll_timeout()?;
        Some(due.max(self.tick_at_us.get()))
    }

    /// The records of `batch`'s proofs, in order, into the records scratch.
    fn gather(&self, batch: &ProvenBatch) -> std::cell::RefMut<'_, Vec<u8>> {
        let mut records = self.records.borrow_mut();
        records.clear();
        for proof in &batch.proofs {
            records.extend_from_slice(&proof.records);
        }
        records
    }
}

/// Whether `records` (whole records of `operation`, as the state machine emitted them) need
/// no further delivery ([`StateMachine::outputs_settled`]). The bytes are copied out, as
/// they need not be aligned for `S::Record`.
fn settled<S: StateMachine>(
    machine: &S,
    typed: &mut Vec<S::Record>,
    operation: u16,
    records: &[u8],
) -> bool {
    let Ok(operation) = S::Operation::try_from(operation) else {
        return true;
    };
    typed.clear();
    typed.extend(
        records
            .chunks_exact(size_of::<S::Record>())
            .map(bytemuck::pod_read_unaligned::<S::Record>),
    );
    machine.outputs_settled(operation, typed)
}

/// Releases settled outputs produced at least `min_age_us` ago; counts them.
fn release_settled<S: StateMachine>(shard: &Shard<S>, core: &ShardCore<S>, min_age_us: u64) {
    let xshard = &shard.bft.as_ref().expect("BFT shard").xshard;
    let mut typed = Vec::new();
    let released = xshard.collector.borrow_mut().release_settled(
        shard.now_us(),
        min_age_us,
        |operation, records| settled(core.state_machine(), &mut typed, operation, records),
    );
    ShardMetrics::add(
        &shard.metrics.bft_xshard_outputs_released_total,
        released as u64,
    );
}

/// Op `op` (a journal op: identical at every correct replica) was just applied by `core`:
/// signs and broadcasts this replica's statement for each destination it sent records to.
/// Drains the state machine's outbound messages.
pub(crate) fn produce<S: StateMachine>(shard: &Shard<S>, core: &mut ShardCore<S>, op: u64)
where
    S::Record: Send,
    S::Result: Send,
{
    let xshard = &shard.bft.as_ref().expect("BFT shard").xshard;
    let mut produced = xshard.produced.borrow_mut();
    let grouped =
        outputs_by_destination(std::iter::from_fn(|| core.poll_outbound()), &mut produced);
    if let Err(error) = grouped {
        // Two operations for one destination, or more than a proof holds: the state
        // machine broke its contract. Every correct replica drops the same outputs.
        while core.poll_outbound().is_some() {}
        tracing::error!(shard = shard.index, op, %error, "BFT outputs not signed");
        return;
    }
    if produced.is_empty() {
        return;
    }
    let now_us = shard.now_us();
    let mut actions = xshard.actions.borrow_mut();
    actions.clear();
    for outputs in produced.drain(..) {
        let ProducedOutputs {
            destination,
            operation,
            records,
        } = outputs;
        if xshard.collector.borrow().outputs_kept() >= xshard.outputs_kept_max {
            // Every settled output goes, whatever its age: what stays are ops with legs in
            // flight, which the ledger's window bounds below the collector's size.
            release_settled(shard, core, 0);
        }
        let outcome = xshard.collector.borrow_mut().on_produced(
            now_us,
            op,
            destination,
            operation,
            records,
            &mut actions,
        );
        match outcome {
            Ok(()) | Err(XShardError::Stale) => {}
            Err(error) => {
                tracing::warn!(shard = shard.index, op, destination, %error, "BFT outputs not signed");
            }
        }
    }
    drop(produced);
    run(shard, &mut actions);
}

/// A peer's `BftOutputs` frame: its outputs vote, to the collector, or a proof it left
/// queued too long and forwards, to the inbound queue (verified there: the certificate,
/// not the sender, vouches for it).
pub(crate) fn frame_received<S: StateMachine>(shard: &Shard<S>, from: u8, body: &[u8])
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let vote = match decode_message(body) {
        Ok(XShardMessage::Vote(vote)) => vote,
        Ok(XShardMessage::Proven(proof)) => {
            ShardMetrics::add(&shard.metrics.bft_xshard_proofs_forwarded_in_total, 1);
            proven_received(shard, proof);
            return;
        }
        Err(error) => {
            ShardMetrics::add(&shard.metrics.bft_messages_refused_total, 1);
            tracing::debug!(shard = shard.index, peer = from, %error, "BFT outputs frame refused");
            return;
        }
    };
    let mut actions = bft.xshard.actions.borrow_mut();
    actions.clear();
    let outcome = bft
        .xshard
        .collector
        .borrow_mut()
        .on_vote(vote, &mut actions);
    if let Err(error) = outcome
        && !matches!(error, XShardError::Stale | XShardError::NotProduced { .. })
    {
        tracing::warn!(
            shard = shard.index,
            peer = from,
            signer = vote.replica,
            op = vote.statement.op,
            %error,
            "BFT outputs vote refused"
        );
    }
    run(shard, &mut actions);
}

/// Certified outputs for this replica's group, from this node's replica of their origin
/// group: verified and queued until the group commits them.
pub(crate) fn proven_received<S: StateMachine>(
    shard: &Shard<S>,
    proof: percore_engine::bft::xshard::ProvenOutputs,
) where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let key = proof.key();
    let applied = bft
        .xshard
        .recently_applied
        .borrow_mut()
        .contains(key, shard.now_us());
    if applied {
        ShardMetrics::add(&shard.metrics.bft_xshard_proofs_recently_applied_total, 1);
        return;
    }
    match bft.xshard.inbound.borrow_mut().on_proven(proof) {
        Ok(()) => shard.batcher.notify(),
        Err(XShardError::Stale | XShardError::Full(_)) => {}
        Err(error) => tracing::warn!(
            shard = shard.index,
            origin = key.0,
            op = key.1,
            %error,
            "BFT proof refused"
        ),
    }
}

/// The timer's turn: resends what is due, releases settled outputs, and sends the group's
/// other replicas the proofs left queued here ([`InboundProofs::forward_due`]): a proof only
/// some replicas hold (a late delivery after its batch committed, or certified on some
/// nodes only) then becomes pending work at all of them, so a leader that does not propose
/// it is suspected by enough replicas to change views.
pub(crate) fn tick<S: StateMachine>(shard: &Shard<S>)
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let now_us = shard.now_us();
    if now_us < bft.xshard.tick_at_us.get() {
        return;
    }
    bft.xshard
        .tick_at_us
        .set(now_us.saturating_add(XSHARD_TICK_INTERVAL_US));
    release_settled(shard, &shard.core.borrow(), XSHARD_SETTLED_KEEP_US);
    // A replica that is changing views or fetching state is behind: what it holds, its
    // peers have most likely applied.
    let current = {
        let replica = bft.replica.borrow();
        replica.status() == bft::Status::Normal && replica.state_transfer().is_none()
    };
    if current && bft.settings.byzantine != Some(Byzantine::Silent) {
        let mut due = Vec::new();
        bft.xshard
            .inbound
            .borrow_mut()
            .forward_due(now_us, XSHARD_FORWARD_AFTER_US, &mut due);
        let me = bft.settings.replica;
        for proof in due {
            let message = XShardMessage::Proven(proof);
            for peer in (0..bft.settings.replica_count()).filter(|peer| *peer != me) {
                send_frame(shard, peer, &message);
            }
            ShardMetrics::add(&shard.metrics.bft_xshard_proofs_forwarded_total, 1);
        }
    }
    let mut actions = bft.xshard.actions.borrow_mut();
    actions.clear();
    bft.xshard
        .collector
        .borrow_mut()
        .on_tick(now_us, &mut actions);
    run(shard, &mut actions);
}

/// Executes (and drains) the collector's actions: votes to the group's peers, proofs to
/// this node's replica of their destination group.
fn run<S: StateMachine>(shard: &Shard<S>, actions: &mut Vec<XShardAction>)
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    if bft.settings.byzantine == Some(Byzantine::Silent) {
        actions.clear();
        return;
    }
    let me = bft.settings.replica;
    let mut delivered = false;
    for action in actions.drain(..) {
        match action {
            XShardAction::Broadcast(vote) => {
                for peer in (0..bft.settings.replica_count()).filter(|peer| *peer != me) {
                    send_frame(shard, peer, &XShardMessage::Vote(vote));
                }
            }
            XShardAction::Send { to, vote } => send_frame(shard, to, &XShardMessage::Vote(vote)),
            XShardAction::Deliver(proof) => {
                let to = proof.cert.statement.destination as usize;
                debug_assert!(to != shard.index && to < shard.shards, "checked route");
                let sent = shard
                    .mesh
                    .borrow_mut()
                    .send(to, MeshMessage::Proven(Box::new(proof)));
                if sent.is_err() {
                    // The ring is full: the next resend delivers it again.
                    ShardMetrics::add(&shard.metrics.bft_xshard_deliveries_dropped_total, 1);
                }
                delivered = true;
            }
        }
    }
    if delivered {
        shard.mesh.borrow_mut().ring_doorbells();
    }
}

/// Sends one outputs vote or forwarded proof to peer `to` of this group (`BftOutputs`).
fn send_frame<S: StateMachine>(shard: &Shard<S>, to: u8, message: &XShardMessage)
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut encoded = bft.xshard.encoded.borrow_mut();
    encoded.clear();
    encode_message(message, &mut encoded);
    let mut header = PeerHeader::new(
        Command::BftOutputs,
        shard.index as u32,
        bft.view(),
        bft.settings.replica,
        0,
    );
    header.checksum_body = body_checksum(&encoded);
    bft.outboxes[usize::from(to)].send(
        header,
        &encoded,
        &shard.metrics.replication_messages_dropped_total,
    );
}

/// Leader: proposes the oldest verified proofs not yet proposed in this view as one proven
/// batch, with the timestamps reserved for its records. Returns whether it proposed.
pub(crate) fn propose_proven<S: StateMachine>(shard: &Shard<S>) -> bool
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    if !bft.is_ready_leader() {
        return false;
    }
    let xshard = &bft.xshard;
    let now_us = shard.now_us();
    let now_ns = shard.core.borrow().timestamp_ns(now_us);
    let taken = xshard
        .inbound
        .borrow_mut()
        .take_batch(bft.view(), now_ns, xshard.records_max);
    let forging = bft.settings.byzantine == Some(Byzantine::ForgeLeg);
    let Some(mut batch) = taken.or_else(|| {
        forging
            .then(|| made_up_batch::<S>(bft, shard.index as u32, shard.shards as u32, now_us))
            .flatten()
    }) else {
        return false;
    };
    {
        let records = xshard.gather(&batch);
        batch.now_ns =
            shard
                .core
                .borrow_mut()
                .reserve_internal(batch.operation, batch.now_ns, &records);
    }
    if forging {
        forge_leg(bft, shard.index as u32, &mut batch);
    }
    let mut bytes = Vec::new();
    percore_engine::bft::xshard::encode_batch(&batch, &mut bytes);
    let mut actions = bft.actions.borrow_mut();
    actions.clear();
    let outcome = bft
        .replica
        .borrow_mut()
        .propose(now_us, bytes, &mut actions);
    match outcome {
        Ok(op) => {
            ShardMetrics::add(&shard.metrics.bft_proposals_total, 1);
            ShardMetrics::add(&shard.metrics.bft_xshard_batches_proposed_total, 1);
            tracing::debug!(
                shard = shard.index,
                op,
                proofs = batch.proofs.len(),
                "BFT proposed a proven batch"
            );
        }
        Err(error) => tracing::warn!(shard = shard.index, %error, "BFT proven batch refused"),
    }
    crate::bft::run_actions(shard, &mut actions);
    true
}

/// Test only ([`Byzantine::ForgeLeg`]), a leader holding no proof: once per view, a proven
/// batch of one made-up leg (a zeroed record) claimed from the next group, whose
/// certificate [`forge_leg`] then makes up.
fn made_up_batch<S: StateMachine>(
    bft: &crate::bft::Bft,
    group: u32,
    groups: u32,
    now_us: u64,
) -> Option<ProvenBatch> {
    let view = bft.view();
    if groups < 2 || bft.xshard.forged_view.get() == Some(view) {
        return None;
    }
    bft.xshard.forged_view.set(Some(view));
    // The state machine's first internal operation (one clients may not submit).
    let operation = (0..=u16::MAX).find(|code| {
        S::Operation::try_from(*code).is_ok() && S::client_operation(*code).is_none()
    })?;
    let statement = OutputsStatement {
        origin: (group + 1) % groups,
        destination: group,
        op: u64::MAX - bft.xshard.forged.get(),
        kind: OutputsKind::Op,
        digest: [0; 32],
    };
    let quorum = bft.replica.borrow().committee().quorum();
    Some(ProvenBatch {
        operation,
        now_ns: now_us.saturating_mul(1_000),
        proofs: vec![percore_engine::bft::xshard::ProvenOutputs {
            // Signed by `forge_leg`.
            cert: OutputsCert {
                statement,
                signatures: vec![(0, bft::Signature::from_bytes(&[0; 64])); quorum],
            },
            operation,
            records: vec![0; bft.xshard.record_bytes],
        }],
    })
}

/// Test only ([`Byzantine::ForgeLeg`]): the first proof's records altered (a byte of its
/// first record flipped: a leg no origin produced) and re-certified with this replica's
/// own key under the first `q` replica indices.
fn forge_leg(bft: &crate::bft::Bft, group: u32, batch: &mut ProvenBatch) {
    let forged = bft.xshard.forged.get() + 1;
    bft.xshard.forged.set(forged);
    let proof = &mut batch.proofs[0];
    let last = proof.records.len().min(bft.xshard.record_bytes) - 1;
    proof.records[last.min(40)] ^= 0x01;
    let statement = OutputsStatement {
        digest: outputs_digest(
            proof.cert.statement.origin,
            group,
            proof.cert.statement.op,
            proof.operation,
            &proof.records,
        ),
        kind: OutputsKind::Op,
        ..proof.cert.statement
    };
    let key = &bft.settings.secret_key;
    proof.cert = OutputsCert {
        statement,
        signatures: (0..proof.cert.signatures.len() as u8)
            .map(|replica| {
                (
                    replica,
                    OutputsVote::sign(key, replica, statement).signature,
                )
            })
            .collect(),
    };
}

/// The check of a committed proven batch before it is journaled (every replica, every
/// time: certificates are not trusted because a backup checked them): the bytes pass
/// `Groups::verify_batch_bytes` for this group, and the records are an internal operation
/// of this shard's ([`ShardCore::check_internal`], which stamps them from the batch's
/// `now_ns`). Returns the batch and its record count; the stamped records are left in the
/// core's scratch ([`ShardCore::checked_records`]).
pub(crate) fn stage_proven<S: StateMachine>(
    shard: &Shard<S>,
    bytes: &[u8],
) -> Result<(ProvenBatch, usize), String> {
    let bft = shard.bft.as_ref().expect("BFT shard");
    let xshard = &bft.xshard;
    let batch = xshard
        .groups
        .verify_batch_bytes(
            bytes,
            shard.index as u32,
            xshard.record_bytes,
            xshard.records_max,
        )
        .map_err(|error| error.to_string())?;
    let records = xshard.gather(&batch);
    let entries = shard
        .core
        .borrow_mut()
        .check_internal(batch.operation, batch.now_ns, &records)
        .map_err(|error: BatchInvalid| error.to_string())?;
    drop(records);
    Ok((batch, entries))
}

/// Applies a committed proven batch staged as journal op `journal_op` (checked by
/// [`stage_proven`] in this turn, with every earlier op applied, so the stamp is the one
/// journaled), takes its proofs out of the inbound queue and produces its outputs.
pub(crate) fn apply_proven<S: StateMachine>(shard: &Shard<S>, journal_op: u64, batch: &ProvenBatch)
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    let xshard = &bft.xshard;
    let records = xshard.gather(batch);
    let mut core = shard.core.borrow_mut();
    core.apply_internal(journal_op, batch.operation, batch.now_ns, &records)
        .expect("checked before journaling");
    drop(records);
    xshard.inbound.borrow_mut().on_committed(batch);
    let now_us = shard.now_us();
    let mut recently_applied = xshard.recently_applied.borrow_mut();
    for proof in &batch.proofs {
        recently_applied.note(proof.key(), now_us);
    }
    drop(recently_applied);
    produce(shard, &mut core, journal_op);
}

/// Whether committed batch bytes are a proven batch (not a client batch).
pub(crate) fn is_proven(bytes: &[u8]) -> bool {
    is_proven_batch(bytes)
}

/// The outputs of ops replayed from the journal at start that are not settled yet
/// (`docs/bft.md` §12, restart): signed again once the BFT state exists
/// ([`reproduce`]), so legs in flight before the restart get certified again. An op's
/// outputs to one destination are kept whole or not at all (a statement covers all of
/// them). Settled ones are pruned as the replay goes, so at most about twice the ops that
/// can hold legs in flight are kept.
///
/// A journal that opens from a snapshot has no ops below it to replay; what those ops
/// emitted and is still in flight is in the restored state, so the in-flight chunks of the
/// snapshot's op are taken right after the restore, before the replay changes the state
/// ([`ReplayedOutputs::restored`]): the same chunks the group's replicas signed when they
/// applied that op.
#[derive(Debug)]
pub(crate) struct ReplayedOutputs {
    outputs: std::collections::VecDeque<(u64, ProducedOutputs)>,
    /// The restored snapshot's journal op and the legs in flight there, cut into chunks.
    in_flight: Option<(u64, Vec<InFlightChunk>)>,
    /// The batch cap: in-flight chunks hold at most this many records ([`in_flight_chunks`]).
    records_max: usize,
    /// Prune when this many are kept (twice the ops with legs in flight; at least one).
    prune_at: usize,
    /// Replayed ops whose outputs could not be grouped (logged).
    ungrouped: u64,
}

impl ReplayedOutputs {
    /// For a state machine with at most `outputs_legs_max` ops holding unsettled outputs,
    /// in batches of at most `records_max` records (the batch cap).
    pub(crate) fn new(outputs_legs_max: usize, records_max: usize) -> Self {
        assert!(records_max > 0);
        Self {
            outputs: std::collections::VecDeque::new(),
            in_flight: None,
            records_max,
            prune_at: 2 * outputs_legs_max.max(1),
            ungrouped: 0,
        }
    }

    /// The journal restored `machine` from the snapshot of journal op `op`: keeps the
    /// in-flight chunks of that op, replacing those of a snapshot restored before (the
    /// journal falls back to its previous checkpoint if the newest does not restore).
    pub(crate) fn restored<S: StateMachine>(&mut self, machine: &S, op: u64) {
        let mut chunks = Vec::new();
        match in_flight_chunks(legs_in_flight(machine), self.records_max, &mut chunks) {
            Ok(()) => self.in_flight = Some((op, chunks)),
            Err(_) => {
                self.in_flight = None;
                self.ungrouped += 1;
            }
        }
    }

    /// Journal op `op` was replayed into `machine` and emitted `outbound`.
    pub(crate) fn push<S: StateMachine>(
        &mut self,
        machine: &S,
        op: u64,
        outbound: &mut Vec<percore_engine::state_machine::Outbound<S::Operation, S::Record>>,
    ) {
        if outbound.is_empty() {
            return;
        }
        let mut produced = Vec::new();
        if outputs_by_destination(outbound.drain(..), &mut produced).is_err() {
            self.ungrouped += 1;
            return;
        }
        self.outputs
            .extend(produced.into_iter().map(|outputs| (op, outputs)));
        if self.outputs.len() >= self.prune_at {
            self.prune(machine);
        }
    }

    /// Drops the outputs `machine` says are settled.
    pub(crate) fn prune<S: StateMachine>(&mut self, machine: &S) {
        let mut typed = Vec::new();
        self.outputs.retain(|(_, outputs)| {
            !settled(machine, &mut typed, outputs.operation, &outputs.records)
        });
        self.prune_at = self.prune_at.max(2 * self.outputs.len());
    }

    /// Outputs kept (after the last prune).
    pub(crate) fn len(&self) -> usize {
        self.outputs.len()
    }
}

/// Signs again the unsettled outputs of the ops replayed at start (`replayed`, pruned
/// against the replayed state): the same statements as before the restart, since they
/// bind the journal op and the records, which the journal kept.
pub(crate) fn reproduce<S: StateMachine>(shard: &Shard<S>, mut replayed: ReplayedOutputs)
where
    S::Record: Send,
    S::Result: Send,
{
    let bft = shard.bft.as_ref().expect("BFT shard");
    replayed.prune(shard.core.borrow().state_machine());
    if replayed.ungrouped > 0 {
        tracing::error!(
            shard = shard.index,
            ops = replayed.ungrouped,
            "replayed ops whose outputs could not be grouped: not signed again"
        );
    }
    if let Some((checkpoint_op, chunks)) = replayed.in_flight.take()
        && !chunks.is_empty()
    {
        tracing::info!(
            shard = shard.index,
            checkpoint_op,
            chunks = chunks.len(),
            "BFT restart: signing the legs in flight at the restored snapshot"
        );
        sign_in_flight(shard, checkpoint_op, chunks, "restored snapshot");
    }
    if replayed.len() == 0 {
        return;
    }
    tracing::info!(
        shard = shard.index,
        outputs = replayed.len(),
        "BFT restart: signing the unsettled outputs of replayed ops again"
    );
    let now_us = shard.now_us();
    let mut actions = bft.xshard.actions.borrow_mut();
    actions.clear();
    for (op, outputs) in replayed.outputs.drain(..) {
        let outcome = bft.xshard.collector.borrow_mut().on_produced(
            now_us,
            op,
            outputs.destination,
            outputs.operation,
            outputs.records,
            &mut actions,
        );
        match outcome {
            Ok(()) => ShardMetrics::add(&shard.metrics.bft_xshard_outputs_resigned_total, 1),
            Err(error) => {
                tracing::warn!(shard = shard.index, op, %error, "replayed outputs not signed");
            }
        }
    }
    run(shard, &mut actions);
}

/// Publishes the collector's and the inbound queue's counters (deltas since the last turn)
/// and their sizes.
/// Every leg `machine` has in flight, as its `unconfirmed_outbound` lists them (oldest
/// first): the replicated in-flight set an in-flight statement covers.
fn legs_in_flight<S: StateMachine>(
    machine: &S,
) -> Vec<percore_engine::state_machine::Outbound<S::Operation, S::Record>> {
    let mut legs = Vec::new();
    machine.unconfirmed_outbound(&mut |leg| legs.push(leg));
    legs
}

/// This replica's state is the state right after snapshot op `checkpoint_op` (it just
/// applied that op, or installed a snapshot taken there): signs the in-flight statements of
/// the legs in flight now (`docs/bft.md` §12, step 10). Every correct replica of the group
/// signs the same ones at that op, so legs that ops below a snapshot emitted can be
/// certified again by replicas that no longer have those ops.
pub(crate) fn produce_in_flight<S: StateMachine>(
    shard: &Shard<S>,
    core: &ShardCore<S>,
    checkpoint_op: u64,
) where
    S::Record: Send,
    S::Result: Send,
{
    let mut chunks = Vec::new();
    let records_max = shard.bft.as_ref().expect("BFT shard").xshard.records_max;
    if let Err(error) = in_flight_chunks(
        legs_in_flight(core.state_machine()),
        records_max,
        &mut chunks,
    ) {
        tracing::error!(shard = shard.index, checkpoint_op, %error, "BFT in-flight legs not signed");
        return;
    }
    sign_in_flight(shard, checkpoint_op, chunks, "snapshot op");
}

fn sign_in_flight<S: StateMachine>(
    shard: &Shard<S>,
    checkpoint_op: u64,
    chunks: Vec<InFlightChunk>,
    at: &'static str,
) where
    S::Record: Send,
    S::Result: Send,
{
    if chunks.is_empty() {
        return;
    }
    let bft = shard.bft.as_ref().expect("BFT shard");
    let mut actions = bft.xshard.actions.borrow_mut();
    actions.clear();
    let count = chunks.len();
    let outcome = bft.xshard.collector.borrow_mut().on_in_flight(
        shard.now_us(),
        checkpoint_op,
        chunks,
        &mut actions,
    );
    match outcome {
        Ok(signed) => tracing::debug!(
            shard = shard.index,
            checkpoint_op,
            chunks = count,
            signed,
            at,
            "BFT in-flight legs signed"
        ),
        Err(XShardError::Stale) => {}
        Err(error) => tracing::warn!(
            shard = shard.index,
            checkpoint_op,
            chunks = count,
            at,
            %error,
            "BFT in-flight legs not signed"
        ),
    }
    run(shard, &mut actions);
}

pub(crate) fn publish<S: StateMachine>(shard: &Shard<S>) {
    let xshard = &shard.bft.as_ref().expect("BFT shard").xshard;
    let metrics = &shard.metrics;
    let collector = xshard.collector.borrow();
    let inbound = xshard.inbound.borrow();
    ShardMetrics::set(
        &metrics.bft_xshard_outputs_kept,
        collector.outputs_kept() as u64,
    );
    ShardMetrics::set(
        &metrics.bft_xshard_in_flight_kept,
        collector.in_flight_kept() as u64,
    );
    ShardMetrics::set(&metrics.bft_xshard_inbound_queued, inbound.len() as u64);
    let (now, seen) = (
        collector.metrics(),
        xshard.collector_seen.replace(collector.metrics()),
    );
    let (inbound_now, inbound_seen) = (
        inbound.metrics(),
        xshard.inbound_seen.replace(inbound.metrics()),
    );
    let counters = [
        (
            &metrics.bft_xshard_votes_signed_total,
            now.votes_signed,
            seen.votes_signed,
        ),
        (
            &metrics.bft_xshard_votes_accepted_total,
            now.votes_accepted,
            seen.votes_accepted,
        ),
        (
            &metrics.bft_xshard_votes_refused_total,
            now.votes_refused,
            seen.votes_refused,
        ),
        (
            &metrics.bft_xshard_votes_early_total,
            now.votes_early,
            seen.votes_early,
        ),
        (
            &metrics.bft_xshard_certified_total,
            now.certified,
            seen.certified,
        ),
        (
            &metrics.bft_xshard_deliveries_total,
            now.deliveries,
            seen.deliveries,
        ),
        (
            &metrics.bft_xshard_collector_full_total,
            now.full,
            seen.full,
        ),
        (
            &metrics.bft_xshard_proofs_accepted_total,
            inbound_now.accepted,
            inbound_seen.accepted,
        ),
        (
            &metrics.bft_xshard_proofs_refused_total,
            inbound_now.refused,
            inbound_seen.refused,
        ),
        (
            &metrics.bft_xshard_proofs_duplicate_total,
            inbound_now.duplicates,
            inbound_seen.duplicates,
        ),
        (
            &metrics.bft_xshard_proofs_full_total,
            inbound_now.full,
            inbound_seen.full,
        ),
        (
            &metrics.bft_xshard_proofs_committed_total,
            inbound_now.committed,
            inbound_seen.committed,
        ),
        (
            &metrics.bft_xshard_in_flight_signed_total,
            now.in_flight_signed,
            seen.in_flight_signed,
        ),
        (
            &metrics.bft_xshard_in_flight_certified_total,
            now.in_flight_certified,
            seen.in_flight_certified,
        ),
        (
            &metrics.bft_xshard_in_flight_deliveries_total,
            now.in_flight_deliveries,
            seen.in_flight_deliveries,
        ),
    ];
    for (counter, now, seen) in counters {
        ShardMetrics::add(counter, now.saturating_sub(seen));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use percore_engine::ledger::{Ledger, LedgerConfig, LedgerOperation};
    use percore_engine::record::{RecordResult, RecordSlot, account_flags};

    use crate::loadgen::{account, accounts_of_shard, transfer};

    fn ledger(shard: u32) -> Ledger {
        Ledger::new(LedgerConfig {
            accounts_max: 64,
            transfers_max: 1_024,
            credit_legs_in_flight_max: 16,
            batch_entries_max: 8,
            ..LedgerConfig::new(shard, 2)
        })
    }

    fn apply(machine: &mut Ledger, op: u64, operation: LedgerOperation, records: &[RecordSlot]) {
        let mut results = vec![bytemuck::Zeroable::zeroed(); records.len()];
        let results: &mut [RecordResult] = &mut results;
        machine.apply(op, operation, records, results);
    }

    /// Replayed ops' outputs are kept grouped per op and destination while a leg is in
    /// flight and pruned once the state says they are settled; acknowledgements are settled
    /// at once.
    #[test]
    fn replayed_outputs_keep_what_is_in_flight_and_prune_what_settled() {
        let (mut origin, mut credit) = (ledger(0), ledger(1));
        let home = accounts_of_shard(0, 2, 1)[0];
        let away = accounts_of_shard(1, 2, 1)[0];
        let mut debit = account(home, account_flags::ALLOW_NEGATIVE);
        debit.timestamp = 1;
        apply(
            &mut origin,
            1,
            LedgerOperation::CreateAccounts,
            &[RecordSlot::from_account(&debit)],
        );
        let mut credited = account(away, 0);
        credited.timestamp = 1;
        apply(
            &mut credit,
            1,
            LedgerOperation::CreateAccounts,
            &[RecordSlot::from_account(&credited)],
        );
        let mut across = transfer(7, home, away, 5);
        across.timestamp = 2;
        apply(
            &mut origin,
            2,
            LedgerOperation::CreateTransfers,
            &[RecordSlot::from_transfer(&across)],
        );
        let mut replayed = ReplayedOutputs::new(16, 64);
        let mut outbound: Vec<_> = std::iter::from_fn(|| origin.poll_outbound()).collect();
        assert_eq!(outbound.len(), 1, "one credit leg");
        let leg = outbound[0].record;
        replayed.push(&origin, 2, &mut outbound);
        assert!(outbound.is_empty(), "drained");
        assert_eq!(replayed.len(), 1);
        replayed.prune(&origin);
        assert_eq!(replayed.len(), 1, "the leg is in flight");
        let (op, outputs) = &replayed.outputs[0];
        assert_eq!((*op, outputs.destination), (2, 1));
        assert_eq!(
            outputs.operation,
            u16::from(LedgerOperation::ApplyCreditLegs)
        );
        assert_eq!(outputs.records, bytemuck::bytes_of(&leg));
        // The credit shard applies the leg and acknowledges it: the acknowledgement is
        // settled when produced, and is not kept.
        let mut stamped = leg;
        credit.stamp_internal(
            LedgerOperation::ApplyCreditLegs,
            3,
            std::slice::from_mut(&mut stamped),
        );
        apply(&mut credit, 2, LedgerOperation::ApplyCreditLegs, &[stamped]);
        let mut acks: Vec<_> = std::iter::from_fn(|| credit.poll_outbound()).collect();
        let ack = acks[0].record;
        let mut credit_replayed = ReplayedOutputs::new(16, 64);
        credit_replayed.push(&credit, 2, &mut acks);
        credit_replayed.prune(&credit);
        assert_eq!(credit_replayed.len(), 0, "acknowledgements are settled");
        // Once the origin applies the acknowledgement, the leg is settled and pruned.
        apply(&mut origin, 3, LedgerOperation::AckCreditLegs, &[ack]);
        replayed.prune(&origin);
        assert_eq!(replayed.len(), 0);
        assert_eq!(origin.in_flight(), 0);
    }
}
