//! The peer transport both replication protocols share: one bounded outbox and one sender
//! task per peer, one listener and a receiver task per accepted connection.
//!
//! A connection carries one direction: the dialer sends, the listener receives, both ends
//! authenticated with the cluster key (`percore_net::peer`). What differs between the
//! crash-fault driver (`crate::replication`) and the BFT one (`crate::bft`) is behind
//! `PeerProtocol`: where a shard keeps its identity, key and outboxes, how large a frame
//! may be, what a received frame does, and what a connection coming up or going down tells
//! the protocol core. Nothing here allocates per message: each outbox and each sender's
//! spare buffer is sized at start-up.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use percore_engine::message::{PEER_HEADER_BYTES, PeerHeader, PeerKeys};
use percore_engine::state_machine::StateMachine;
use percore_net::peer::{self, PeerIdentity, ReplicaSigning};

use crate::metrics::ShardMetrics;
use crate::runtime::{LocalNotify, STOP_POLL_MS, Shard};

/// Authentication handshake deadline (µs).
pub const HANDSHAKE_TIMEOUT_US: u64 = 1_000_000;
/// Reconnect back-off bounds (µs).
pub const RECONNECT_BACKOFF_US_MIN: u64 = 1_000;
/// See [`RECONNECT_BACKOFF_US_MIN`].
pub const RECONNECT_BACKOFF_US_MAX: u64 = 1_000_000;

const _: () = assert!(RECONNECT_BACKOFF_US_MIN < RECONNECT_BACKOFF_US_MAX);

/// Unauthenticated handshakes a shard runs at once (`docs/protocol.md` 3): a connection
/// accepted while this many are under way is closed unheard (counted in
/// `percore_peer_handshakes_refused_total`). Each holds a socket for up to
/// [`HANDSHAKE_TIMEOUT_US`]; without a bound, anyone who can reach the peer port could
/// take every descriptor of the process.
pub const HANDSHAKES_PENDING_MAX: usize = 8;
/// A newly authenticated connection waits for its peer's body buffer, which the connection
/// it replaces hands back when it sees it was replaced, looking again this often (µs) as
/// well as when woken.
const BODY_WAIT_POLL_US: u64 = 1_000;
/// Refused handshakes are logged at most once per this interval per shard (ms); the rest
/// are counted, and the next line says how many were not logged.
const REFUSAL_LOG_INTERVAL_MS: u64 = 1_000;

/// What the transport needs of a shard's protocol state.
pub(crate) struct PeerLink<'a> {
    /// This replica's identity in the handshake.
    pub(crate) identity: &'a PeerIdentity,
    /// The keys the ends authenticate with: a node answers with its cluster key, and
    /// accepts a peer answering with either.
    pub(crate) keys: &'a PeerKeys,
    /// Every replica's peer address (shard `k` listens on the port plus `k`).
    pub(crate) peers: &'a [SocketAddr],
    /// One outbox per replica ([`Outbox::for_peers`]).
    pub(crate) outboxes: &'a [Outbox],
    /// A connection's send buffer (bytes).
    pub(crate) send_queue_bytes: usize,
    /// Largest frame body accepted from a peer (bytes).
    pub(crate) frame_bytes_max: usize,
    /// BFT mode: replicas prove their index with their signing keys at the handshake.
    pub(crate) signing: Option<ReplicaSigning<'a>>,
}

/// What a protocol driver tells the shared transport about itself.
pub(crate) trait PeerProtocol<S: StateMachine>: 'static {
    /// How log lines name this kind of peer ("peer", "BFT peer").
    const NAME: &'static str;

    /// The shard's side of the transport.
    fn link(shard: &Shard<S>) -> PeerLink<'_>;
    /// One authenticated frame from `from`. Never awaits.
    fn received(shard: &Shard<S>, from: u8, header: &PeerHeader, body: &[u8]);
    /// The outbound connection to `peer` came up or went down (the outbox is already open
    /// or cleared).
    fn connection_changed(_shard: &Shard<S>, _peer: u8, _connected: bool) {}
}

/// The address shard `shard` of `replica` listens on for peers: `peers[replica]` with the
/// port plus `shard`.
pub fn peer_address(peers: &[SocketAddr], replica: u8, shard: usize) -> SocketAddr {
    let mut address = peers[usize::from(replica)];
    address.set_port(address.port() + shard as u16);
    address
}

/// Encoded messages to one peer, written by its sender task.
pub(crate) struct Outbox {
    bytes: RefCell<Vec<u8>>,
    /// Bytes before this may be sent; the rest are Prepares held until durable.
    released: Cell<usize>,
    holding: Cell<bool>,
    connected: Cell<bool>,
    doorbell: LocalNotify,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            bytes: RefCell::new(Vec::with_capacity(capacity)),
            released: Cell::new(0),
            holding: Cell::new(false),
            connected: Cell::new(false),
            doorbell: LocalNotify::default(),
        }
    }

    /// One outbox per replica of `replica_count`, `capacity` bytes each; `me`'s own is
    /// empty and never used.
    pub(crate) fn for_peers(replica_count: u8, me: u8, capacity: usize) -> Box<[Outbox]> {
        (0..replica_count)
            .map(|peer| Outbox::new(if peer == me { 0 } else { capacity }))
            .collect()
    }

    /// Appends one message; `false` (nothing appended) when the peer is disconnected or the
    /// queue is full. Releases it at once unless Prepares are being held.
    pub(crate) fn push(&self, mut header: PeerHeader, body: &[u8]) -> bool {
        if !self.connected.get() {
            return false;
        }
        let mut bytes = self.bytes.borrow_mut();
        if bytes.len() + PEER_HEADER_BYTES + body.len() > bytes.capacity() {
            return false;
        }
        header.body_bytes = body.len() as u32;
        bytes.extend_from_slice(bytemuck::bytes_of(&header));
        bytes.extend_from_slice(body);
        if !self.holding.get() {
            self.released.set(bytes.len());
        }
        true
    }

    /// Pushes one message and wakes the sender task; counts it in `dropped` if it could
    /// not be queued (the peer repairs or the sender retries).
    pub(crate) fn send(
        &self,
        header: PeerHeader,
        body: &[u8],
        dropped: &std::sync::atomic::AtomicU64,
    ) -> bool {
        let queued = self.push(header, body);
        if queued {
            self.doorbell.notify();
        } else {
            ShardMetrics::add(dropped, 1);
        }
        queued
    }

    /// From now on, messages pushed wait for [`Outbox::release`] (`true`) or may be sent at
    /// once (`false`).
    pub(crate) fn hold(&self, holding: bool) {
        self.holding.set(holding);
    }

    /// Whether messages are held and some wait for [`Outbox::release`].
    pub(crate) fn holds_unreleased(&self) -> bool {
        self.holding.get() && self.bytes.borrow().len() > self.released.get()
    }

    /// Wakes the sender task if anything is queued (messages pushed without
    /// [`Outbox::send`]).
    pub(crate) fn wake_if_queued(&self) {
        if !self.bytes.borrow().is_empty() {
            self.doorbell.notify();
        }
    }

    /// Stops holding and lets everything queued be sent.
    pub(crate) fn release(&self) {
        self.holding.set(false);
        let length = self.bytes.borrow().len();
        if self.released.replace(length) != length {
            self.doorbell.notify();
        }
    }

    fn clear(&self) {
        self.bytes.borrow_mut().clear();
        self.released.set(0);
    }

    /// Moves the released messages into `spare` (emptied first).
    fn take_released(&self, spare: &mut Vec<u8>) {
        let mut bytes = self.bytes.borrow_mut();
        let released = self.released.get();
        spare.clear();
        if released == bytes.len() {
            // Everything goes: trade buffers (both were sized at start-up) instead of
            // copying up to a whole queue of Prepares.
            std::mem::swap(&mut *bytes, spare);
        } else {
            spare.extend_from_slice(&bytes[..released]);
            bytes.drain(..released);
        }
        self.released
            .set(if self.holding.get() { 0 } else { bytes.len() });
    }
}

/// Returns once the shard is `finished` (polled every [`STOP_POLL_MS`]).
pub(crate) async fn until_finished<S: StateMachine>(shard: &Shard<S>) {
    while !shard.finished.get() {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
}

/// One peer's inbound side on this shard: which of its connections is the newest, and the
/// one body buffer its receivers take in turn (allocated when the shard starts), so that
/// however often a peer reconnects, this shard holds one frame's buffer for it.
struct Inbound {
    /// How many of the peer's connections authenticated so far. A receiver serves only
    /// while its connection is the newest (see [`receive_loop`]).
    generation: Cell<u64>,
    /// The buffer, while no receiver holds it.
    body: Cell<Option<Vec<u8>>>,
    /// Rung when a newer connection authenticates: wakes the receiver holding the buffer.
    superseded: LocalNotify,
    /// Rung when the holder hands the buffer back.
    returned: LocalNotify,
}

/// Handshake refusals logged and not logged since the last line ([`REFUSAL_LOG_INTERVAL_MS`]).
#[derive(Default)]
struct RefusalLog {
    logged_at: Cell<Option<std::time::Instant>>,
    unlogged: Cell<u64>,
}

impl RefusalLog {
    /// Whether to log a refusal now, and how many went unlogged before it.
    fn due(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let quiet = self.logged_at.get().is_none_or(|at| {
            now.duration_since(at) >= Duration::from_millis(REFUSAL_LOG_INTERVAL_MS)
        });
        if quiet {
            self.logged_at.set(Some(now));
            Some(self.unlogged.replace(0))
        } else {
            self.unlogged.set(self.unlogged.get() + 1);
            None
        }
    }
}

/// Accepts peer connections; each gets its own receiver task, at most
/// [`HANDSHAKES_PENDING_MAX`] of them unauthenticated at once. Returns once the shard is
/// finished and every receiver has ended.
pub(crate) async fn accept_loop<S, P>(shard: Rc<Shard<S>>, listener: TcpListener)
where
    S: StateMachine + 'static,
    P: PeerProtocol<S>,
{
    let receivers = Rc::new(Cell::new(0usize));
    let pending = Rc::new(Cell::new(0usize));
    let refusals = Rc::new(RefusalLog::default());
    let inbound: Rc<[Inbound]> = {
        let link = P::link(&shard);
        (0..link.identity.replica_count)
            .map(|peer| Inbound {
                generation: Cell::new(0),
                body: Cell::new(
                    (peer != link.identity.replica).then(|| vec![0; link.frame_bytes_max]),
                ),
                superseded: LocalNotify::default(),
                returned: LocalNotify::default(),
            })
            .collect()
    };
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            until_finished(&shard).await;
            None
        })
        .await;
        let Some(accepted) = accepted else { break };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors, say: retrying at once would spin.
                if let Some(unlogged) = refusals.due() {
                    tracing::warn!(shard = shard.index, %error, unlogged, "{} accept failed", P::NAME);
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if pending.get() >= HANDSHAKES_PENDING_MAX {
            ShardMetrics::add(&shard.metrics.peer_handshakes_refused_total, 1);
            drop(stream);
            continue;
        }
        pending.set(pending.get() + 1);
        receivers.set(receivers.get() + 1);
        let (shard, receivers) = (shard.clone(), receivers.clone());
        let (pending, refusals, inbound) = (pending.clone(), refusals.clone(), inbound.clone());
        glommio::spawn_local(async move {
            receive_loop::<S, P>(&shard, stream, &inbound, &pending, &refusals).await;
            receivers.set(receivers.get() - 1);
        })
        .detach();
    }
    // Receivers end within a poll interval of `finished`; they hold the shard.
    while receivers.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
}

/// Returns once the shard is finished or a newer connection of the peer authenticated.
async fn until_superseded<S: StateMachine>(shard: &Shard<S>, peer: &Inbound, mine: u64) {
    while !shard.finished.get() && peer.generation.get() == mine {
        futures_lite::future::or(
            peer.superseded.wait(),
            glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)),
        )
        .await;
    }
}

/// Authenticates one inbound connection, then hands each frame to the protocol until the
/// connection ends or the shard finishes. A failed handshake or a frame that fails its
/// checks counts in `percore_peer_auth_failures_total` and ends the connection.
///
/// A newly authenticated connection from a peer replaces the older ones (the peer
/// reconnected, or restarted): the older one's receiver is woken, closes its connection
/// and hands the peer's body buffer to the new one; a frame still arriving on an older one
/// is dropped, never handed to the protocol. So once this replica has handled a message of
/// a peer's new connection, nothing its earlier process sent counts any more: a replica
/// formatted with `--replace` relies on it (`docs/protocol.md` 8). Dropping is safe: the
/// peer already treated what it had queued on the old connection as lost. An older
/// connection that went silent (its peer's host died) ends when the peer connects again.
async fn receive_loop<S, P>(
    shard: &Rc<Shard<S>>,
    stream: TcpStream,
    inbound: &[Inbound],
    pending: &Cell<usize>,
    refusals: &RefusalLog,
) where
    S: StateMachine + 'static,
    P: PeerProtocol<S>,
{
    let handshake = async {
        let nonce = peer::os_nonce()?;
        let link = P::link(shard);
        peer::accept_handshake(
            stream,
            link.identity,
            &link.keys.current,
            nonce,
            Duration::from_micros(HANDSHAKE_TIMEOUT_US),
            link.signing,
        )
        .await
    };
    let handshake = futures_lite::future::or(async { Some(handshake.await) }, async {
        until_finished(shard).await;
        None
    })
    .await;
    pending.set(pending.get() - 1);
    let accepted = match handshake {
        None => return,
        Some(Ok(accepted)) => accepted,
        Some(Err(error)) => {
            ShardMetrics::add(&shard.metrics.peer_auth_failures_total, 1);
            if let Some(unlogged) = refusals.due() {
                tracing::warn!(shard = shard.index, %error, unlogged, "{} refused", P::NAME);
            }
            return;
        }
    };
    let from = accepted.from();
    let Some(peer) = inbound.get(usize::from(from)) else {
        return;
    };
    let mine = peer.generation.get() + 1;
    peer.generation.set(mine);
    peer.superseded.notify();
    // Bounded: the holder hands the buffer back once it sees this connection (or the
    // shard's end); a newer connection ends this wait instead.
    let body = loop {
        if peer.generation.get() != mine {
            ShardMetrics::add(&shard.metrics.peer_connections_replaced_total, 1);
            return;
        }
        if shard.finished.get() {
            return;
        }
        if let Some(body) = peer.body.take() {
            break body;
        }
        futures_lite::future::or(
            peer.returned.wait(),
            glommio::timer::sleep(Duration::from_micros(BODY_WAIT_POLL_US)),
        )
        .await;
    };
    let mut receiver = accepted.receiver(body);
    tracing::info!(
        shard = shard.index,
        peer = from,
        "{} connected (inbound)",
        P::NAME
    );
    loop {
        let received = futures_lite::future::or(async { Some(receiver.recv().await) }, async {
            until_superseded(shard, peer, mine).await;
            None
        })
        .await;
        if peer.generation.get() != mine {
            ShardMetrics::add(&shard.metrics.peer_connections_replaced_total, 1);
            tracing::info!(
                shard = shard.index,
                peer = from,
                "{} connection replaced by a newer one from the same peer",
                P::NAME
            );
            break;
        }
        match received {
            None => break,
            Some(Ok((header, body))) => P::received(shard, from, &header, body),
            Some(Err(error)) => {
                if !matches!(error, peer::PeerError::Closed) {
                    ShardMetrics::add(&shard.metrics.peer_auth_failures_total, 1);
                }
                tracing::info!(
                    shard = shard.index,
                    peer = from,
                    %error,
                    "{} connection ended",
                    P::NAME
                );
                break;
            }
        }
    }
    peer.body.set(Some(receiver.into_body()));
    peer.returned.notify();
}

/// Dials `peer` (with back-off) and writes its outbox until the shard finishes.
pub(crate) async fn sender_loop<S, P>(shard: Rc<Shard<S>>, peer: u8)
where
    S: StateMachine + 'static,
    P: PeerProtocol<S>,
{
    let link = P::link(&shard);
    let address = peer_address(link.peers, peer, shard.index);
    let outbox = &link.outboxes[usize::from(peer)];
    // Exported from now on, connected or not (`percore_peer_connected 0` for a peer never
    // reached, which an alert on `== 0` sees).
    ShardMetrics::set(&shard.metrics.peers[usize::from(peer)].expected, 1);
    let mut spare: Vec<u8> = Vec::with_capacity(link.send_queue_bytes);
    let dial = PeerDial {
        address,
        identity: link.identity,
        peer,
        keys: link.keys,
        send_queue_bytes: link.send_queue_bytes,
        signing: link.signing,
    };
    while let Some(mut sender) = dial.until_connected(&shard).await {
        tracing::info!(
            shard = shard.index,
            peer,
            %address,
            "{} connected (outbound)",
            P::NAME
        );
        outbox.connected.set(true);
        P::connection_changed(&shard, peer, true);
        let gauges = &shard.metrics.peers[usize::from(peer)];
        ShardMetrics::set(&gauges.connected, 1);
        ShardMetrics::set(&gauges.accepted_key, u64::from(sender.by_accepted_key()));
        let ended = write_outbox(&shard, outbox, &mut sender, &mut spare).await;
        outbox.connected.set(false);
        outbox.clear();
        P::connection_changed(&shard, peer, false);
        ShardMetrics::set(&gauges.connected, 0);
        ShardMetrics::set(&gauges.accepted_key, 0);
        if let Err(error) = ended {
            tracing::info!(
                shard = shard.index,
                peer,
                %error,
                "{} connection lost",
                P::NAME
            );
        }
    }
}

/// What a sender task needs to dial one peer .
struct PeerDial<'a> {
    /// The peer's address for this shard's group.
    address: SocketAddr,
    /// Who this replica is.
    identity: &'a PeerIdentity,
    /// The peer's replica index.
    peer: u8,
    /// The keys this node authenticates with.
    keys: &'a PeerKeys,
    /// The connection's send buffer (bytes).
    send_queue_bytes: usize,
    /// BFT mode: the signing key this replica proves its index with.
    signing: Option<ReplicaSigning<'a>>,
}

impl PeerDial<'_> {
    /// Dials until the peer answers the handshake, backing off exponentially from
    /// [`RECONNECT_BACKOFF_US_MIN`] to [`RECONNECT_BACKOFF_US_MAX`] with jitter; counts the
    /// connection. `None` once the shard finishes.
    async fn until_connected<S: StateMachine>(&self, shard: &Shard<S>) -> Option<peer::PeerSender> {
        let mut backoff_us = RECONNECT_BACKOFF_US_MIN;
        // Bounded by the shard's end: every failed try sleeps.
        while !shard.finished.get() {
            let dialed = match peer::os_nonce() {
                Ok(nonce) => {
                    peer::dial(
                        self.address,
                        self.identity,
                        self.peer,
                        self.keys,
                        nonce,
                        Duration::from_micros(HANDSHAKE_TIMEOUT_US),
                        self.send_queue_bytes,
                        self.signing,
                    )
                    .await
                }
                Err(error) => Err(error),
            };
            match dialed {
                Ok(sender) => {
                    ShardMetrics::add(&shard.metrics.peer_connections_total, 1);
                    if sender.by_accepted_key() {
                        // A key rotation is under way: that peer's cluster key is this
                        // node's accepted one (`docs/operations.md` section 7).
                        ShardMetrics::add(&shard.metrics.peer_connections_accepted_key_total, 1);
                        tracing::info!(
                            shard = shard.index,
                            peer = self.peer,
                            "peer answered with the accepted key, not the cluster key"
                        );
                    }
                    return Some(sender);
                }
                Err(error) => {
                    tracing::debug!(shard = shard.index, peer = self.peer, %error, "dial failed");
                    // Jitter from the clock's low bits: spreads reconnects of many shards.
                    let jitter = shard.now_us() % (backoff_us / 2 + 1);
                    glommio::timer::sleep(Duration::from_micros(backoff_us / 2 + jitter)).await;
                    backoff_us = (backoff_us * 2).min(RECONNECT_BACKOFF_US_MAX);
                }
            }
        }
        None
    }
}

/// Moves released messages from the outbox into the connection and writes them.
async fn write_outbox<S: StateMachine>(
    shard: &Shard<S>,
    outbox: &Outbox,
    sender: &mut peer::PeerSender,
    spare: &mut Vec<u8>,
) -> Result<(), peer::PeerError> {
    loop {
        if shard.finished.get() {
            return Ok(());
        }
        outbox.take_released(spare);
        let mut offset = 0;
        while offset < spare.len() {
            let header: PeerHeader =
                bytemuck::pod_read_unaligned(&spare[offset..offset + PEER_HEADER_BYTES]);
            let body_end = offset + PEER_HEADER_BYTES + header.body_bytes as usize;
            let body = &spare[offset + PEER_HEADER_BYTES..body_end];
            if sender.push(header, &[body]).is_err() {
                sender.flush().await?;
                sender
                    .push(header, &[body])
                    .expect("an empty send buffer holds one message");
            }
            ShardMetrics::add(
                &shard.metrics.replication_bytes_sent_total,
                (body_end - offset) as u64,
            );
            offset = body_end;
        }
        if !spare.is_empty() {
            sender.flush().await?;
            continue;
        }
        futures_lite::future::or(
            outbox.doorbell.wait(),
            glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use percore_engine::message::Command;

    fn header(op: u64) -> PeerHeader {
        let mut header = PeerHeader::new(Command::Prepare, 0, 1, 0, 1);
        header.view = op;
        header
    }

    /// The frames in `bytes`: (header view, standing in for a message id; body).
    fn frames(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            let header: PeerHeader =
                bytemuck::pod_read_unaligned(&bytes[offset..offset + PEER_HEADER_BYTES]);
            let end = offset + PEER_HEADER_BYTES + header.body_bytes as usize;
            out.push((header.view, bytes[offset + PEER_HEADER_BYTES..end].to_vec()));
            offset = end;
        }
        out
    }

    #[test]
    fn a_disconnected_or_full_outbox_refuses_and_keeps_what_it_has() {
        let outbox = Outbox::new(2 * PEER_HEADER_BYTES + 8);
        assert!(!outbox.push(header(1), b"abcd"), "no connection: refused");
        outbox.connected.set(true);
        assert!(outbox.push(header(1), b"abcd"));
        assert!(
            !outbox.push(header(2), &[0; 9]),
            "one byte over the capacity"
        );
        assert!(outbox.push(header(2), b"efgh"));
        let mut spare = Vec::with_capacity(outbox.bytes.borrow().capacity());
        outbox.take_released(&mut spare);
        assert_eq!(
            frames(&spare),
            [(1, b"abcd".to_vec()), (2, b"efgh".to_vec())]
        );
    }

    #[test]
    fn held_messages_wait_for_release_and_buffers_keep_their_size() {
        let capacity = 4 * (PEER_HEADER_BYTES + 16);
        let outbox = Outbox::new(capacity);
        let mut spare = Vec::with_capacity(capacity);
        outbox.connected.set(true);
        assert!(outbox.push(header(1), b"released"));
        outbox.hold(true);
        assert!(outbox.push(header(2), b"held"));
        assert!(outbox.holds_unreleased());
        // Part released: the released frame is copied out, the held one stays.
        outbox.take_released(&mut spare);
        assert_eq!(frames(&spare), [(1, b"released".to_vec())]);
        assert!(outbox.holds_unreleased());
        outbox.take_released(&mut spare);
        assert!(spare.is_empty(), "nothing released since");
        outbox.release();
        assert!(!outbox.holds_unreleased());
        assert!(outbox.push(header(3), b"after"));
        // All released: the buffers trade places.
        outbox.take_released(&mut spare);
        assert_eq!(
            frames(&spare),
            [(2, b"held".to_vec()), (3, b"after".to_vec())]
        );
        assert!(outbox.bytes.borrow().is_empty());
        assert_eq!(outbox.bytes.borrow().capacity(), capacity);
        assert_eq!(spare.capacity(), capacity);
        // The outbox still takes a full queue after the trade.
        for op in 0..4 {
            assert!(outbox.push(header(op), &[7; 16]));
        }
        assert!(!outbox.push(header(4), &[]));
    }

    #[test]
    fn for_peers_gives_this_replica_no_room() {
        let outboxes = Outbox::for_peers(3, 1, 1 << 10);
        let capacities: Vec<usize> = outboxes
            .iter()
            .map(|o| o.bytes.borrow().capacity())
            .collect();
        assert_eq!(capacities, [1 << 10, 0, 1 << 10]);
    }
}
