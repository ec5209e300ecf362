//! The authenticated replica-to-replica transport (docs/protocol.md section 3).
//!
//! This module owns peer sockets: it dials and accepts TCP connections on the shard's
//! glommio executor, runs the three-step handshake, and moves sealed frames. Each connection
//! carries one direction: the dialer only writes ([`PeerSender`]), the listener only reads
//! ([`PeerReceiver`]). It owns no protocol decisions: layouts, MACs and every check live in
//! `percore_engine::message`, and what a message means is the replica's business. It must
//! never act on bytes before their MAC and sequence are verified, never allocate per message
//! after construction, and never panic on bytes from the network.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use percore_engine::bft::{SigningKey, VerifyingKey};
use percore_engine::message::{
    self, ClusterKey, HANDSHAKE_FRAME_BYTES, HANDSHAKE_SIGNATURE_BYTES, HandshakeFrame,
    HandshakeStep, MessageError, NONCE_BYTES, PEER_HEADER_BYTES, PEER_MAGIC, PeerHeader, PeerKeys,
    SessionKey, Transcript,
};

/// Default deadline of one handshake, connect included (µs).
pub const HANDSHAKE_TIMEOUT_US_DEFAULT: u64 = 1_000_000;

/// What can end a peer connection or stop it from being made. After any of these the
/// connection is unusable: drop it (a sender reconnects).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The socket failed.
    #[error("peer socket: {0}")]
    Io(std::io::Error),
    /// The handshake did not finish within its deadline.
    #[error("peer handshake timed out")]
    Timeout,
    /// The other side closed the connection.
    #[error("peer connection closed")]
    Closed,
    /// A frame failed to decode or verify.
    #[error("peer frame rejected: {0}")]
    Message(#[from] MessageError),
    /// The listener refused a dialer's identity (closing without an answer).
    #[error("peer refused: {reason}")]
    Refused {
        /// Which identity check failed.
        reason: MessageError,
    },
    /// `dial` was asked to reach a replica outside the cluster, or ourselves.
    #[error("no peer replica {to} to dial")]
    InvalidTarget {
        /// The replica asked for.
        to: u8,
    },
    /// An earlier error left the stream mid-frame; the connection must be dropped.
    #[error("peer connection broken by an earlier error")]
    Broken,
}

/// Maps a socket error, treating an end of stream as [`PeerError::Closed`].
fn io_error(err: std::io::Error) -> PeerError {
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => PeerError::Closed,
        _ => PeerError::Io(err),
    }
}

/// Who this end of a peer connection is (the listener checks a Hello against it).
pub use percore_engine::message::PeerIdentity;

/// BFT mode: replicas prove their index at the handshake with their ed25519 keys. Every
/// replica holds the cluster key, so the MACs alone prove only membership: without this a
/// Byzantine replica could connect in another's name (its messages' sender is the
/// connection's). The dialer signs the completed transcript after its HelloConfirm
/// ([`message::handshake_sign`]); the listener checks it against the claimed replica's key.
#[derive(Clone, Copy, Debug)]
pub struct ReplicaSigning<'a> {
    /// This replica's signing key (used when dialing).
    pub key: &'a SigningKey,
    /// Every replica's public key, in replica order (checked when accepting).
    pub replicas: &'a [VerifyingKey],
}

/// A fresh handshake nonce from the OS CSPRNG (`/dev/urandom`).
pub fn os_nonce() -> Result<[u8; NONCE_BYTES], PeerError> {
    let mut nonce = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| file.read_exact(&mut nonce))
        .map_err(PeerError::Io)?;
    Ok(nonce)
}

/// Runs `future` under a deadline of `timeout`.
async fn with_deadline<T>(
    timeout: Duration,
    future: impl Future<Output = Result<T, PeerError>>,
) -> Result<T, PeerError> {
    let wrapped = async { Ok::<_, glommio::GlommioError<()>>(future.await) };
    match glommio::timer::timeout(timeout, wrapped).await {
        Ok(result) => result,
        Err(_) => Err(PeerError::Timeout),
    }
}

async fn read_handshake(
    stream: &mut TcpStream,
    expected: HandshakeStep,
) -> Result<HandshakeFrame, PeerError> {
    let mut bytes = [0u8; HANDSHAKE_FRAME_BYTES];
    stream.read_exact(&mut bytes).await.map_err(io_error)?;
    Ok(HandshakeFrame::decode(&bytes, expected)?)
}

async fn write_handshake(stream: &mut TcpStream, frame: &HandshakeFrame) -> Result<(), PeerError> {
    stream.write_all(&frame.encode()).await.map_err(io_error)
}

/// Dials replica `to` at `address` and authenticates both ways: Hello, the listener's MAC
/// checked in constant time against each of `keys` (the cluster key, then the one accepted
/// during a key rotation), HelloConfirm under the key that matched. The whole of it, connect
/// included, must finish within `handshake_timeout`. `nonce` must be fresh ([`os_nonce`];
/// the simulator draws it from its seed). The sender buffers up to `send_buffer_bytes`
/// between flushes; [`PeerSender::by_accepted_key`] tells whether the peer answered with
/// the accepted key. With `signing` (BFT mode) the dialer then sends its signature of the
/// transcript ([`ReplicaSigning`]).
#[allow(clippy::too_many_arguments)]
pub async fn dial(
    address: SocketAddr,
    me: &PeerIdentity,
    to: u8,
    keys: &PeerKeys,
    nonce: [u8; NONCE_BYTES],
    handshake_timeout: Duration,
    send_buffer_bytes: usize,
    signing: Option<ReplicaSigning<'_>>,
) -> Result<PeerSender, PeerError> {
    assert!(
        me.replica < me.replica_count,
        "identity outside its cluster"
    );
    if to >= me.replica_count || to == me.replica {
        return Err(PeerError::InvalidTarget { to });
    }
    let sent = Transcript {
        cluster_id: me.cluster_id,
        group: me.group,
        from: me.replica,
        to,
        nonce_dialer: nonce,
        nonce_listener: [0; NONCE_BYTES],
        peers_digest: me.peers_digest,
        settings_digest: me.settings_digest,
    };
    let (stream, transcript, key, by_accepted_key) = with_deadline(handshake_timeout, async {
        let mut stream = TcpStream::connect(address)
            .await
            .map_err(|err| io_error(err.into()))?;
        stream
            .set_nodelay(true)
            .map_err(|err| io_error(err.into()))?;
        write_handshake(
            &mut stream,
            &HandshakeFrame::new(HandshakeStep::Hello, &sent, 0),
        )
        .await?;
        let reply = read_handshake(&mut stream, HandshakeStep::HelloReply).await?;
        let (transcript, key, by_accepted_key) =
            message::check_hello_reply_keys(&reply, &sent, keys)?;
        let mac = message::hello_mac_dialer(key, &transcript);
        let confirm = HandshakeFrame::new(HandshakeStep::HelloConfirm, &transcript, mac);
        write_handshake(&mut stream, &confirm).await?;
        if let Some(signing) = signing {
            let signature = message::handshake_sign(signing.key, &transcript);
            stream.write_all(&signature).await.map_err(io_error)?;
        }
        Ok((stream, transcript, key, by_accepted_key))
    })
    .await?;
    tracing::debug!(
        group = me.group,
        to,
        by_accepted_key,
        "peer connection dialed"
    );
    let mut sender = PeerSender::new(
        stream,
        message::session_key(key, &transcript),
        me,
        to,
        send_buffer_bytes,
    );
    sender.by_accepted_key = by_accepted_key;
    Ok(sender)
}

/// Runs the listener's half of the handshake on an accepted `stream`. Refuses, by closing
/// without an answer, a Hello from a foreign cluster or group, from a node configured with
/// another peers list or other settings that decide results, from a replica outside
/// `0..replica_count` or from ourselves, or addressed to another replica; refuses a
/// HelloConfirm whose MAC is not the dialer's and, with `signing` (BFT mode), a dialer
/// whose signature is not the claimed replica's. Everything must arrive within
/// `handshake_timeout`. The connection then becomes a [`PeerReceiver`] with
/// [`Accepted::receiver`], given its body buffer: the caller knows by then which peer it
/// is, and so which buffer.
pub async fn accept_handshake(
    mut stream: TcpStream,
    me: &PeerIdentity,
    key: &ClusterKey,
    nonce: [u8; NONCE_BYTES],
    handshake_timeout: Duration,
    signing: Option<ReplicaSigning<'_>>,
) -> Result<Accepted, PeerError> {
    assert!(
        me.replica < me.replica_count,
        "identity outside its cluster"
    );
    let result = with_deadline(handshake_timeout, async {
        stream
            .set_nodelay(true)
            .map_err(|err| io_error(err.into()))?;
        let hello = read_handshake(&mut stream, HandshakeStep::Hello).await?;
        message::check_hello(&hello, me).map_err(|reason| PeerError::Refused { reason })?;
        let transcript = Transcript {
            nonce_listener: nonce,
            ..hello.transcript()
        };
        let mac = message::hello_mac_listener(key, &transcript);
        let reply = HandshakeFrame::new(HandshakeStep::HelloReply, &transcript, mac);
        write_handshake(&mut stream, &reply).await?;
        let confirm = read_handshake(&mut stream, HandshakeStep::HelloConfirm).await?;
        message::check_hello_confirm(&confirm, &transcript, key)?;
        if let Some(signing) = signing {
            let mut signature = [0u8; HANDSHAKE_SIGNATURE_BYTES];
            stream.read_exact(&mut signature).await.map_err(io_error)?;
            message::handshake_verify(signing.replicas, &transcript, &signature)
                .map_err(|reason| PeerError::Refused { reason })?;
        }
        Ok(transcript)
    })
    .await;
    let transcript = match result {
        Ok(transcript) => transcript,
        Err(err) => {
            // Dropping the stream closes it: a refused dialer learns nothing more.
            tracing::debug!(group = me.group, %err, "peer handshake refused");
            return Err(err);
        }
    };
    tracing::debug!(
        group = me.group,
        from = transcript.from,
        "peer connection accepted"
    );
    Ok(Accepted {
        stream,
        session_key: message::session_key(key, &transcript),
        group: me.group,
        from: transcript.from,
    })
}

/// An authenticated inbound connection that has not been given its body buffer yet
/// ([`accept_handshake`]).
#[derive(Debug)]
pub struct Accepted {
    stream: TcpStream,
    session_key: SessionKey,
    group: u32,
    from: u8,
}

impl Accepted {
    /// The authenticated peer that sends on this connection.
    pub fn from(&self) -> u8 {
        self.from
    }

    /// The connection's reading end, reading bodies of up to `body.len()` bytes into
    /// `body` (allocated by the caller once, and handed back by
    /// [`PeerReceiver::into_body`]).
    pub fn receiver(self, body: Vec<u8>) -> PeerReceiver {
        PeerReceiver {
            stream: self.stream,
            session_key: self.session_key,
            body,
            sequence_last: 0,
            group: self.group,
            from: self.from,
            broken: false,
        }
    }
}

/// A frame does not fit the send buffer now; nothing was written and no sequence used.
/// Flush and push again (the header is `Copy`: the caller still has it), or, if
/// `frame_bytes` exceeds the whole buffer, size it to at least
/// `PEER_HEADER_BYTES + message_body_bytes_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Bytes the frame needs, header included.
    pub frame_bytes: usize,
    /// Bytes free in the buffer now.
    pub free_bytes: usize,
}

/// The writing end of a peer connection (we dialed it): seals frames into a preallocated
/// buffer and writes the buffer in one go.
#[derive(Debug)]
pub struct PeerSender {
    stream: TcpStream,
    session_key: SessionKey,
    /// Sealed frames not yet written; never grows past `send_buffer_bytes`.
    buffer: Vec<u8>,
    send_buffer_bytes: usize,
    /// Sequence the next pushed frame gets (1 first).
    sequence_next: u64,
    group: u32,
    replica: u8,
    to: u8,
    broken: bool,
    /// The peer answered the handshake with the accepted key, not the cluster key.
    by_accepted_key: bool,
}

impl PeerSender {
    /// Whether the peer answered the handshake with the key accepted during a rotation
    /// ([`PeerKeys::accepted`]) rather than this node's cluster key: its cluster key is
    /// still (or already) that one.
    pub fn by_accepted_key(&self) -> bool {
        self.by_accepted_key
    }

    fn new(
        stream: TcpStream,
        session_key: SessionKey,
        me: &PeerIdentity,
        to: u8,
        send_buffer_bytes: usize,
    ) -> PeerSender {
        assert!(
            (PEER_HEADER_BYTES..=u32::MAX as usize).contains(&send_buffer_bytes),
            "a send buffer holds at least one header and at most 4 GiB"
        );
        PeerSender {
            stream,
            session_key,
            buffer: Vec::with_capacity(send_buffer_bytes),
            send_buffer_bytes,
            sequence_next: 1,
            group: me.group,
            replica: me.replica,
            to,
            broken: false,
            by_accepted_key: false,
        }
    }

    /// The replica this connection reaches.
    pub fn to(&self) -> u8 {
        self.to
    }

    /// Bytes pushed and not yet flushed.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Appends one frame: sets `body_bytes` from `body_parts`, then the next sequence and the
    /// MAC, and copies header and body parts into the buffer. The caller fills command,
    /// group, view, replica, status, fields and `checksum_body`
    /// (`percore_engine::message::body_checksum`, or the entry checksum for a Prepare).
    /// Returns [`Full`], writing nothing, if the frame does not fit. Never allocates.
    pub fn push(&mut self, header: PeerHeader, body_parts: &[&[u8]]) -> Result<(), Full> {
        debug_assert_eq!(header.magic, PEER_MAGIC);
        debug_assert!(header.command().is_ok());
        debug_assert_eq!(header.group, self.group);
        debug_assert_eq!(header.replica, self.replica);
        let body_bytes: usize = body_parts.iter().map(|part| part.len()).sum();
        let frame_bytes = PEER_HEADER_BYTES + body_bytes;
        let free_bytes = self.send_buffer_bytes - self.buffer.len();
        if frame_bytes > free_bytes {
            return Err(Full {
                frame_bytes,
                free_bytes,
            });
        }
        let mut sealed = header;
        // The buffer is at most `u32::MAX` bytes (checked in `new`), so this never fails.
        sealed.body_bytes = u32::try_from(body_bytes).expect("send buffer fits u32");
        message::seal(&mut sealed, &self.session_key, self.sequence_next);
        self.sequence_next += 1;
        // Within capacity: these copies never reallocate.
        self.buffer.extend_from_slice(sealed.as_bytes());
        for part in body_parts {
            self.buffer.extend_from_slice(part);
        }
        debug_assert!(self.buffer.len() <= self.send_buffer_bytes);
        debug_assert_eq!(self.buffer.capacity(), self.send_buffer_bytes);
        Ok(())
    }

    /// Writes every buffered frame with one write and empties the buffer. A peer that stops
    /// reading blocks this: bound it with a deadline in the caller.
    pub async fn flush(&mut self) -> Result<(), PeerError> {
        if self.broken {
            return Err(PeerError::Broken);
        }
        if self.buffer.is_empty() {
            return Ok(());
        }
        if let Err(err) = self.stream.write_all(&self.buffer).await {
            self.broken = true;
            return Err(io_error(err));
        }
        self.buffer.clear();
        Ok(())
    }
}

/// The reading end of a peer connection (the peer dialed us): verifies each frame's MAC,
/// sequence, group and sender before trusting its size, then its body checksum.
#[derive(Debug)]
pub struct PeerReceiver {
    stream: TcpStream,
    session_key: SessionKey,
    /// Holds one body; its length is the largest body accepted.
    body: Vec<u8>,
    /// Sequence of the last accepted frame (0 before the first).
    sequence_last: u64,
    group: u32,
    from: u8,
    broken: bool,
}

impl PeerReceiver {
    /// Closes the connection and hands back the body buffer it was given.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// The authenticated peer that sends on this connection.
    pub fn from(&self) -> u8 {
        self.from
    }

    /// Frames accepted so far.
    pub fn frames_received(&self) -> u64 {
        self.sequence_last
    }

    /// Reads the next frame: its verified header and body. On any error the connection is
    /// [`PeerError::Broken`] from then on; drop it.
    pub async fn recv(&mut self) -> Result<(PeerHeader, &[u8]), PeerError> {
        if self.broken {
            return Err(PeerError::Broken);
        }
        match self.recv_frame().await {
            Ok((header, body_bytes)) => Ok((header, &self.body[..body_bytes])),
            Err(err) => {
                self.broken = true;
                Err(err)
            }
        }
    }

    async fn recv_frame(&mut self) -> Result<(PeerHeader, usize), PeerError> {
        let mut header_bytes = [0u8; PEER_HEADER_BYTES];
        self.stream
            .read_exact(&mut header_bytes)
            .await
            .map_err(io_error)?;
        let header = message::decode_header(&header_bytes, self.body.len())?;
        message::verify(
            &header,
            &self.session_key,
            self.sequence_last + 1,
            self.group,
            self.from,
        )?;
        // Authentic and within `body_bytes_max` (checked by `decode_header`).
        let body_bytes = header.body_bytes as usize;
        let body = &mut self.body[..body_bytes];
        self.stream.read_exact(body).await.map_err(io_error)?;
        if !message::body_checksum_ok(&header, body) {
            return Err(MessageError::BadBodyChecksum.into());
        }
        self.sequence_last += 1;
        Ok((header, body_bytes))
    }
}
