//! Replica-to-replica messages: the 128-byte peer header, the handshake frames, and the keys
//! and MACs that authenticate both (docs/protocol.md sections 3 and 4).
//!
//! This module owns the byte layouts, the per-command field offsets, the keyed-BLAKE3
//! derivations (handshake MACs, the per-connection session key, the per-frame MAC) and the
//! sans-IO checks a receiver runs on them. It must never perform I/O, read a clock or draw
//! randomness: nonces come from the caller. Decoders never panic on bytes from the network,
//! and no size from the wire is trusted before the frame MAC has been checked ([`verify`]).
//!
//! # Header layout (little-endian)
//! | off | field | |
//! |---|---|---|
//! | 0 | `mac: u128` | [`frame_mac`] of bytes 16..128 |
//! | 16 | `checksum_body: u128` | see [`body_checksum_ok`] |
//! | 32 | `sequence: u64` | 1, 2, 3, … per connection |
//! | 40 | `magic: u32` | [`PEER_MAGIC`] |
//! | 44 | `version: u16` | [`PEER_VERSION`] |
//! | 46 | `command: u16` | [`Command`] |
//! | 48 | `group: u32` | the connection's group |
//! | 52 | `body_bytes: u32` | bytes after the header |
//! | 56 | `view: u64` | sender's view |
//! | 64 | `replica: u8` | sender |
//! | 65 | `status: u8` | sender's status |
//! | 66 | `reserved: [u8; 6]` | zero |
//! | 72 | `fields: [u8; 56]` | per command ([`field`]) |
//!
//! # Key derivation
//! `H(label, x) = BLAKE3-keyed(cluster_key, label ‖ x)`, where `x` is the fixed-length
//! (86-byte) [`Transcript`] encoding. The labels have distinct lengths and `x` a fixed one, so
//! no input to one derivation is an input to another: a listener's MAC is never a valid
//! dialer's MAC (no reflection), and neither is a session key.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use bytemuck::{Pod, Zeroable};

use crate::journal::{
    ENTRY_BODY_BYTES_MAX_LIMIT, ENTRY_HEADER_BYTES, JournalChecksum, decode_entry, journal_checksum,
};

/// Size of [`PeerHeader`] (bytes); the body follows immediately.
pub const PEER_HEADER_BYTES: usize = 128;
/// Size of [`HandshakeFrame`] (bytes).
pub const HANDSHAKE_FRAME_BYTES: usize = 128;
/// Offset of [`PeerHeader::fields`] in the header (bytes): field offsets are absolute.
pub const FIELDS_OFFSET: usize = 72;
/// Bytes of the header the frame MAC covers: everything after the MAC itself.
pub const MAC_COVERED_OFFSET: usize = 16;
/// `magic` of every peer message header: `b"PCRP"`.
pub const PEER_MAGIC: u32 = u32::from_le_bytes(*b"PCRP");
/// Peer message format version this code speaks.
pub const PEER_VERSION: u16 = 1;
/// `magic` of every handshake frame: `b"PCHS"`.
pub const HANDSHAKE_MAGIC: u32 = u32::from_le_bytes(*b"PCHS");
/// Handshake format version this code speaks.
pub const HANDSHAKE_VERSION: u16 = 2;
/// Largest message body any configuration needs (bytes): one entry of the largest batch,
/// header included (`message_body_bytes_max` in docs/protocol.md section 13).
pub const MESSAGE_BODY_BYTES_MAX_LIMIT: usize = ENTRY_HEADER_BYTES + ENTRY_BODY_BYTES_MAX_LIMIT;
/// Size of a cluster key and of a session key (bytes).
pub const KEY_BYTES: usize = 32;
/// Size of a handshake nonce (bytes).
pub const NONCE_BYTES: usize = 32;
/// Size of the [`Transcript`] encoding the handshake MACs and session key cover (bytes).
pub const TRANSCRIPT_BYTES: usize = 16 + 4 + 1 + 1 + NONCE_BYTES + NONCE_BYTES + 8 + 8;

/// Label of the listener's handshake MAC (HelloReply).
const LABEL_HELLO_LISTENER: &[u8] = b"percore hello listener v1";
/// Label of the dialer's handshake MAC (HelloConfirm).
const LABEL_HELLO_DIALER: &[u8] = b"percore hello dialer v1";
/// Label of the key of the one direction a connection carries (dialer to listener).
const LABEL_SESSION_DIALER_TO_LISTENER: &[u8] = b"percore session dialer->listener v1";
/// Domain of a dialer's handshake signature in BFT mode ([`handshake_sign`]): unlike every
/// vote (`"percore-bft-v1\0"`) and request statement, so no signature is valid as both.
const HANDSHAKE_SIGNATURE_DOMAIN: &[u8; 24] = b"percore-bft-peer-dial-v1";
/// Size of a dialer's handshake signature (ed25519), sent after its HelloConfirm in BFT
/// mode.
pub const HANDSHAKE_SIGNATURE_BYTES: usize = 64;

const _: () = assert!(size_of::<PeerHeader>() == PEER_HEADER_BYTES);
const _: () = assert!(align_of::<PeerHeader>() == 16);
const _: () = assert!(size_of::<HandshakeFrame>() == HANDSHAKE_FRAME_BYTES);
const _: () = assert!(FIELDS_OFFSET + 56 == PEER_HEADER_BYTES);
const _: () = assert!(TRANSCRIPT_BYTES == 102);
// `body_bytes` is a u32 on the wire.
const _: () = assert!(MESSAGE_BODY_BYTES_MAX_LIMIT <= u32::MAX as usize);
// Distinct label lengths keep `label ‖ transcript` injective across derivations.
const _: () = assert!(LABEL_HELLO_LISTENER.len() != LABEL_HELLO_DIALER.len());
const _: () = assert!(LABEL_HELLO_LISTENER.len() != LABEL_SESSION_DIALER_TO_LISTENER.len());
const _: () = assert!(LABEL_HELLO_DIALER.len() != LABEL_SESSION_DIALER_TO_LISTENER.len());
// The layouts are the in-memory layouts of `Pod`s; only little-endian hosts read them as written.
const _: () = assert!(cfg!(target_endian = "little"));

/// Why bytes are not an acceptable peer message or handshake frame.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageError {
    /// The frame does not start with the expected magic.
    #[error("bad magic")]
    BadMagic,
    /// A format version this code does not speak.
    #[error("unsupported version {version}")]
    BadVersion {
        /// Version found.
        version: u16,
    },
    /// A command number outside the table.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// Reserved or padding bytes are not zero.
    #[error("reserved bytes are not zero")]
    ReservedNotZero,
    /// The announced body is larger than the receiver accepts.
    #[error("body of {body_bytes} bytes exceeds the limit of {max}")]
    BodyTooLarge {
        /// Body size announced.
        body_bytes: u32,
        /// The receiver's limit (bytes).
        max: usize,
    },
    /// The MAC does not match: wrong key, or altered bytes.
    #[error("bad MAC")]
    BadMac,
    /// A sequence number other than the next one: a replayed, dropped or reordered frame.
    #[error("sequence {got} where {expected} was expected")]
    BadSequence {
        /// The next sequence number.
        expected: u64,
        /// Sequence number found.
        got: u64,
    },
    /// The frame names another replication group than the connection's.
    #[error("group {got} on a connection of group {expected}")]
    WrongGroup {
        /// The connection's group.
        expected: u32,
        /// Group found.
        got: u32,
    },
    /// The frame names another sender than the authenticated peer.
    #[error("replica {got} on a connection from replica {expected}")]
    WrongReplica {
        /// The authenticated peer.
        expected: u8,
        /// Replica found.
        got: u8,
    },
    /// The body does not match `checksum_body`, or its size does not match `body_bytes`.
    #[error("bad body checksum")]
    BadBodyChecksum,
    /// A handshake frame of another step than the one expected.
    #[error("handshake step {got} where {expected} was expected")]
    BadStep {
        /// Step expected.
        expected: u8,
        /// Step found.
        got: u8,
    },
    /// The peer was configured with another peers list (order included).
    #[error("peers list differs: ours has digest {expected:#x}, the peer's {got:#x}")]
    PeersMismatch {
        /// Our digest.
        expected: u64,
        /// The peer's.
        got: u64,
    },
    /// The peer was configured with other settings that decide results
    /// ([`Transcript::settings_digest`]).
    #[error(
        "settings that decide results differ (shard count, or the state machine's: for the \
         ledger transfers_max, credit_legs_max, session_clients_max): ours have digest \
         {expected:#x}, the peer's {got:#x}"
    )]
    SettingsMismatch {
        /// Our digest.
        expected: u64,
        /// The peer's.
        got: u64,
    },
    /// A handshake from another cluster.
    #[error("foreign cluster {got:#x}")]
    ForeignCluster {
        /// Cluster id found.
        got: u128,
    },
    /// A handshake from a replica outside `0..replica_count`, or from ourselves.
    #[error("unknown peer replica {from}")]
    UnknownPeer {
        /// Replica the dialer claims to be.
        from: u8,
    },
    /// A handshake addressed to another replica.
    #[error("handshake addressed to replica {to}")]
    WrongTarget {
        /// Replica the frame is addressed to.
        to: u8,
    },
    /// A handshake answer that does not echo the dialer's identity and nonce.
    #[error("handshake transcript mismatch")]
    TranscriptMismatch,
    /// BFT mode: the dialer's handshake signature is not replica `from`'s (every replica
    /// holds the cluster key; only `from` holds its signing key).
    #[error("handshake signature is not replica {from}'s")]
    BadSignature {
        /// Replica the dialer claims to be.
        from: u8,
    },
}

/// What a message asks or tells (docs/protocol.md section 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Leader → follower: one journal entry to make durable.
    Prepare = 1,
    /// Follower → leader: everything up to `op` is durable here.
    PrepareOk = 2,
    /// Leader → follower: the commit point.
    Commit = 3,
    /// Liveness, clock and progress sample.
    Ping = 4,
    /// Answer to [`Command::Ping`].
    Pong = 5,
    /// Asks for entries `op_min..=op_max`.
    RequestPrepare = 6,
    /// One entry, answering [`Command::RequestPrepare`].
    PrepareRepair = 7,
    /// Asks for entry headers `op_min..=op_max`.
    RequestHeaders = 8,
    /// Entry headers, answering [`Command::RequestHeaders`].
    Headers = 9,
    /// The asked ops are no longer retained.
    NotRetained = 10,
    /// Would you vote for `view_target`?
    PreVote = 11,
    /// Answer to [`Command::PreVote`].
    PreVoteReply = 12,
    /// Starts a view change to the header's view.
    StartViewChange = 13,
    /// Sends the voting log's tail to the new leader.
    DoViewChange = 14,
    /// The new leader installs its log.
    StartView = 15,
    /// Asks the leader to resend [`Command::StartView`].
    RequestStartView = 16,
    /// Asks for a snapshot chunk.
    RequestSnapshot = 17,
    /// One chunk of a snapshot.
    SnapshotChunk = 18,
    /// Internal records forwarded to the leader.
    Forward = 19,
    /// BFT mode (`docs/bft.md`): the body is one encoded `bft::Message`
    /// (`bft::codec`), whose statements carry their own ed25519 signatures; the frame MAC
    /// still authenticates the connection. Never sent in crash-fault mode.
    Bft = 20,
    /// BFT mode, between the replicas of one group: the body is one encoded
    /// `bft::xshard::XShardMessage::Vote` (an outputs statement with its own ed25519
    /// signature, `docs/bft.md` §14). Kept apart from [`Command::Bft`] because the core
    /// never sees it: the driver's outputs collector does.
    BftOutputs = 21,
}

impl Command {
    /// Every command, in wire order.
    pub const ALL: [Command; 21] = [
        Command::Prepare,
        Command::PrepareOk,
        Command::Commit,
        Command::Ping,
        Command::Pong,
        Command::RequestPrepare,
        Command::PrepareRepair,
        Command::RequestHeaders,
        Command::Headers,
        Command::NotRetained,
        Command::PreVote,
        Command::PreVoteReply,
        Command::StartViewChange,
        Command::DoViewChange,
        Command::StartView,
        Command::RequestStartView,
        Command::RequestSnapshot,
        Command::SnapshotChunk,
        Command::Forward,
        Command::Bft,
        Command::BftOutputs,
    ];

    /// Whether the body is one journal entry (header + body, unpadded), whose own header
    /// checksum is the message's `checksum_body`.
    pub const fn carries_entry(self) -> bool {
        matches!(self, Command::Prepare | Command::PrepareRepair)
    }
}

impl TryFrom<u16> for Command {
    type Error = MessageError;

    fn try_from(value: u16) -> Result<Command, MessageError> {
        match value {
            1..=21 => Ok(Command::ALL[usize::from(value) - 1]),
            _ => Err(MessageError::UnknownCommand(value)),
        }
    }
}

/// Absolute header offsets of the per-command fields (docs/protocol.md section 4), for
/// [`PeerHeader::field_u64`] and its siblings. Fields are `u64` unless the name says otherwise.
pub mod field {
    /// `Prepare`, `PrepareRepair`: the entry's op.
    pub const PREPARE_OP: usize = 72;
    /// `Prepare`, `PrepareRepair`: the leader's `commit_max`.
    pub const PREPARE_COMMIT: usize = 80;
    /// `Prepare`, `PrepareRepair`: the view of the log the entry was read from (the
    /// sender's `log_view` when it read it; a leader's Prepare: its view).
    pub const PREPARE_LOG_VIEW: usize = 88;

    /// `PrepareOk`: the sender's `op_durable` (cumulative).
    pub const PREPARE_OK_OP: usize = 72;
    /// `PrepareOk`: checksum of `op` (u128).
    pub const PREPARE_OK_CHECKSUM_U128: usize = 80;
    /// `PrepareOk`: the sender's `commit_min`.
    pub const PREPARE_OK_COMMIT_MIN: usize = 96;

    /// `Commit`: the leader's commit point.
    pub const COMMIT_COMMIT: usize = 72;
    /// `Commit`: the leader's `op_head`.
    pub const COMMIT_OP_HEAD: usize = 80;
    /// `Commit`: checksum of op `commit` (u128).
    pub const COMMIT_CHECKSUM_COMMIT_U128: usize = 88;

    /// `Ping`, `Pong`: sender clock (µs); echoed in `Pong`.
    pub const PING_TIME_US: usize = 72;
    /// `Ping`, `Pong`: sender's `op_durable`.
    pub const PING_OP_DURABLE: usize = 80;
    /// `Ping`, `Pong`: sender's `commit_min`.
    pub const PING_COMMIT_MIN: usize = 88;
    /// `Ping`, `Pong`: sender's `op_checkpoint`.
    pub const PING_OP_CHECKPOINT: usize = 96;
    /// `Ping`, `Pong`: lowest op the sender still retains.
    pub const PING_OP_RETAINED_MIN: usize = 104;
    /// `Ping`, `Pong`: sender's `log_view`.
    pub const PING_LOG_VIEW: usize = 112;

    /// `RequestPrepare`, `RequestHeaders`: first op asked.
    pub const REQUEST_OP_MIN: usize = 72;
    /// `RequestPrepare`, `RequestHeaders`: last op asked.
    pub const REQUEST_OP_MAX: usize = 80;
    /// `RequestPrepare`, `RequestHeaders`: checksum of `op_max` (u128).
    pub const REQUEST_CHECKSUM_OP_MAX_U128: usize = 88;

    /// `Headers`: first op sent.
    pub const HEADERS_OP_MIN: usize = 72;
    /// `Headers`: last op sent.
    pub const HEADERS_OP_MAX: usize = 80;

    /// `NotRetained`: first op asked.
    pub const NOT_RETAINED_OP_MIN: usize = 72;
    /// `NotRetained`: lowest op the sender retains.
    pub const NOT_RETAINED_OP_RETAINED_MIN: usize = 80;
    /// `NotRetained`: sender's `op_checkpoint`.
    pub const NOT_RETAINED_OP_CHECKPOINT: usize = 88;

    /// `PreVote`, `PreVoteReply`: the view asked about.
    pub const PRE_VOTE_VIEW_TARGET: usize = 72;
    /// `PreVote`: sender's `op_durable`.
    pub const PRE_VOTE_OP_DURABLE: usize = 80;
    /// `PreVote`: sender's `commit_max`.
    pub const PRE_VOTE_COMMIT_MAX: usize = 88;
    /// `PreVoteReply`: 1 if granted (u8).
    pub const PRE_VOTE_REPLY_GRANTED_U8: usize = 80;

    /// `DoViewChange`: sender's `log_view`.
    pub const DO_VIEW_CHANGE_LOG_VIEW: usize = 72;
    /// `DoViewChange`: sender's `op_durable`.
    pub const DO_VIEW_CHANGE_OP_DURABLE: usize = 80;
    /// `DoViewChange`: sender's `commit_max`.
    pub const DO_VIEW_CHANGE_COMMIT_MAX: usize = 88;
    /// `DoViewChange`: sender's `op_checkpoint`.
    pub const DO_VIEW_CHANGE_OP_CHECKPOINT: usize = 96;
    /// `DoViewChange`: headers in the body (u32).
    pub const DO_VIEW_CHANGE_HEADERS_COUNT_U32: usize = 104;
    /// `DoViewChange`: checksum of the last header (u128).
    pub const DO_VIEW_CHANGE_CHECKSUM_HEAD_U128: usize = 112;

    /// `StartView`: the new log's `op_head`.
    pub const START_VIEW_OP_HEAD: usize = 72;
    /// `StartView`: the new leader's `commit_max`.
    pub const START_VIEW_COMMIT_MAX: usize = 80;
    /// `StartView`: echo of a `RequestStartView` nonce, or 0.
    pub const START_VIEW_NONCE: usize = 88;
    /// `StartView`: the leader's `op_checkpoint`.
    pub const START_VIEW_OP_CHECKPOINT: usize = 96;
    /// `StartView`: headers in the body (u32).
    pub const START_VIEW_HEADERS_COUNT_U32: usize = 104;
    /// `StartView`: checksum of the last header (u128).
    pub const START_VIEW_CHECKSUM_HEAD_U128: usize = 112;

    /// `RequestStartView`: nonce echoed in the answer.
    pub const REQUEST_START_VIEW_NONCE: usize = 72;

    /// `RequestSnapshot`, `SnapshotChunk`: op of the checkpoint.
    pub const SNAPSHOT_CHECKPOINT_OP: usize = 72;
    /// `RequestSnapshot`, `SnapshotChunk`: byte offset in the snapshot.
    pub const SNAPSHOT_OFFSET: usize = 80;
    /// `RequestSnapshot`: snapshot asked for (u128; 0 = the latest).
    pub const REQUEST_SNAPSHOT_CHECKSUM_U128: usize = 88;
    /// `SnapshotChunk`: size of the whole snapshot (bytes).
    pub const SNAPSHOT_CHUNK_SNAPSHOT_BYTES: usize = 88;
    /// `SnapshotChunk`: checksum of the whole snapshot (u128).
    pub const SNAPSHOT_CHUNK_SNAPSHOT_CHECKSUM_U128: usize = 96;
    /// `SnapshotChunk`: checksum of the checkpoint's entry (u128).
    pub const SNAPSHOT_CHUNK_CHECKPOINT_CHECKSUM_U128: usize = 112;

    /// `Forward`: operation code of the records (u16).
    pub const FORWARD_OPERATION_U16: usize = 72;
    /// `Forward`: records in the body (u32).
    pub const FORWARD_RECORD_COUNT_U32: usize = 76;
    /// `Forward`: group the records come from (u32).
    pub const FORWARD_ORIGIN_GROUP_U32: usize = 80;
}

/// The message header as it lies on the wire. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct PeerHeader {
    /// [`frame_mac`] of bytes 16..128, under the connection's session key.
    pub mac: u128,
    /// See [`body_checksum_ok`]; 0 if there is no body.
    pub checksum_body: u128,
    /// Frame number on this connection: 1, 2, 3, …
    pub sequence: u64,
    /// [`PEER_MAGIC`].
    pub magic: u32,
    /// [`PEER_VERSION`].
    pub version: u16,
    /// [`Command`] as a number.
    pub command: u16,
    /// Replication group; equals the connection's.
    pub group: u32,
    /// Bytes of body after the header.
    pub body_bytes: u32,
    /// Sender's view.
    pub view: u64,
    /// Sender; equals the authenticated peer.
    pub replica: u8,
    /// Sender's status (normal 1, view change 2, recovering 3).
    pub status: u8,
    /// Must be zero.
    pub reserved: [u8; 6],
    /// Per-command fields ([`field`]); zero where unused.
    pub fields: [u8; 56],
}

impl PeerHeader {
    /// A header with magic and version set, no body, zero fields, not yet sealed.
    pub fn new(command: Command, group: u32, view: u64, replica: u8, status: u8) -> PeerHeader {
        PeerHeader {
            magic: PEER_MAGIC,
            version: PEER_VERSION,
            command: command as u16,
            group,
            view,
            replica,
            status,
            ..PeerHeader::zeroed()
        }
    }

    /// The command; `Err` only for a header that did not come through [`decode_header`].
    pub fn command(&self) -> Result<Command, MessageError> {
        Command::try_from(self.command)
    }

    /// The `N` bytes at absolute header offset `offset`.
    ///
    /// # Panics
    /// If `offset..offset + N` is not inside `fields` (a caller bug: offsets are constants).
    fn field_bytes<const N: usize>(&self, offset: usize) -> [u8; N] {
        let start = offset
            .checked_sub(FIELDS_OFFSET)
            .expect("field offsets start at 72");
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(&self.fields[start..start + N]);
        bytes
    }

    /// Writes `bytes` at absolute header offset `offset`. Panics like `field_bytes`.
    fn set_field_bytes<const N: usize>(&mut self, offset: usize, bytes: [u8; N]) {
        let start = offset
            .checked_sub(FIELDS_OFFSET)
            .expect("field offsets start at 72");
        self.fields[start..start + N].copy_from_slice(&bytes);
    }

    /// The `u8` field at absolute offset `offset` ([`field`]). Panics outside `fields`.
    pub fn field_u8(&self, offset: usize) -> u8 {
        self.field_bytes::<1>(offset)[0]
    }

    /// Sets the `u8` field at absolute offset `offset`. Panics outside `fields`.
    pub fn set_field_u8(&mut self, offset: usize, value: u8) {
        self.set_field_bytes(offset, [value]);
    }

    /// The `u16` field at absolute offset `offset` ([`field`]). Panics outside `fields`.
    pub fn field_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes(self.field_bytes(offset))
    }

    /// Sets the `u16` field at absolute offset `offset`. Panics outside `fields`.
    pub fn set_field_u16(&mut self, offset: usize, value: u16) {
        self.set_field_bytes(offset, value.to_le_bytes());
    }

    /// The `u32` field at absolute offset `offset` ([`field`]). Panics outside `fields`.
    pub fn field_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.field_bytes(offset))
    }

    /// Sets the `u32` field at absolute offset `offset`. Panics outside `fields`.
    pub fn set_field_u32(&mut self, offset: usize, value: u32) {
        self.set_field_bytes(offset, value.to_le_bytes());
    }

    /// The `u64` field at absolute offset `offset` ([`field`]). Panics outside `fields`.
    pub fn field_u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.field_bytes(offset))
    }

    /// Sets the `u64` field at absolute offset `offset`. Panics outside `fields`.
    pub fn set_field_u64(&mut self, offset: usize, value: u64) {
        self.set_field_bytes(offset, value.to_le_bytes());
    }

    /// The `u128` field at absolute offset `offset` ([`field`]). Panics outside `fields`.
    pub fn field_u128(&self, offset: usize) -> u128 {
        u128::from_le_bytes(self.field_bytes(offset))
    }

    /// Sets the `u128` field at absolute offset `offset`. Panics outside `fields`.
    pub fn set_field_u128(&mut self, offset: usize, value: u128) {
        self.set_field_bytes(offset, value.to_le_bytes());
    }

    /// The header as wire bytes.
    pub fn as_bytes(&self) -> &[u8; PEER_HEADER_BYTES] {
        bytemuck::cast_ref(self)
    }
}

/// The 256-bit secret shared by the nodes of one cluster. `Debug` never prints it.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_BYTES]);

impl ClusterKey {
    /// The key with these bytes (read from `--cluster-key-file`).
    pub const fn new(bytes: [u8; KEY_BYTES]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// Whether `other` holds the same bytes (compared in constant time).
    pub fn same_as(&self, other: &ClusterKey) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ClusterKey(<redacted>)")
    }
}

/// The keys a node authenticates its peer connections with: the cluster key, which it
/// answers with when a peer dials it and which seeds what must derive from a secret; and,
/// while the cluster's key is being rotated, one more key it accepts when it dials a peer
/// that answers with that one (the key before the rotation, or the next one). Two nodes
/// connect when each one's cluster key is among the other's keys (`docs/operations.md`
/// section 7 gives the rolling procedure).
#[derive(Debug, Clone)]
pub struct PeerKeys {
    /// The cluster key.
    pub current: ClusterKey,
    /// The other key accepted during a rotation.
    pub accepted: Option<ClusterKey>,
}

impl PeerKeys {
    /// Just the cluster key.
    pub fn new(current: ClusterKey) -> PeerKeys {
        PeerKeys {
            current,
            accepted: None,
        }
    }
}

/// The key of one connection's direction (dialer to listener), derived by [`session_key`].
/// `Debug` never prints it.
#[derive(Clone)]
pub struct SessionKey([u8; KEY_BYTES]);

impl SessionKey {
    /// A session key with these bytes (for tests and simulators that derive their own).
    pub const fn new(bytes: [u8; KEY_BYTES]) -> SessionKey {
        SessionKey(bytes)
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SessionKey(<redacted>)")
    }
}

/// What both ends of a handshake agree on; every handshake MAC and the session key cover it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transcript {
    /// The cluster (public; the key proves membership).
    pub cluster_id: u128,
    /// Replication group of the connection.
    pub group: u32,
    /// The dialer (sender of the connection's messages).
    pub from: u8,
    /// The listener (receiver of the connection's messages).
    pub to: u8,
    /// The dialer's fresh nonce.
    pub nonce_dialer: [u8; NONCE_BYTES],
    /// The listener's fresh nonce.
    pub nonce_listener: [u8; NONCE_BYTES],
    /// Digest of the cluster's peers list (addresses in replica order): two nodes
    /// configured with different lists refuse each other at the handshake.
    pub peers_digest: u64,
    /// Digest of the settings that decide results, which every replica of a group must
    /// share (shard count, and the state machine's own: for the ledger `transfers_max`,
    /// `credit_legs_max`, `session_clients_max`): replicas that differ refuse each other.
    pub settings_digest: u64,
}

impl Transcript {
    /// The fixed-length encoding: `cluster_id ‖ group ‖ from ‖ to ‖ nonce_dialer ‖
    /// nonce_listener ‖ peers_digest ‖ settings_digest`, integers little-endian.
    pub fn encode(&self) -> [u8; TRANSCRIPT_BYTES] {
        let mut bytes = [0u8; TRANSCRIPT_BYTES];
        bytes[0..16].copy_from_slice(&self.cluster_id.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.group.to_le_bytes());
        bytes[20] = self.from;
        bytes[21] = self.to;
        bytes[22..54].copy_from_slice(&self.nonce_dialer);
        bytes[54..86].copy_from_slice(&self.nonce_listener);
        bytes[86..94].copy_from_slice(&self.peers_digest.to_le_bytes());
        bytes[94..102].copy_from_slice(&self.settings_digest.to_le_bytes());
        bytes
    }
}

/// `BLAKE3-keyed(key, label ‖ transcript)`, all 256 bits.
fn derive(key: &ClusterKey, label: &[u8], transcript: &Transcript) -> [u8; KEY_BYTES] {
    let mut hasher = blake3::Hasher::new_keyed(&key.0);
    hasher.update(label);
    hasher.update(&transcript.encode());
    *hasher.finalize().as_bytes()
}

/// The first 128 bits of a 256-bit output, little-endian.
fn truncate_mac(output: &[u8; KEY_BYTES]) -> u128 {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&output[..16]);
    u128::from_le_bytes(bytes)
}

/// A 64-bit value every holder of `key` derives alike and nobody else can predict:
/// keyed BLAKE3 of `label` (e.g. the ledger's table hash seed).
pub fn derive_seed(key: &ClusterKey, label: &str) -> u64 {
    let hash = blake3::keyed_hash(&key.0, label.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

/// The listener's handshake MAC (HelloReply): `H("percore hello listener v1", T)`.
pub fn hello_mac_listener(key: &ClusterKey, transcript: &Transcript) -> u128 {
    truncate_mac(&derive(key, LABEL_HELLO_LISTENER, transcript))
}

/// The dialer's handshake MAC (HelloConfirm): `H("percore hello dialer v1", T)`.
pub fn hello_mac_dialer(key: &ClusterKey, transcript: &Transcript) -> u128 {
    truncate_mac(&derive(key, LABEL_HELLO_DIALER, transcript))
}

/// The key of the connection's one direction: `H("percore session dialer->listener v1", T)`.
pub fn session_key(key: &ClusterKey, transcript: &Transcript) -> SessionKey {
    SessionKey(derive(key, LABEL_SESSION_DIALER_TO_LISTENER, transcript))
}

/// What a dialer signs in BFT mode: [`HANDSHAKE_SIGNATURE_DOMAIN`] ‖ the completed
/// transcript (both nonces, so a signature is good for one connection only).
fn handshake_statement(transcript: &Transcript) -> [u8; 24 + TRANSCRIPT_BYTES] {
    let mut bytes = [0u8; 24 + TRANSCRIPT_BYTES];
    bytes[..24].copy_from_slice(HANDSHAKE_SIGNATURE_DOMAIN);
    bytes[24..].copy_from_slice(&transcript.encode());
    bytes
}

/// BFT mode: the dialer's proof that it is replica `transcript.from`, its ed25519
/// signature over `"percore-bft-peer-dial-v1" ‖ transcript`, sent after its HelloConfirm.
pub fn handshake_sign(
    key: &ed25519_dalek::SigningKey,
    transcript: &Transcript,
) -> [u8; HANDSHAKE_SIGNATURE_BYTES] {
    use ed25519_dalek::Signer as _;
    key.sign(&handshake_statement(transcript)).to_bytes()
}

/// BFT mode, the listener: whether `signature` is [`handshake_sign`]'s of `transcript` by
/// replica `transcript.from`, whose public key is `replicas[from]` (`verify_strict`, as
/// for votes).
pub fn handshake_verify(
    replicas: &[ed25519_dalek::VerifyingKey],
    transcript: &Transcript,
    signature: &[u8; HANDSHAKE_SIGNATURE_BYTES],
) -> Result<(), MessageError> {
    let from = transcript.from;
    let refused = MessageError::BadSignature { from };
    let key = replicas.get(usize::from(from)).ok_or(refused)?;
    let signature = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(&handshake_statement(transcript), &signature)
        .map_err(|_| refused)
}

/// The frame MAC of `header`: keyed BLAKE3 of header bytes 16..128 under `session_key`,
/// truncated to 128 bits. `header.mac` itself is not covered.
pub fn frame_mac(session_key: &SessionKey, header: &PeerHeader) -> u128 {
    let covered = &header.as_bytes()[MAC_COVERED_OFFSET..];
    truncate_mac(blake3::keyed_hash(&session_key.0, covered).as_bytes())
}

/// Whether `a == b`, in time that depends only on the lengths (which are public): every
/// byte is folded in before the answer, so a MAC check leaks no prefix length.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |folded, (x, y)| folded | (x ^ y));
    // Keep the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(difference) == 0
}

/// [`constant_time_eq`] on two MACs.
pub fn mac_eq(a: u128, b: u128) -> bool {
    constant_time_eq(&a.to_le_bytes(), &b.to_le_bytes())
}

/// Sets `header.sequence`, then `header.mac` under `session_key`. Everything else must be
/// final: the MAC covers it.
pub fn seal(header: &mut PeerHeader, session_key: &SessionKey, sequence: u64) {
    debug_assert!(sequence >= 1, "sequences start at 1");
    header.sequence = sequence;
    header.mac = frame_mac(session_key, header);
}

/// Decodes a header from the wire: magic, version, command, reserved bytes and
/// `body_bytes <= body_bytes_max`. Nothing in it is authentic until [`verify`] passes.
/// Never panics.
pub fn decode_header(
    bytes: &[u8; PEER_HEADER_BYTES],
    body_bytes_max: usize,
) -> Result<PeerHeader, MessageError> {
    // Copy out: the caller's buffer need not be aligned for the u128 fields.
    let header: PeerHeader = bytemuck::pod_read_unaligned(bytes);
    if header.magic != PEER_MAGIC {
        return Err(MessageError::BadMagic);
    }
    if header.version != PEER_VERSION {
        return Err(MessageError::BadVersion {
            version: header.version,
        });
    }
    Command::try_from(header.command)?;
    if header.reserved != [0; 6] {
        return Err(MessageError::ReservedNotZero);
    }
    if header.body_bytes as usize > body_bytes_max {
        return Err(MessageError::BodyTooLarge {
            body_bytes: header.body_bytes,
            max: body_bytes_max,
        });
    }
    Ok(header)
}

/// Authenticates `header` on a connection: the MAC under `session_key` (constant time,
/// first), then `sequence == expected_sequence`, the group and the sender.
pub fn verify(
    header: &PeerHeader,
    session_key: &SessionKey,
    expected_sequence: u64,
    expected_group: u32,
    expected_replica: u8,
) -> Result<(), MessageError> {
    if !mac_eq(header.mac, frame_mac(session_key, header)) {
        return Err(MessageError::BadMac);
    }
    if header.sequence != expected_sequence {
        return Err(MessageError::BadSequence {
            expected: expected_sequence,
            got: header.sequence,
        });
    }
    if header.group != expected_group {
        return Err(MessageError::WrongGroup {
            expected: expected_group,
            got: header.group,
        });
    }
    if header.replica != expected_replica {
        return Err(MessageError::WrongReplica {
            expected: expected_replica,
            got: header.replica,
        });
    }
    Ok(())
}

/// The `checksum_body` of a message whose body is not a journal entry: 0 for no body,
/// otherwise [`journal_checksum`] of the body.
pub fn body_checksum(body: &[u8]) -> JournalChecksum {
    if body.is_empty() {
        0
    } else {
        journal_checksum(body)
    }
}

/// Whether `body` is the body `header` announces: `body_bytes` long, and
/// - for `Prepare` and `PrepareRepair`: exactly one valid journal entry (header + body,
///   unpadded, checked with [`decode_entry`]) whose checksum is `checksum_body`;
/// - otherwise: [`body_checksum`] equals `checksum_body`.
///
/// Never panics.
pub fn body_checksum_ok(header: &PeerHeader, body: &[u8]) -> bool {
    if body.len() != header.body_bytes as usize {
        return false;
    }
    if Command::try_from(header.command).is_ok_and(Command::carries_entry) {
        let entry_body_bytes_max = body.len().saturating_sub(ENTRY_HEADER_BYTES);
        return match decode_entry(body, entry_body_bytes_max) {
            Ok(entry) => {
                ENTRY_HEADER_BYTES + entry.body.len() == body.len()
                    && mac_eq(entry.checksum, header.checksum_body)
            }
            Err(_) => false,
        };
    }
    mac_eq(body_checksum(body), header.checksum_body)
}

/// Which message of the three-step handshake a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HandshakeStep {
    /// Dialer → listener: identity and `nonce_dialer`.
    Hello = 1,
    /// Listener → dialer: `nonce_listener` and [`hello_mac_listener`].
    HelloReply = 2,
    /// Dialer → listener: [`hello_mac_dialer`].
    HelloConfirm = 3,
}

/// One handshake frame as it lies on the wire (128 bytes, little-endian). All three steps
/// carry the whole transcript so far (`nonce_listener` is zero in a Hello; `mac` is zero in a
/// Hello), so each side checks the other echoes what it sent.
///
/// | off | field |
/// |---|---|
/// | 0 | `magic: u32` ([`HANDSHAKE_MAGIC`]) |
/// | 4 | `version: u16` |
/// | 6 | `step: u8`, then one zero byte |
/// | 8 | `group: u32` |
/// | 12 | `from: u8` (dialer), `to: u8` (listener), two zero bytes |
/// | 16 | `cluster_id: u128` |
/// | 32 | `nonce_dialer: [u8; 32]` |
/// | 64 | `nonce_listener: [u8; 32]` |
/// | 96 | `mac: u128` |
/// | 112 | `peers_digest: u64` |
/// | 120 | `settings_digest: u64` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct HandshakeFrame {
    /// [`HANDSHAKE_MAGIC`].
    pub magic: u32,
    /// [`HANDSHAKE_VERSION`].
    pub version: u16,
    /// [`HandshakeStep`] as a number.
    pub step: u8,
    /// Must be zero.
    pub reserved_a: u8,
    /// Replication group of the connection.
    pub group: u32,
    /// The dialer.
    pub from: u8,
    /// The listener.
    pub to: u8,
    /// Must be zero.
    pub reserved_b: [u8; 2],
    /// The cluster.
    pub cluster_id: u128,
    /// The dialer's nonce.
    pub nonce_dialer: [u8; NONCE_BYTES],
    /// The listener's nonce (zero in a Hello).
    pub nonce_listener: [u8; NONCE_BYTES],
    /// The step's MAC (zero in a Hello).
    pub mac: u128,
    /// The sender's peers-list digest ([`Transcript::peers_digest`]).
    pub peers_digest: u64,
    /// The sender's settings digest ([`Transcript::settings_digest`]).
    pub settings_digest: u64,
}

impl HandshakeFrame {
    /// The frame of `step` carrying `transcript` and `mac`.
    pub fn new(step: HandshakeStep, transcript: &Transcript, mac: u128) -> HandshakeFrame {
        HandshakeFrame {
            magic: HANDSHAKE_MAGIC,
            version: HANDSHAKE_VERSION,
            step: step as u8,
            group: transcript.group,
            from: transcript.from,
            to: transcript.to,
            cluster_id: transcript.cluster_id,
            nonce_dialer: transcript.nonce_dialer,
            nonce_listener: transcript.nonce_listener,
            mac,
            peers_digest: transcript.peers_digest,
            settings_digest: transcript.settings_digest,
            ..HandshakeFrame::zeroed()
        }
    }

    /// The transcript this frame carries.
    pub fn transcript(&self) -> Transcript {
        Transcript {
            cluster_id: self.cluster_id,
            group: self.group,
            from: self.from,
            to: self.to,
            nonce_dialer: self.nonce_dialer,
            nonce_listener: self.nonce_listener,
            peers_digest: self.peers_digest,
            settings_digest: self.settings_digest,
        }
    }

    /// The frame as wire bytes.
    pub fn encode(&self) -> [u8; HANDSHAKE_FRAME_BYTES] {
        bytemuck::cast(*self)
    }

    /// Decodes a frame of step `expected`: magic, version, step and zero reserved bytes.
    /// Never panics.
    pub fn decode(
        bytes: &[u8; HANDSHAKE_FRAME_BYTES],
        expected: HandshakeStep,
    ) -> Result<HandshakeFrame, MessageError> {
        let frame: HandshakeFrame = bytemuck::pod_read_unaligned(bytes);
        if frame.magic != HANDSHAKE_MAGIC {
            return Err(MessageError::BadMagic);
        }
        if frame.version != HANDSHAKE_VERSION {
            return Err(MessageError::BadVersion {
                version: frame.version,
            });
        }
        if frame.step != expected as u8 {
            return Err(MessageError::BadStep {
                expected: expected as u8,
                got: frame.step,
            });
        }
        if frame.reserved_a != 0 || frame.reserved_b != [0; 2] {
            return Err(MessageError::ReservedNotZero);
        }
        Ok(frame)
    }
}

/// Who one end of a peer connection is: what a dialer puts in its Hello, and what a
/// listener checks a Hello against ([`check_hello`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The cluster (public); the cluster key proves membership.
    pub cluster_id: u128,
    /// Replication group (shard index) of the connection.
    pub group: u32,
    /// This replica.
    pub replica: u8,
    /// Replicas in the cluster; peers are `0..replica_count` other than `replica`.
    pub replica_count: u8,
    /// Digest of the cluster's peers list ([`Transcript::peers_digest`]).
    pub peers_digest: u64,
    /// Digest of the settings that decide results ([`Transcript::settings_digest`]).
    pub settings_digest: u64,
}

/// The listener's identity checks on a Hello: our cluster, peers list, settings and group,
/// a dialer in `0..replica_count` other than us, addressed to us, no listener nonce or MAC
/// yet.
pub fn check_hello(hello: &HandshakeFrame, me: &PeerIdentity) -> Result<(), MessageError> {
    let PeerIdentity {
        cluster_id,
        group,
        replica,
        replica_count,
        peers_digest,
        settings_digest,
    } = *me;
    debug_assert!(replica < replica_count);
    if hello.cluster_id != cluster_id {
        return Err(MessageError::ForeignCluster {
            got: hello.cluster_id,
        });
    }
    if hello.peers_digest != peers_digest {
        return Err(MessageError::PeersMismatch {
            expected: peers_digest,
            got: hello.peers_digest,
        });
    }
    if hello.settings_digest != settings_digest {
        return Err(MessageError::SettingsMismatch {
            expected: settings_digest,
            got: hello.settings_digest,
        });
    }
    if hello.group != group {
        return Err(MessageError::WrongGroup {
            expected: group,
            got: hello.group,
        });
    }
    if hello.from >= replica_count || hello.from == replica {
        return Err(MessageError::UnknownPeer { from: hello.from });
    }
    if hello.to != replica {
        return Err(MessageError::WrongTarget { to: hello.to });
    }
    if hello.nonce_listener != [0; NONCE_BYTES] || hello.mac != 0 {
        return Err(MessageError::ReservedNotZero);
    }
    Ok(())
}

/// The dialer's checks on a HelloReply to `sent` (its Hello's transcript): the reply echoes
/// it, and its MAC is the listener's. Returns the completed transcript.
pub fn check_hello_reply(
    reply: &HandshakeFrame,
    sent: &Transcript,
    key: &ClusterKey,
) -> Result<Transcript, MessageError> {
    let transcript = reply.transcript();
    let echoed = Transcript {
        nonce_listener: sent.nonce_listener,
        ..transcript
    };
    if echoed != *sent {
        return Err(MessageError::TranscriptMismatch);
    }
    if !mac_eq(reply.mac, hello_mac_listener(key, &transcript)) {
        return Err(MessageError::BadMac);
    }
    Ok(transcript)
}

/// [`check_hello_reply`] against each of `keys`: the cluster key, then the accepted one.
/// Returns the transcript and the key the listener answered with (the connection's key
/// from then on), and whether that was the accepted key.
pub fn check_hello_reply_keys<'k>(
    reply: &HandshakeFrame,
    sent: &Transcript,
    keys: &'k PeerKeys,
) -> Result<(Transcript, &'k ClusterKey, bool), MessageError> {
    match (
        check_hello_reply(reply, sent, &keys.current),
        &keys.accepted,
    ) {
        (Ok(transcript), _) => Ok((transcript, &keys.current, false)),
        (Err(MessageError::BadMac), Some(accepted)) => {
            check_hello_reply(reply, sent, accepted).map(|transcript| (transcript, accepted, true))
        }
        (Err(error), _) => Err(error),
    }
}

/// The listener's checks on a HelloConfirm: it echoes `transcript` (the one the listener
/// replied to), and its MAC is the dialer's.
pub fn check_hello_confirm(
    confirm: &HandshakeFrame,
    transcript: &Transcript,
    key: &ClusterKey,
) -> Result<(), MessageError> {
    if confirm.transcript() != *transcript {
        return Err(MessageError::TranscriptMismatch);
    }
    if !mac_eq(confirm.mac, hello_mac_dialer(key, transcript)) {
        return Err(MessageError::BadMac);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{EntryMeta, encode_entry, entry_bytes_padded};
    use proptest::prelude::*;

    const GROUP: u32 = 3;
    const SENDER: u8 = 1;
    const BODY_BYTES_MAX: usize = 1 << 20;

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::new([byte; KEY_BYTES])
    }

    fn transcript() -> Transcript {
        Transcript {
            cluster_id: (0xC1_u128 << 64) | 7,
            group: GROUP,
            from: SENDER,
            to: 2,
            nonce_dialer: [0xA5; NONCE_BYTES],
            nonce_listener: [0x5A; NONCE_BYTES],
            peers_digest: 0xD16E57,
            settings_digest: 0x5E77,
        }
    }

    fn sealed_ping(session: &SessionKey, sequence: u64) -> PeerHeader {
        let mut header = PeerHeader::new(Command::Ping, GROUP, 9, SENDER, 1);
        header.set_field_u64(field::PING_TIME_US, 123_456);
        header.set_field_u64(field::PING_LOG_VIEW, 8);
        seal(&mut header, session, sequence);
        header
    }

    /// A dialer's handshake signature verifies only as its own replica's, for this
    /// connection's transcript: every replica holds the cluster key, so this is what
    /// stops one from connecting in another's name.
    #[test]
    fn a_handshake_signature_is_the_dialers_for_this_transcript_only() {
        let keys: Vec<ed25519_dalek::SigningKey> = (0..4u8)
            .map(|replica| ed25519_dalek::SigningKey::from_bytes(&[replica + 1; 32]))
            .collect();
        let public: Vec<_> = keys.iter().map(|key| key.verifying_key()).collect();
        let sent = transcript();
        let signature = handshake_sign(&keys[usize::from(SENDER)], &sent);
        assert_eq!(handshake_verify(&public, &sent, &signature), Ok(()));
        // Replica 3 claiming to be the sender: signed with its own key.
        let forged = handshake_sign(&keys[3], &sent);
        assert_eq!(
            handshake_verify(&public, &sent, &forged),
            Err(MessageError::BadSignature { from: SENDER })
        );
        // A signature replayed on another connection (other nonces) or another claim.
        let other_nonce = Transcript {
            nonce_listener: [0x11; NONCE_BYTES],
            ..sent
        };
        assert!(handshake_verify(&public, &other_nonce, &signature).is_err());
        let other_claim = Transcript { from: 0, ..sent };
        assert!(handshake_verify(&public, &other_claim, &signature).is_err());
        // A replica index without a key.
        let outside = Transcript { from: 9, ..sent };
        assert_eq!(
            handshake_verify(&public, &outside, &signature),
            Err(MessageError::BadSignature { from: 9 })
        );
    }

    #[test]
    fn header_layout_matches_the_protocol_table() {
        let mut header = PeerHeader::new(Command::Forward, 0x0403_0201, 0x11, 5, 2);
        header.mac = 1;
        header.checksum_body = 2;
        header.sequence = 3;
        header.body_bytes = 0x0807_0605;
        header.set_field_u16(field::FORWARD_OPERATION_U16, 0xBEEF);
        header.set_field_u32(field::FORWARD_RECORD_COUNT_U32, 0xCAFE_F00D);
        header.set_field_u32(field::FORWARD_ORIGIN_GROUP_U32, 42);
        let bytes = header.as_bytes();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[16], 2);
        assert_eq!(bytes[32], 3);
        assert_eq!(&bytes[40..44], b"PCRP");
        assert_eq!(&bytes[44..46], &1u16.to_le_bytes());
        assert_eq!(&bytes[46..48], &19u16.to_le_bytes());
        assert_eq!(&bytes[48..52], &[1, 2, 3, 4]);
        assert_eq!(&bytes[52..56], &[5, 6, 7, 8]);
        assert_eq!(bytes[56], 0x11);
        assert_eq!(bytes[64], 5);
        assert_eq!(bytes[65], 2);
        assert_eq!(&bytes[72..74], &0xBEEFu16.to_le_bytes());
        assert_eq!(&bytes[76..80], &0xCAFE_F00Du32.to_le_bytes());
        assert_eq!(bytes[80], 42);
        assert_eq!(header.field_u16(field::FORWARD_OPERATION_U16), 0xBEEF);
        assert_eq!(
            header.field_u32(field::FORWARD_RECORD_COUNT_U32),
            0xCAFE_F00D
        );
    }

    #[test]
    fn field_accessors_round_trip_at_every_named_offset() {
        let mut header = PeerHeader::new(Command::PrepareOk, GROUP, 1, SENDER, 1);
        header.set_field_u64(field::PREPARE_OK_OP, 77);
        header.set_field_u128(field::PREPARE_OK_CHECKSUM_U128, u128::MAX - 5);
        header.set_field_u64(field::PREPARE_OK_COMMIT_MIN, 70);
        assert_eq!(header.field_u64(field::PREPARE_OK_OP), 77);
        assert_eq!(
            header.field_u128(field::PREPARE_OK_CHECKSUM_U128),
            u128::MAX - 5
        );
        assert_eq!(header.field_u64(field::PREPARE_OK_COMMIT_MIN), 70);
        // The last field ends exactly at the header's end.
        header.set_field_u128(field::START_VIEW_CHECKSUM_HEAD_U128, 9);
        assert_eq!(header.field_u128(field::START_VIEW_CHECKSUM_HEAD_U128), 9);
        header.set_field_u8(field::PRE_VOTE_REPLY_GRANTED_U8, 1);
        assert_eq!(header.field_u8(field::PRE_VOTE_REPLY_GRANTED_U8), 1);
    }

    #[test]
    #[should_panic(expected = "field offsets start at 72")]
    fn field_offsets_below_the_fields_panic() {
        PeerHeader::zeroed().field_u64(64);
    }

    #[test]
    fn command_numbers_match_the_protocol_table() {
        for (index, command) in Command::ALL.iter().enumerate() {
            assert_eq!(*command as u16, index as u16 + 1);
            assert_eq!(Command::try_from(*command as u16), Ok(*command));
        }
        assert_eq!(Command::Forward as u16, 19);
        assert_eq!(Command::Bft as u16, 20);
        assert_eq!(Command::BftOutputs as u16, 21);
        assert_eq!(Command::try_from(0), Err(MessageError::UnknownCommand(0)));
        assert_eq!(Command::try_from(22), Err(MessageError::UnknownCommand(22)));
    }

    #[test]
    fn sealed_header_round_trips() {
        let session = session_key(&key(1), &transcript());
        let header = sealed_ping(&session, 1);
        let decoded = decode_header(header.as_bytes(), BODY_BYTES_MAX).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(verify(&decoded, &session, 1, GROUP, SENDER), Ok(()));
        assert_eq!(decoded.command(), Ok(Command::Ping));
        assert_eq!(decoded.field_u64(field::PING_TIME_US), 123_456);
    }

    #[test]
    fn every_single_bit_flip_of_a_sealed_header_is_rejected() {
        let session = session_key(&key(1), &transcript());
        let header = sealed_ping(&session, 1);
        for bit in 0..PEER_HEADER_BYTES * 8 {
            let mut bytes = *header.as_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            let flipped: PeerHeader = bytemuck::pod_read_unaligned(&bytes);
            assert_eq!(
                verify(&flipped, &session, 1, GROUP, SENDER),
                Err(MessageError::BadMac),
                "bit {bit}"
            );
            // The receiver's pipeline rejects it too, whichever check comes first.
            let accepted = decode_header(&bytes, BODY_BYTES_MAX)
                .is_ok_and(|decoded| verify(&decoded, &session, 1, GROUP, SENDER).is_ok());
            assert!(!accepted, "bit {bit}");
        }
    }

    #[test]
    fn wrong_key_replay_group_and_sender_are_rejected() {
        let session = session_key(&key(1), &transcript());
        let header = sealed_ping(&session, 5);
        let other = session_key(&key(2), &transcript());
        assert_eq!(
            verify(&header, &other, 5, GROUP, SENDER),
            Err(MessageError::BadMac)
        );
        // Another connection (other nonces) has another key: frames do not splice.
        let mut spliced = transcript();
        spliced.nonce_listener[0] ^= 1;
        assert_eq!(
            verify(&header, &session_key(&key(1), &spliced), 5, GROUP, SENDER),
            Err(MessageError::BadMac)
        );
        // A replay arrives after its sequence was consumed.
        assert_eq!(
            verify(&header, &session, 6, GROUP, SENDER),
            Err(MessageError::BadSequence {
                expected: 6,
                got: 5
            })
        );
        assert_eq!(
            verify(&header, &session, 5, GROUP + 1, SENDER),
            Err(MessageError::WrongGroup {
                expected: GROUP + 1,
                got: GROUP
            })
        );
        assert_eq!(
            verify(&header, &session, 5, GROUP, 0),
            Err(MessageError::WrongReplica {
                expected: 0,
                got: SENDER
            })
        );
    }

    #[test]
    fn decode_header_checks_every_field_it_can() {
        let session = session_key(&key(1), &transcript());
        let good = sealed_ping(&session, 1);
        let reject = |edit: &dyn Fn(&mut PeerHeader), max: usize| {
            let mut header = good;
            edit(&mut header);
            decode_header(header.as_bytes(), max).unwrap_err()
        };
        assert_eq!(reject(&|h| h.magic ^= 1, 0), MessageError::BadMagic);
        assert_eq!(
            reject(&|h| h.version = 2, 0),
            MessageError::BadVersion { version: 2 }
        );
        assert_eq!(
            reject(&|h| h.command = 99, 0),
            MessageError::UnknownCommand(99)
        );
        assert_eq!(
            reject(&|h| h.reserved[5] = 1, 0),
            MessageError::ReservedNotZero
        );
        assert_eq!(
            reject(&|h| h.body_bytes = 101, 100),
            MessageError::BodyTooLarge {
                body_bytes: 101,
                max: 100
            }
        );
    }

    #[test]
    fn handshake_macs_and_session_key_are_separated_by_label() {
        let cluster_key = key(7);
        let t = transcript();
        let listener = hello_mac_listener(&cluster_key, &t);
        let dialer = hello_mac_dialer(&cluster_key, &t);
        assert_ne!(listener, dialer);
        // Reflection: the listener's MAC sent back as the dialer's is refused.
        let reflected = HandshakeFrame::new(HandshakeStep::HelloConfirm, &t, listener);
        assert_eq!(
            check_hello_confirm(&reflected, &t, &cluster_key),
            Err(MessageError::BadMac)
        );
        let confirm = HandshakeFrame::new(HandshakeStep::HelloConfirm, &t, dialer);
        assert_eq!(check_hello_confirm(&confirm, &t, &cluster_key), Ok(()));
        // Fresh nonces change everything.
        let mut fresh = t;
        fresh.nonce_dialer[31] ^= 0x80;
        assert_ne!(hello_mac_dialer(&cluster_key, &fresh), dialer);
        assert_ne!(
            session_key(&cluster_key, &fresh).0,
            session_key(&cluster_key, &t).0
        );
        assert_ne!(truncate_mac(&session_key(&cluster_key, &t).0), listener);
        assert_ne!(truncate_mac(&session_key(&cluster_key, &t).0), dialer);
    }

    /// A rolling key rotation: two nodes connect, in either direction, exactly when each
    /// one's cluster key is among the other's keys; the connection runs under the key the
    /// listener answered with, which the dialer reports when it is its accepted one.
    #[test]
    fn a_dialer_accepts_a_listener_answering_with_its_accepted_key() {
        let (old, new) = (key(1), key(2));
        let keys = |current: &ClusterKey, accepted: Option<&ClusterKey>| PeerKeys {
            current: current.clone(),
            accepted: accepted.cloned(),
        };
        let t = transcript();
        let sent = Transcript {
            nonce_listener: [0; NONCE_BYTES],
            ..t
        };
        // (dialer's keys, listener's cluster key, outcome: by the accepted key or refused)
        let cases = [
            (keys(&old, None), &old, Some(false)),
            (keys(&old, Some(&new)), &old, Some(false)),
            (keys(&old, Some(&new)), &new, Some(true)),
            (keys(&new, Some(&old)), &old, Some(true)),
            (keys(&new, None), &old, None),
            (keys(&new, Some(&key(3))), &old, None),
        ];
        for (index, (dialer, listener, outcome)) in cases.into_iter().enumerate() {
            let reply = HandshakeFrame::new(
                HandshakeStep::HelloReply,
                &t,
                hello_mac_listener(listener, &t),
            );
            match (check_hello_reply_keys(&reply, &sent, &dialer), outcome) {
                (Ok((transcript, used, accepted)), Some(expected)) => {
                    assert_eq!((transcript, accepted), (t, expected), "case {index}");
                    assert!(used.same_as(listener), "case {index}");
                    // The listener checks the confirmation with its own cluster key.
                    let confirm = HandshakeFrame::new(
                        HandshakeStep::HelloConfirm,
                        &t,
                        hello_mac_dialer(used, &t),
                    );
                    assert_eq!(check_hello_confirm(&confirm, &t, listener), Ok(()));
                }
                (Err(error), None) => assert_eq!(error, MessageError::BadMac, "case {index}"),
                (got, expected) => panic!("case {index}: {got:?}, expected {expected:?}"),
            }
        }
        assert!(old.same_as(&key(1)) && !old.same_as(&new));
    }

    #[test]
    fn handshake_frames_round_trip_and_check_identities() {
        let cluster_key = key(7);
        let t = transcript();
        let sent = Transcript {
            nonce_listener: [0; NONCE_BYTES],
            ..t
        };
        let hello = HandshakeFrame::new(HandshakeStep::Hello, &sent, 0);
        let decoded = HandshakeFrame::decode(&hello.encode(), HandshakeStep::Hello).unwrap();
        assert_eq!(decoded, hello);
        // Replica 2 of 3 listens.
        let me = PeerIdentity {
            cluster_id: t.cluster_id,
            group: GROUP,
            replica: 2,
            replica_count: 3,
            peers_digest: t.peers_digest,
            settings_digest: t.settings_digest,
        };
        assert_eq!(check_hello(&decoded, &me), Ok(()));
        assert_eq!(
            check_hello(
                &decoded,
                &PeerIdentity {
                    cluster_id: t.cluster_id ^ 1,
                    ..me
                }
            ),
            Err(MessageError::ForeignCluster { got: t.cluster_id })
        );
        assert!(matches!(
            check_hello(
                &decoded,
                &PeerIdentity {
                    group: GROUP + 1,
                    ..me
                }
            ),
            Err(MessageError::WrongGroup { .. })
        ));
        // A node configured with another peers list.
        assert_eq!(
            check_hello(
                &decoded,
                &PeerIdentity {
                    peers_digest: t.peers_digest ^ 1,
                    ..me
                }
            ),
            Err(MessageError::PeersMismatch {
                expected: t.peers_digest ^ 1,
                got: t.peers_digest
            })
        );
        // A node configured with other settings that decide results.
        assert_eq!(
            check_hello(
                &decoded,
                &PeerIdentity {
                    settings_digest: 1,
                    ..me
                }
            ),
            Err(MessageError::SettingsMismatch {
                expected: 1,
                got: t.settings_digest
            })
        );
        // The dialer claims to be us, or a replica outside the cluster.
        assert_eq!(
            check_hello(&decoded, &PeerIdentity { replica: 1, ..me }),
            Err(MessageError::UnknownPeer { from: 1 })
        );
        assert_eq!(
            check_hello(
                &decoded,
                &PeerIdentity {
                    replica: 0,
                    replica_count: 1,
                    ..me
                }
            ),
            Err(MessageError::UnknownPeer { from: 1 })
        );
        assert_eq!(
            check_hello(&decoded, &PeerIdentity { replica: 0, ..me }),
            Err(MessageError::WrongTarget { to: 2 })
        );
        assert_eq!(
            HandshakeFrame::decode(&hello.encode(), HandshakeStep::HelloReply),
            Err(MessageError::BadStep {
                expected: 2,
                got: 1
            })
        );
        let mut padded = hello.encode();
        padded[15] = 1;
        assert_eq!(
            HandshakeFrame::decode(&padded, HandshakeStep::Hello),
            Err(MessageError::ReservedNotZero)
        );

        let reply = HandshakeFrame::new(
            HandshakeStep::HelloReply,
            &t,
            hello_mac_listener(&cluster_key, &t),
        );
        assert_eq!(check_hello_reply(&reply, &sent, &cluster_key), Ok(t));
        assert_eq!(
            check_hello_reply(&reply, &sent, &key(8)),
            Err(MessageError::BadMac)
        );
        let mut other_nonce = sent;
        other_nonce.nonce_dialer[0] ^= 1;
        assert_eq!(
            check_hello_reply(&reply, &other_nonce, &cluster_key),
            Err(MessageError::TranscriptMismatch)
        );
    }

    #[test]
    fn keys_never_appear_in_debug_output() {
        let text = format!("{:?} {:?}", key(0xAB), SessionKey::new([0xAB; KEY_BYTES]));
        assert!(!text.contains("171") && text.contains("redacted"), "{text}");
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(mac_eq(5, 5));
        assert!(!mac_eq(5, 5 | (1 << 127)));
    }

    #[test]
    fn body_checksum_covers_plain_bodies() {
        let body = [7u8; 256];
        let mut header = PeerHeader::new(Command::Headers, GROUP, 1, SENDER, 1);
        header.body_bytes = body.len() as u32;
        header.checksum_body = body_checksum(&body);
        assert!(body_checksum_ok(&header, &body));
        let mut corrupt = body;
        corrupt[100] ^= 1;
        assert!(!body_checksum_ok(&header, &corrupt));
        assert!(!body_checksum_ok(&header, &body[..255]));
        // No body: the checksum is 0.
        let empty = PeerHeader::new(Command::Ping, GROUP, 1, SENDER, 1);
        assert!(body_checksum_ok(&empty, &[]));
    }

    #[test]
    fn body_checksum_of_a_prepare_is_the_entry_checksum() {
        let records = [3u8; 2 * 128];
        let meta = EntryMeta {
            shard: GROUP,
            view: 1,
            op: 4,
            operation: 1,
            entry_count: 2,
            record_bytes: 128,
            request_count: 0,
        };
        let mut padded = vec![0u8; entry_bytes_padded(records.len())];
        let (_, checksum) = encode_entry(&mut padded, &meta, &records, 99);
        let entry = &padded[..ENTRY_HEADER_BYTES + records.len()];
        let mut header = PeerHeader::new(Command::Prepare, GROUP, 1, SENDER, 1);
        header.body_bytes = entry.len() as u32;
        header.checksum_body = checksum;
        assert!(body_checksum_ok(&header, entry));
        // The plain body checksum is not what a Prepare carries.
        let mut plain = header;
        plain.checksum_body = body_checksum(entry);
        assert!(!body_checksum_ok(&plain, entry));
        // A corrupt entry body or a padded entry is refused.
        let mut corrupt = entry.to_vec();
        corrupt[ENTRY_HEADER_BYTES + 5] ^= 1;
        assert!(!body_checksum_ok(&header, &corrupt));
        let mut padded_header = header;
        padded_header.body_bytes = (entry.len() + 128) as u32;
        assert!(!body_checksum_ok(
            &padded_header,
            &padded[..entry.len() + 128]
        ));
        // No body at all.
        let mut empty = header;
        empty.body_bytes = 0;
        assert!(!body_checksum_ok(&empty, &[]));
    }

    proptest! {
        #[test]
        fn decode_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 128)) {
            let bytes: [u8; PEER_HEADER_BYTES] = bytes.try_into().unwrap();
            if let Ok(header) = decode_header(&bytes, BODY_BYTES_MAX) {
                let session = SessionKey::new([1; KEY_BYTES]);
                prop_assert!(verify(&header, &session, 1, GROUP, SENDER).is_err());
                let _ = body_checksum_ok(&header, &[]);
            }
            let _ = HandshakeFrame::decode(&bytes, HandshakeStep::Hello);
        }

        #[test]
        fn body_checksum_ok_never_panics(
            command in 1u16..=20,
            body in proptest::collection::vec(any::<u8>(), 0..600),
            checksum_body in any::<u128>(),
        ) {
            let mut header = PeerHeader::new(Command::try_from(command).unwrap(), GROUP, 1, SENDER, 1);
            header.body_bytes = body.len() as u32;
            header.checksum_body = checksum_body;
            let _ = body_checksum_ok(&header, &body);
        }
    }
}
