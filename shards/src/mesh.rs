//! The inter-shard mesh: a full N×N set of engine SPSC rings, one per ordered pair of shards.
//!
//! Shards never share memory but these rings. Messages carry records by value (128 bytes,
//! Seastar-style `submit_to`): a record crossing cores is copied once into the ring and once
//! out, which is cheaper than sharing a pool across cores and keeps every pool core-local.
//!
//! A parked executor sleeps in io_uring and cannot see a ring it is not polling, so each
//! ring has a doorbell: a glommio shared channel of capacity one. A sender pushes messages,
//! then rings the doorbell once per turn (a full doorbell means one is already pending). The
//! receiver drains its ring completely after each doorbell, so no message is left unseen.
//!
//! A message that finds its ring full is queued locally and retried every batcher turn. The
//! queue is bounded by what can be in flight (credit legs by the ledger's in-flight limit,
//! acknowledgements by legs received, results by records forwarded); a receiver that has no
//! room takes nothing from its ring, which pushes back on the sender. Mesh traffic has a
//! reserved quarter of each shard's transaction pool, so it is never starved by clients.
//! The queue is allocated at start with room for as many messages as the shard's
//! transaction pool holds; its high water is exported (`percore_mesh_queued_high_water`),
//! and a queue that grows past that room (an allocation after start-up, which those limits
//! are meant to rule out in practice) is counted and logged (`percore_mesh_queue_grown_total`).

use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::task::JoinHandle;
use percore_engine::bft::xshard::ProvenOutputs;
use percore_engine::ring::spsc;
use percore_engine::state_machine::StateMachine;

use crate::core::Origin;
use crate::metrics::ShardMetrics;
use crate::runtime::Shard;

/// Queued messages beyond which the shard stops (an assertion): the in-flight limits keep
/// the queue far below this, so more means back-pressure failed.
const QUEUED_MESSAGES_MAX: usize = 1 << 20;
/// How long a receiver that met back-pressure waits before draining again.
const BACKPRESSURE_RETRY_US: u64 = 20;

/// What travels between two shards of one node.
pub enum MeshMessage<S: StateMachine> {
    /// A client record for the receiving shard; the result goes back with `token`.
    Forward {
        /// Batch operation code.
        operation: u16,
        /// The record.
        record: S::Record,
        /// The sender's packed local origin.
        token: u64,
    },
    /// The result of a record this shard forwarded.
    Result {
        /// The token sent with the record.
        token: u64,
        /// Its result.
        result: S::Result,
    },
    /// A state-machine message (e.g. a cross-shard credit leg or its acknowledgement).
    Outbound {
        /// Batch operation code at the receiver.
        operation: u16,
        /// The record.
        record: S::Record,
    },
    /// BFT mode: outputs of the sending shard's group certified by `q` of its replicas,
    /// for this node's replica of the receiving shard's group (`docs/bft.md` §14). Boxed:
    /// a proof holds a certificate and up to a batch of records, and the ring's slots stay
    /// the size of the other messages. Sent with [`MeshEndpoint::send`] only, never queued:
    /// a full ring drops it, and the sender delivers it again on its next resend.
    Proven(Box<ProvenOutputs>),
}

impl<S: StateMachine> MeshMessage<S> {
    /// The message carrying a state machine's `outbound`, and the shard it goes to.
    pub(crate) fn outbound(
        outbound: percore_engine::state_machine::Outbound<S::Operation, S::Record>,
    ) -> (usize, Self) {
        let message = MeshMessage::Outbound {
            operation: outbound.operation.into(),
            record: outbound.record,
        };
        (outbound.shard as usize, message)
    }
}

impl<S: StateMachine> fmt::Debug for MeshMessage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeshMessage::Forward {
                operation, token, ..
            } => f
                .debug_struct("Forward")
                .field("operation", operation)
                .field("token", token)
                .finish(),
            MeshMessage::Result { token, .. } => {
                f.debug_struct("Result").field("token", token).finish()
            }
            MeshMessage::Outbound { operation, .. } => f
                .debug_struct("Outbound")
                .field("operation", operation)
                .finish(),
            MeshMessage::Proven(proof) => f
                .debug_struct("Proven")
                .field("origin", &proof.cert.statement.origin)
                .field("op", &proof.cert.statement.op)
                .finish(),
        }
    }
}

/// All rings of a node before they are handed to their shards.
pub struct Mesh<S: StateMachine> {
    endpoints: Vec<MeshLinks<S>>,
}

/// A ring to one peer shard and its (unconnected) doorbell.
type OutgoingLink<S> = (spsc::Producer<MeshMessage<S>>, SharedSender<()>);

/// One shard's ends of the mesh as built on the main thread (`Send`): rings and
/// unconnected doorbells. The shard turns them into a [`MeshEndpoint`] on its own executor.
pub struct MeshLinks<S: StateMachine> {
    shard: usize,
    outgoing: Vec<Option<OutgoingLink<S>>>,
    incoming: Vec<Incoming<S>>,
}

impl<S: StateMachine> fmt::Debug for MeshLinks<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshLinks")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> fmt::Debug for Mesh<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("shards", &self.endpoints.len())
            .finish()
    }
}

struct Outgoing<S: StateMachine> {
    ring: spsc::Producer<MeshMessage<S>>,
    doorbell: Option<SharedSender<()>>,
    connected: Option<ConnectedSender<()>>,
    dirty: bool,
}

struct Incoming<S: StateMachine> {
    from: usize,
    ring: spsc::Consumer<MeshMessage<S>>,
    doorbell: SharedReceiver<()>,
}

/// One shard's ends of the mesh, live on its executor.
pub struct MeshEndpoint<S: StateMachine> {
    shard: usize,
    metrics: std::sync::Arc<ShardMetrics>,
    outgoing: Vec<Option<Outgoing<S>>>,
    incoming: Vec<Incoming<S>>,
    queued: VecDeque<(usize, MeshMessage<S>)>,
    /// What `queued` held room for at start; growing past it allocates.
    queued_capacity: usize,
    /// The most `queued` ever held (`percore_mesh_queued_high_water`).
    queued_high_water: usize,
}

impl<S: StateMachine> MeshEndpoint<S> {
    /// Takes over a shard's links (doorbells are connected later, by `spawn_receivers`).
    pub fn from_links(
        links: MeshLinks<S>,
        queued_capacity: usize,
        metrics: std::sync::Arc<ShardMetrics>,
    ) -> Self {
        let outgoing = links
            .outgoing
            .into_iter()
            .map(|link| {
                link.map(|(ring, doorbell)| Outgoing {
                    ring,
                    doorbell: Some(doorbell),
                    connected: None,
                    dirty: false,
                })
            })
            .collect();
        let queued = VecDeque::with_capacity(queued_capacity);
        Self {
            shard: links.shard,
            metrics,
            outgoing,
            incoming: links.incoming,
            queued_capacity: queued.capacity(),
            queued,
            queued_high_water: 0,
        }
    }
}

impl<S: StateMachine> fmt::Debug for MeshEndpoint<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshEndpoint")
            .field("shard", &self.shard)
            .field("queued", &self.queued.len())
            .finish()
    }
}

impl<S> Mesh<S>
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    /// Builds the N×(N-1) rings, each of `capacity` messages, and their doorbells.
    pub fn build(shards: usize, capacity: usize) -> Self {
        let mut endpoints: Vec<MeshLinks<S>> = (0..shards)
            .map(|shard| MeshLinks {
                shard,
                outgoing: (0..shards).map(|_| None).collect(),
                incoming: Vec::with_capacity(shards.saturating_sub(1)),
            })
            .collect();
        for from in 0..shards {
            for to in 0..shards {
                if from == to {
                    continue;
                }
                let (producer, consumer) = spsc::channel(capacity);
                let (bell_tx, bell_rx) = shared_channel::new_bounded(1);
                endpoints[from].outgoing[to] = Some((producer, bell_tx));
                endpoints[to].incoming.push(Incoming {
                    from,
                    ring: consumer,
                    doorbell: bell_rx,
                });
            }
        }
        Self { endpoints }
    }

    /// One set of links per shard, in shard order.
    pub fn into_endpoints(self) -> Vec<MeshLinks<S>> {
        self.endpoints
    }
}

impl<S> MeshEndpoint<S>
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    /// Pushes a message to shard `to`; hands it back if that ring is full.
    pub fn send(&mut self, to: usize, message: MeshMessage<S>) -> Result<(), MeshMessage<S>> {
        let outgoing = self.outgoing[to].as_mut().expect("no ring to self");
        match outgoing.ring.push(message) {
            Ok(()) => {
                outgoing.dirty = true;
                ShardMetrics::add(&self.metrics.mesh_messages_sent_total, 1);
                Ok(())
            }
            Err(full) => Err(full.into_inner()),
        }
    }

    /// Sends, or queues locally (in order) if the ring is full or older messages wait.
    pub fn send_or_queue(&mut self, to: usize, message: MeshMessage<S>) {
        if self.queued.is_empty() {
            match self.send(to, message) {
                Ok(()) => return,
                Err(message) => self.queued.push_back((to, message)),
            }
        } else {
            self.queued.push_back((to, message));
        }
        self.queued_noted();
    }

    /// Records a longer queue than ever (`percore_mesh_queued_high_water`) and a queue
    /// grown past its start-up capacity (`percore_mesh_queue_grown_total`, logged): the
    /// in-flight limits that bound it (module docs) are meant to keep it within that.
    fn queued_noted(&mut self) {
        let queued = self.queued.len();
        assert!(
            queued <= QUEUED_MESSAGES_MAX,
            "mesh queue unbounded: back-pressure failed"
        );
        if queued <= self.queued_high_water {
            return;
        }
        self.queued_high_water = queued;
        ShardMetrics::set(&self.metrics.mesh_queued_high_water, queued as u64);
        // A queue grows only when it is longer than ever before: only here.
        if self.queued.capacity() > self.queued_capacity {
            tracing::warn!(
                shard = self.shard,
                queued,
                capacity_at_start = self.queued_capacity,
                capacity = self.queued.capacity(),
                "the local mesh queue grew past its start-up capacity (an allocation)"
            );
            self.queued_capacity = self.queued.capacity();
            ShardMetrics::add(&self.metrics.mesh_queue_grown_total, 1);
        }
    }

    /// Retries queued messages in order; returns whether any left the queue.
    pub fn flush_queued(&mut self) -> bool {
        let mut sent = false;
        while let Some((to, message)) = self.queued.pop_front() {
            if let Err(message) = self.send(to, message) {
                self.queued.push_front((to, message));
                break;
            }
            sent = true;
        }
        sent
    }

    /// Messages waiting in the local queue.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Nothing queued locally.
    pub fn is_idle(&self) -> bool {
        self.queued.is_empty()
    }

    /// Rings the doorbell of every shard that was sent something since the last call.
    pub fn ring_doorbells(&mut self) {
        for outgoing in self.outgoing.iter_mut().flatten() {
            if outgoing.dirty {
                outgoing.dirty = false;
                if let Some(connected) = &outgoing.connected {
                    // Full means a ring is already pending: the receiver will drain.
                    let _ = connected.try_send(());
                }
            }
        }
    }
}

/// Spawns one receiver task per peer shard, then connects this shard's outgoing doorbells.
///
/// glommio's shared channels connect both ends by handshake, so receivers are spawned
/// (and connect inside their tasks) before this shard awaits its own senders: every shard
/// does the same, so every handshake finds its peer.
pub(crate) async fn spawn_receivers<S>(shard: Rc<Shard<S>>) -> Vec<JoinHandle<()>>
where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let incoming = std::mem::take(&mut shard.mesh.borrow_mut().incoming);
    let mut receivers = Vec::with_capacity(incoming.len());
    for Incoming {
        from,
        ring,
        doorbell,
    } in incoming
    {
        let task = glommio::spawn_local(receive_loop(shard.clone(), from, ring, doorbell)).detach();
        receivers.push(task);
    }
    let mut outgoing = std::mem::take(&mut shard.mesh.borrow_mut().outgoing);
    for out in outgoing.iter_mut().flatten() {
        if let Some(sender) = out.doorbell.take() {
            // A connection completes once the other shard's receiver connects: never, if
            // that shard failed to start, so the node's stop ends the wait.
            match until_stopped(&shard, sender.connect()).await {
                Some(connected) => out.connected = Some(connected),
                None => break,
            }
        }
    }
    shard.mesh.borrow_mut().outgoing = outgoing;
    receivers
}

/// `work`'s output, or `None` once the node stops first (polled every `STOP_POLL_MS`).
async fn until_stopped<S: StateMachine, T>(
    shard: &Shard<S>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let poll = Duration::from_millis(crate::runtime::STOP_POLL_MS);
    futures_lite::future::or(async { Some(work.await) }, async {
        while !shard.stop.load(std::sync::atomic::Ordering::Relaxed) {
            glommio::timer::sleep(poll).await;
        }
        None
    })
    .await
}

async fn receive_loop<S>(
    shard: Rc<Shard<S>>,
    from: usize,
    mut ring: spsc::Consumer<MeshMessage<S>>,
    doorbell: SharedReceiver<()>,
) where
    S: StateMachine + 'static,
    S::Record: Send,
    S::Result: Send,
{
    let poll = Duration::from_millis(crate::runtime::STOP_POLL_MS);
    // As in `spawn_receivers`: a shard that failed to start never connects.
    let Some(doorbell): Option<ConnectedReceiver<()>> =
        until_stopped(&shard, doorbell.connect()).await
    else {
        return;
    };
    while !shard.finished.get() {
        let rung = futures_lite::future::or(async { doorbell.recv().await.is_some() }, async {
            glommio::timer::sleep(poll).await;
            true
        })
        .await;
        while !drain(&shard, from, &mut ring) {
            glommio::timer::sleep(Duration::from_micros(BACKPRESSURE_RETRY_US)).await;
        }
        shard.batcher.notify();
        if !rung {
            // The sender's executor is gone: nothing more can arrive.
            return;
        }
    }
}

/// Takes every message from one incoming ring. Returns `false` if it stopped early on
/// back-pressure from the core (the rest stays in the ring, in order).
fn drain<S>(shard: &Shard<S>, from: usize, ring: &mut spsc::Consumer<MeshMessage<S>>) -> bool
where
    S: StateMachine,
    S::Record: Send,
    S::Result: Send,
{
    let mut forwarded_in = 0;
    let mut legs_in = 0;
    let mut results_in = 0;
    let mut proofs_in = 0;
    let mut finished = true;
    loop {
        let Some(message) = pop_if(ring, |message| accept_possible(shard, message)) else {
            if ring.available() > 0 {
                finished = false;
            }
            break;
        };
        match message {
            MeshMessage::Forward {
                operation,
                record,
                token,
            } => {
                let operation = S::Operation::try_from(operation)
                    .ok()
                    .expect("forwarded by a shard of this node");
                let origin = Origin::Forwarded {
                    shard: from as u16,
                    token,
                };
                let submitted = shard.core.borrow_mut().submit(operation, &record, origin);
                debug_assert!(submitted.is_ok(), "accept_possible checked room");
                forwarded_in += 1;
            }
            MeshMessage::Result { token, result } => {
                results_in += 1;
                if let Origin::Local {
                    connection,
                    generation,
                    index,
                } = Origin::unpack_local(token)
                {
                    crate::runtime::complete_local(
                        shard,
                        connection as usize,
                        generation,
                        index as usize,
                        &result,
                    );
                }
            }
            MeshMessage::Outbound { operation, record } => {
                if let Some(replication) = &shard.replication
                    && !replication.is_ready_leader()
                {
                    // This group is led elsewhere: the message goes to its leader.
                    crate::replication::forward_to_leader(shard, operation, &record);
                    legs_in += 1;
                    continue;
                }
                let operation = S::Operation::try_from(operation)
                    .ok()
                    .expect("sent by a shard of this node");
                let submitted =
                    shard
                        .core
                        .borrow_mut()
                        .submit(operation, &record, Origin::Internal);
                debug_assert!(submitted.is_ok(), "accept_possible checked room");
                legs_in += 1;
            }
            MeshMessage::Proven(proof) => {
                crate::bft_xshard::proven_received(shard, *proof);
                proofs_in += 1;
            }
        }
    }
    crate::replication::forward_flush(shard);
    let received = forwarded_in + legs_in + results_in + proofs_in;
    if received > 0 {
        shard.quiet[shard.index].store(false, std::sync::atomic::Ordering::Release);
    }
    ShardMetrics::add(&shard.metrics.mesh_messages_received_total, received);
    ShardMetrics::add(&shard.metrics.tx_forwarded_in_total, forwarded_in);
    ShardMetrics::add(&shard.metrics.credit_legs_in_total, legs_in);
    finished
}

/// Whether the core can take this message now (results always can).
fn accept_possible<S: StateMachine>(shard: &Shard<S>, message: &MeshMessage<S>) -> bool {
    match message {
        // Proofs go to the BFT driver's bounded inbound queue, never to the core.
        MeshMessage::Result { .. } | MeshMessage::Proven(_) => true,
        MeshMessage::Forward { .. } | MeshMessage::Outbound { .. } => {
            let room = shard.core.borrow_mut().has_room();
            if !room {
                ShardMetrics::add(&shard.metrics.pool_exhausted_total, 1);
            }
            room
        }
    }
}

/// Pops the oldest message only if `accept` approves it.
fn pop_if<T>(ring: &mut spsc::Consumer<T>, accept: impl FnOnce(&T) -> bool) -> Option<T> {
    let approved = {
        let chunk = ring.read_chunk(1);
        let (first, _) = chunk.as_slices();
        first.first().is_some_and(accept)
    };
    if approved { ring.pop() } else { None }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use bytemuck::Zeroable as _;
    use percore_engine::ledger::Ledger;
    use percore_engine::record::RecordSlot;

    use super::*;

    /// A message to a full ring waits in the local queue, in order; the queue's high water
    /// is exported, and only a queue longer than its start-up capacity counts as grown.
    #[test]
    fn the_local_queue_counts_its_high_water_and_any_growth_past_its_capacity() {
        const RING: usize = 4;
        let mut endpoints = Mesh::<Ledger>::build(2, RING).into_endpoints();
        let links = endpoints.remove(0);
        let metrics = Arc::new(ShardMetrics::new(0));
        let mut mesh = MeshEndpoint::from_links(links, 8, metrics.clone());
        let capacity = mesh.queued_capacity;
        assert!(capacity >= 8);
        let message = || MeshMessage::Outbound {
            operation: 1,
            record: RecordSlot::zeroed(),
        };
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        for _ in 0..RING + capacity {
            mesh.send_or_queue(1, message());
        }
        assert_eq!(mesh.queued(), capacity);
        assert_eq!(load(&metrics.mesh_messages_sent_total), RING as u64);
        assert_eq!(load(&metrics.mesh_queued_high_water), capacity as u64);
        assert_eq!(load(&metrics.mesh_queue_grown_total), 0);
        assert!(!mesh.flush_queued(), "the ring is still full");
        mesh.send_or_queue(1, message());
        assert_eq!(mesh.queued(), capacity + 1);
        assert_eq!(load(&metrics.mesh_queued_high_water), capacity as u64 + 1);
        assert_eq!(load(&metrics.mesh_queue_grown_total), 1);
        drop(endpoints);
    }
}
