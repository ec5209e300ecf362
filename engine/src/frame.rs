//! The client protocol frame: a fixed 64-byte header followed by a body of fixed-size records.
//!
//! This module owns the frame layout, its limits and its sans-IO encoder and decoder; the
//! `net` crate moves the bytes. Decoding validates everything that can be validated without
//! the state machine (magic, version, kind, operation, reserved bytes, sizes, both checksums)
//! and turns every problem into a typed [`FrameError`] with a wire [`ErrorCode`]. It must never
//! panic or allocate on bytes from the network, and never trust a size field before the
//! header checksum has been checked.
//!
//! # Layout (little-endian)
//! | offset | field | |
//! |---|---|---|
//! | 0 | `magic: u32` | `b"PCOR"` |
//! | 4 | `version: u16` | [`FRAME_VERSION`] |
//! | 6 | `kind: u16` | [`Kind`] |
//! | 8 | `operation: u16` | [`Operation`] |
//! | 10 | `shard: u16` | shard the request is addressed to |
//! | 12 | `body_bytes: u32` | bytes after the header |
//! | 16 | `client_id: u128` | |
//! | 32 | `request_number: u64` | |
//! | 40 | `record_count: u32` | `body_bytes / record size` |
//! | 44 | `error_code: u32` | [`ErrorCode`], nonzero only in an `ErrorReply` |
//! | 48 | `checksum_body: u32` | CRC-32C of the body |
//! | 52 | `checksum_header: u32` | CRC-32C of the header with this field zero |
//! | 56 | `reserved: [u8; 8]` | zero |
//!
//! A `SignedRequest` (BFT mode, `docs/bft.md` §12) is a request whose body ends with a
//! [`SIGNATURE_TRAILER_BYTES`]-byte ed25519 signature after the records: `body_bytes =
//! record_count * record size + 64`, the body checksum covering both.
//!
//! A server that cannot decode a header cannot trust its `client_id` either: it closes the
//! connection. Errors found after the header is valid (body checksum, semantics) are answered
//! with an `ErrorReply` echoing the request's envelope.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use bytemuck::{Pod, Zeroable};

use crate::checksum::frame_checksum;
use crate::limits::BATCH_ENTRIES_MAX_LIMIT;
use crate::record::{RECORD_BYTES, RecordResult, wire_enum};

/// First four bytes of every frame: `b"PCOR"`.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"PCOR");
/// Protocol version this code speaks.
pub const FRAME_VERSION: u16 = 1;
/// Size of [`FrameHeader`] (bytes).
pub const FRAME_HEADER_BYTES: usize = 64;
/// Default largest body (bytes): 8,192 records of 128 bytes.
pub const FRAME_BODY_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default largest frame, header included (bytes).
pub const FRAME_BYTES_MAX_DEFAULT: usize = FRAME_HEADER_BYTES + FRAME_BODY_BYTES_MAX_DEFAULT;
/// Size of an id in a lookup request (bytes).
pub const LOOKUP_ID_BYTES: usize = size_of::<u128>();
/// Bytes after the records of a `SignedRequest`: the client's ed25519 signature.
pub const SIGNATURE_TRAILER_BYTES: usize = 64;

const _: () = assert!(size_of::<FrameHeader>() == FRAME_HEADER_BYTES);
const _: () = assert!(FRAME_BODY_BYTES_MAX_DEFAULT.is_multiple_of(RECORD_BYTES));
// A maximal request fits one batch of the largest configurable size.
const _: () = assert!(FRAME_BODY_BYTES_MAX_DEFAULT / RECORD_BYTES <= BATCH_ENTRIES_MAX_LIMIT);
// `body_bytes` is a u32 on the wire.
const _: () = assert!(FRAME_BODY_BYTES_MAX_DEFAULT <= u32::MAX as usize);

/// The frame header as it lies on the wire. See the module documentation for the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct FrameHeader {
    /// [`FRAME_MAGIC`].
    pub magic: u32,
    /// [`FRAME_VERSION`].
    pub version: u16,
    /// [`Kind`] code.
    pub kind: u16,
    /// [`Operation`] code.
    pub operation: u16,
    /// Shard the request is addressed to (echoed in replies).
    pub shard: u16,
    /// Bytes of body following the header.
    pub body_bytes: u32,
    /// The client's identity (echoed in replies).
    pub client_id: u128,
    /// The client's request counter (echoed in replies).
    pub request_number: u64,
    /// Records in the body.
    pub record_count: u32,
    /// [`ErrorCode`] in an `ErrorReply`; zero otherwise.
    pub error_code: u32,
    /// [`frame_checksum`] of the body.
    pub checksum_body: u32,
    /// [`frame_checksum`] of the header with this field zero.
    pub checksum_header: u32,
    /// Must be zero.
    pub reserved: [u8; 8],
}

wire_enum! {
    /// What a frame is.
    pub enum Kind: u16 {
        /// Client to shard.
        Request = 1,
        /// Shard to client: the request's results.
        Reply = 2,
        /// Shard to client: the request was refused as a whole; see `error_code`.
        ErrorReply = 3,
        /// Client to shard, BFT mode: a request whose body ends with the client's
        /// signature ([`SIGNATURE_TRAILER_BYTES`]) after the records.
        SignedRequest = 4,
    }
}

wire_enum! {
    /// What a client asks for. Code 0 is never valid, so a zeroed header is rejected.
    pub enum Operation: u16 {
        /// Liveness check; no records either way.
        Ping = 1,
        /// Request: [`crate::record::Account`]s. Reply: one [`RecordResult`] per record.
        CreateAccounts = 2,
        /// Request: [`crate::record::Transfer`]s. Reply: one [`RecordResult`] per record.
        CreateTransfers = 3,
        /// Request: account ids (`u128`). Reply: the accounts found.
        LookupAccounts = 4,
        /// Request: transfer ids (`u128`). Reply: the transfers found.
        LookupTransfers = 5,
    }
}

impl Operation {
    /// Size of one request record (bytes); 0 when the request carries none.
    pub const fn request_record_bytes(self) -> usize {
        match self {
            Operation::Ping => 0,
            Operation::CreateAccounts | Operation::CreateTransfers => RECORD_BYTES,
            Operation::LookupAccounts | Operation::LookupTransfers => LOOKUP_ID_BYTES,
        }
    }

    /// Size of one reply record (bytes); 0 when the reply carries none.
    pub const fn reply_record_bytes(self) -> usize {
        match self {
            Operation::Ping => 0,
            Operation::CreateAccounts | Operation::CreateTransfers => size_of::<RecordResult>(),
            Operation::LookupAccounts | Operation::LookupTransfers => RECORD_BYTES,
        }
    }
}

/// The operation code every receiver answers without records: a liveness check.
pub const OPERATION_PING: u16 = Operation::Ping as u16;

/// What a frame's operation code means to the side that decodes it: the size of one record
/// of a `kind` frame for `operation`, or `None` when the operation is unknown (the frame is
/// refused with [`FrameError::UnknownOperation`]). The frame layout is shared by every state
/// machine; the operation codes and record sizes belong to the machine.
pub trait FrameSchema {
    /// Record size of a request or reply of `operation` (bytes), or `None` if unknown.
    fn record_bytes(&self, kind: Kind, operation: u16) -> Option<usize>;
}

/// The reference ledger's client protocol: the codes of [`Operation`].
#[derive(Clone, Copy, Debug, Default)]
pub struct LedgerSchema;

impl FrameSchema for LedgerSchema {
    fn record_bytes(&self, kind: Kind, operation: u16) -> Option<usize> {
        Operation::try_from(operation)
            .ok()
            .map(|operation| record_bytes(kind, operation))
    }
}

/// A schema for a client that knows the one reply record size it expects and accepts any
/// operation code (it only decodes replies to requests it made itself).
#[derive(Clone, Copy, Debug)]
pub struct ReplySchema {
    /// Size of one reply record (bytes).
    pub reply_record_bytes: usize,
}

impl FrameSchema for ReplySchema {
    fn record_bytes(&self, kind: Kind, _operation: u16) -> Option<usize> {
        match kind {
            Kind::Reply => Some(self.reply_record_bytes),
            Kind::Request | Kind::SignedRequest | Kind::ErrorReply => None,
        }
    }
}

/// Size of one record of a frame of `kind` and `operation` (bytes).
pub const fn record_bytes(kind: Kind, operation: Operation) -> usize {
    match kind {
        Kind::Request | Kind::SignedRequest => operation.request_record_bytes(),
        Kind::Reply => operation.reply_record_bytes(),
        Kind::ErrorReply => 0,
    }
}

wire_enum! {
    /// Why a frame was refused, as sent in an `ErrorReply`'s `error_code`. Codes 1–999 belong
    /// to this module; the runtime crates number their own refusals from 1000.
    pub enum ErrorCode: u32 {
        /// [`FrameError::Truncated`].
        Truncated = 1,
        /// [`FrameError::BadMagic`].
        BadMagic = 2,
        /// [`FrameError::UnsupportedVersion`].
        UnsupportedVersion = 3,
        /// [`FrameError::HeaderChecksum`].
        HeaderChecksum = 4,
        /// [`FrameError::ReservedNotZero`].
        ReservedNotZero = 5,
        /// [`FrameError::UnknownKind`].
        UnknownKind = 6,
        /// [`FrameError::UnknownOperation`].
        UnknownOperation = 7,
        /// [`FrameError::ErrorCodeInvalid`].
        ErrorCodeInvalid = 8,
        /// [`FrameError::TooLarge`].
        TooLarge = 9,
        /// [`FrameError::BodyNotMultipleOfRecord`].
        BodyNotMultipleOfRecord = 10,
        /// [`FrameError::RecordCountMismatch`].
        RecordCountMismatch = 11,
        /// [`FrameError::BodyChecksum`].
        BodyChecksum = 12,
    }
}

/// Why a frame could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the header or the body needs.
    #[error("frame truncated: {bytes} bytes, {needed} needed")]
    Truncated {
        /// Bytes given.
        bytes: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The frame does not start with [`FRAME_MAGIC`].
    #[error("bad frame magic {magic:#010x}")]
    BadMagic {
        /// Magic found.
        magic: u32,
    },
    /// A protocol version this code does not speak.
    #[error("unsupported frame version {version}")]
    UnsupportedVersion {
        /// Version found.
        version: u16,
    },
    /// The header checksum does not match: the header is corrupt.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The reserved bytes are not zero.
    #[error("frame reserved bytes are not zero")]
    ReservedNotZero,
    /// Unknown [`Kind`] code.
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// Code found.
        kind: u16,
    },
    /// Unknown [`Operation`] code.
    #[error("unknown operation {operation}")]
    UnknownOperation {
        /// Code found.
        operation: u16,
    },
    /// `error_code` is zero in an `ErrorReply` or nonzero in another kind.
    #[error("error code {error_code} is invalid for this frame kind")]
    ErrorCodeInvalid {
        /// Code found.
        error_code: u32,
    },
    /// The frame is larger than the receiver accepts.
    #[error("frame of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Frame size announced (header included).
        bytes: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// The body is not a whole number of records.
    #[error("body of {body_bytes} bytes is not a multiple of the {record_bytes}-byte record")]
    BodyNotMultipleOfRecord {
        /// Body size announced.
        body_bytes: u32,
        /// Record size of this kind and operation.
        record_bytes: u32,
    },
    /// `record_count` disagrees with the body size.
    #[error("record count {record_count} does not match the body ({expected} records)")]
    RecordCountMismatch {
        /// Count announced.
        record_count: u32,
        /// Count the body holds.
        expected: u32,
    },
    /// The body checksum does not match: the body is corrupt.
    #[error("frame body checksum mismatch")]
    BodyChecksum,
}

impl FrameError {
    /// The wire code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::Truncated { .. } => ErrorCode::Truncated,
            FrameError::BadMagic { .. } => ErrorCode::BadMagic,
            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            FrameError::HeaderChecksum => ErrorCode::HeaderChecksum,
            FrameError::ReservedNotZero => ErrorCode::ReservedNotZero,
            FrameError::UnknownKind { .. } => ErrorCode::UnknownKind,
            FrameError::UnknownOperation { .. } => ErrorCode::UnknownOperation,
            FrameError::ErrorCodeInvalid { .. } => ErrorCode::ErrorCodeInvalid,
            FrameError::TooLarge { .. } => ErrorCode::TooLarge,
            FrameError::BodyNotMultipleOfRecord { .. } => ErrorCode::BodyNotMultipleOfRecord,
            FrameError::RecordCountMismatch { .. } => ErrorCode::RecordCountMismatch,
            FrameError::BodyChecksum => ErrorCode::BodyChecksum,
        }
    }
}

/// Who asked what: the fields a reply echoes from its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The client's identity.
    pub client_id: u128,
    /// The client's request counter.
    pub request_number: u64,
    /// What is asked: an operation code of the receiving state machine (see
    /// [`FrameSchema`]); [`OPERATION_PING`] is reserved for liveness checks.
    pub operation: u16,
    /// Shard addressed.
    pub shard: u16,
}

/// A header that passed every check of [`decode_header`], with its codes parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedHeader {
    /// What the frame is.
    pub kind: Kind,
    /// Size of one record of this frame, from the receiver's [`FrameSchema`] (bytes).
    pub record_bytes: usize,
    /// Who asked what.
    pub envelope: Envelope,
    /// Records in the body.
    pub record_count: u32,
    /// Bytes of body after the header.
    pub body_bytes: u32,
    /// Nonzero exactly in an `ErrorReply`: an [`ErrorCode`] or a runtime code (≥ 1000).
    pub error_code: u32,
    /// Expected [`frame_checksum`] of the body.
    pub checksum_body: u32,
}

impl DecodedHeader {
    /// Size of the whole frame, header included (bytes).
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.body_bytes as usize
    }

    /// Bytes of records at the start of the body (all of it but a signature trailer).
    pub fn records_bytes(&self) -> usize {
        self.body_bytes as usize - self.trailer_bytes()
    }

    /// Bytes after the records: [`SIGNATURE_TRAILER_BYTES`] in a `SignedRequest`.
    pub fn trailer_bytes(&self) -> usize {
        if self.kind == Kind::SignedRequest {
            SIGNATURE_TRAILER_BYTES
        } else {
            0
        }
    }
}

/// The checksum of `header` with its `checksum_header` field taken as zero.
pub fn header_checksum(header: &FrameHeader) -> u32 {
    let unsealed = FrameHeader {
        checksum_header: 0,
        ..*header
    };
    frame_checksum(bytemuck::bytes_of(&unsealed))
}

/// The envelope and whole length (header included) of the frame whose header starts
/// `bytes`, after only the checks that make them trustworthy: magic, version, the header
/// checksum and the size limit. Nothing about its kind or records is judged: for a reader
/// that skips frames it is not waiting for (a late reply to an earlier request, whose
/// records another schema describes) before [`decode_header`] judges the one it is. Never
/// panics.
pub fn peek_header(bytes: &[u8], frame_bytes_max: usize) -> Result<(Envelope, usize), FrameError> {
    let header = header_authentic(bytes)?;
    let frame_bytes = frame_bytes_within(&header, frame_bytes_max)?;
    let envelope = Envelope {
        client_id: header.client_id,
        request_number: header.request_number,
        operation: header.operation,
        shard: header.shard,
    };
    Ok((envelope, frame_bytes))
}

/// The header at the start of `bytes` once magic, version and its checksum hold: nothing
/// in it may be trusted before.
fn header_authentic(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    let Some(header_bytes) = bytes.get(..FRAME_HEADER_BYTES) else {
        return Err(FrameError::Truncated {
            bytes: bytes.len(),
            needed: FRAME_HEADER_BYTES,
        });
    };
    // Copy out: network buffers need not be aligned for the header's u128.
    let header: FrameHeader = bytemuck::pod_read_unaligned(header_bytes);
    if header.magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic {
            magic: header.magic,
        });
    }
    if header.version != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion {
            version: header.version,
        });
    }
    if header.checksum_header != header_checksum(&header) {
        return Err(FrameError::HeaderChecksum);
    }
    Ok(header)
}

/// The whole frame's length, if within `frame_bytes_max`.
fn frame_bytes_within(header: &FrameHeader, frame_bytes_max: usize) -> Result<usize, FrameError> {
    // Saturating: on a 32-bit target a hostile `body_bytes` must not wrap around the limit.
    let frame_bytes = FRAME_HEADER_BYTES.saturating_add(header.body_bytes as usize);
    if frame_bytes > frame_bytes_max {
        return Err(FrameError::TooLarge {
            bytes: frame_bytes,
            max: frame_bytes_max,
        });
    }
    Ok(frame_bytes)
}

/// Decodes and validates the header at the start of `bytes` (which may hold more: the body,
/// further frames). Rejects frames larger than `frame_bytes_max` (header included).
///
/// # Panics
/// If `frame_bytes_max < FRAME_HEADER_BYTES` (a configuration bug, not bad input).
pub fn decode_header(
    bytes: &[u8],
    frame_bytes_max: usize,
    schema: &impl FrameSchema,
) -> Result<DecodedHeader, FrameError> {
    assert!(frame_bytes_max >= FRAME_HEADER_BYTES);
    let header = header_authentic(bytes)?;
    if header.reserved != [0; 8] {
        return Err(FrameError::ReservedNotZero);
    }
    let kind = Kind::try_from(header.kind).map_err(|kind| FrameError::UnknownKind { kind })?;
    let operation = header.operation;
    // An error reply carries no records, whatever operation it echoes.
    let record_bytes = match kind {
        Kind::ErrorReply => 0,
        Kind::Request | Kind::SignedRequest => schema
            .record_bytes(Kind::Request, operation)
            .ok_or(FrameError::UnknownOperation { operation })?,
        Kind::Reply => schema
            .record_bytes(kind, operation)
            .ok_or(FrameError::UnknownOperation { operation })?,
    };
    if (kind == Kind::ErrorReply) != (header.error_code != 0) {
        return Err(FrameError::ErrorCodeInvalid {
            error_code: header.error_code,
        });
    }
    frame_bytes_within(&header, frame_bytes_max)?;
    let trailer_bytes = if kind == Kind::SignedRequest {
        SIGNATURE_TRAILER_BYTES
    } else {
        0
    };
    check_record_count(&header, record_bytes, trailer_bytes)?;
    Ok(DecodedHeader {
        kind,
        record_bytes,
        envelope: Envelope {
            client_id: header.client_id,
            request_number: header.request_number,
            operation,
            shard: header.shard,
        },
        record_count: header.record_count,
        body_bytes: header.body_bytes,
        error_code: header.error_code,
        checksum_body: header.checksum_body,
    })
}

fn check_record_count(
    header: &FrameHeader,
    record_bytes: usize,
    trailer_bytes: usize,
) -> Result<(), FrameError> {
    let Some(body_bytes) = (header.body_bytes as usize).checked_sub(trailer_bytes) else {
        return Err(FrameError::BodyNotMultipleOfRecord {
            body_bytes: header.body_bytes,
            record_bytes: record_bytes as u32,
        });
    };
    let expected = if record_bytes == 0 {
        if body_bytes != 0 {
            return Err(FrameError::BodyNotMultipleOfRecord {
                body_bytes: header.body_bytes,
                record_bytes: 0,
            });
        }
        0
    } else {
        if !body_bytes.is_multiple_of(record_bytes) {
            return Err(FrameError::BodyNotMultipleOfRecord {
                body_bytes: header.body_bytes,
                record_bytes: record_bytes as u32,
            });
        }
        body_bytes / record_bytes
    };
    if header.record_count as usize != expected {
        return Err(FrameError::RecordCountMismatch {
            record_count: header.record_count,
            expected: expected as u32,
        });
    }
    Ok(())
}

/// Checks the body that follows a decoded header. `bytes` starts right after the header and
/// may hold more (the next frame); returns exactly the body.
pub fn verify_body<'a>(header: &DecodedHeader, bytes: &'a [u8]) -> Result<&'a [u8], FrameError> {
    let body_bytes = header.body_bytes as usize;
    let Some(body) = bytes.get(..body_bytes) else {
        return Err(FrameError::Truncated {
            bytes: bytes.len(),
            needed: body_bytes,
        });
    };
    if frame_checksum(body) != header.checksum_body {
        return Err(FrameError::BodyChecksum);
    }
    Ok(body)
}

/// Decodes a whole frame at the start of `bytes`: [`decode_header`] then [`verify_body`].
pub fn decode_frame<'a>(
    bytes: &'a [u8],
    frame_bytes_max: usize,
    schema: &impl FrameSchema,
) -> Result<(DecodedHeader, &'a [u8]), FrameError> {
    let header = decode_header(bytes, frame_bytes_max, schema)?;
    let body = verify_body(&header, &bytes[FRAME_HEADER_BYTES..])?;
    Ok((header, body))
}

/// Copies the records of a verified body into `out` (which need not be the body's alignment)
/// and returns how many were copied.
///
/// # Panics
/// If `body` is not a whole number of `R`s, or `out` is too short.
pub fn read_records<R: Pod>(body: &[u8], out: &mut [R]) -> usize {
    let record_bytes = size_of::<R>();
    assert!(record_bytes > 0 && body.len().is_multiple_of(record_bytes));
    let count = body.len() / record_bytes;
    assert!(count <= out.len(), "output too short");
    bytemuck::cast_slice_mut::<R, u8>(&mut out[..count]).copy_from_slice(body);
    count
}

/// Writes a request frame with `records` into `buf`; returns the frame's size.
///
/// The record type must be the one the receiver's [`FrameSchema`] names for the operation;
/// otherwise the receiver refuses the frame.
///
/// # Panics
/// If `buf` is too short: a bug in the caller, which sizes `buf` to its frame limit.
pub fn encode_request<R: Pod>(buf: &mut [u8], envelope: &Envelope, records: &[R]) -> usize {
    encode(buf, Kind::Request, envelope, records, 0)
}

/// Writes a `SignedRequest` frame: `records`, then `signature` (the client's signature of
/// the request, BFT mode); returns the frame's size.
///
/// # Panics
/// As [`encode_request`].
pub fn encode_signed_request<R: Pod>(
    buf: &mut [u8],
    envelope: &Envelope,
    records: &[R],
    signature: &[u8; SIGNATURE_TRAILER_BYTES],
) -> usize {
    let records_bytes = size_of_val(records);
    let frame_bytes = FRAME_HEADER_BYTES + records_bytes + SIGNATURE_TRAILER_BYTES;
    assert!(buf.len() >= frame_bytes, "buffer too short for the frame");
    let at = FRAME_HEADER_BYTES + records_bytes;
    buf[at..frame_bytes].copy_from_slice(signature);
    let written = encode(buf, Kind::SignedRequest, envelope, records, 0);
    debug_assert_eq!(written, at);
    // The body is the records and the trailer: extend the header's size and checksum.
    let mut header: FrameHeader = bytemuck::pod_read_unaligned(&buf[..FRAME_HEADER_BYTES]);
    header.body_bytes += SIGNATURE_TRAILER_BYTES as u32;
    header.checksum_body = frame_checksum(&buf[FRAME_HEADER_BYTES..frame_bytes]);
    header.checksum_header = header_checksum(&header);
    buf[..FRAME_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
    frame_bytes
}

/// Writes a reply frame with `records` (results, or looked-up records) into `buf`; returns
/// the frame's size.
///
/// # Panics
/// As [`encode_request`].
pub fn encode_reply<R: Pod>(buf: &mut [u8], envelope: &Envelope, records: &[R]) -> usize {
    encode(buf, Kind::Reply, envelope, records, 0)
}

/// Writes an error reply with `error_code` (nonzero) into `buf`; returns the frame's size.
pub fn encode_error_reply(buf: &mut [u8], envelope: &Envelope, error_code: u32) -> usize {
    assert_ne!(error_code, 0, "an error reply carries an error");
    encode::<u8>(buf, Kind::ErrorReply, envelope, &[], error_code)
}

fn encode<R: Pod>(
    buf: &mut [u8],
    kind: Kind,
    envelope: &Envelope,
    records: &[R],
    error_code: u32,
) -> usize {
    let body: &[u8] = if records.is_empty() {
        &[]
    } else {
        bytemuck::cast_slice(records)
    };
    let frame_bytes = FRAME_HEADER_BYTES + body.len();
    assert!(buf.len() >= frame_bytes, "buffer too short for the frame");
    let body_bytes = u32::try_from(body.len()).expect("body fits u32");
    let record_count = u32::try_from(records.len()).expect("record count fits u32");
    buf[FRAME_HEADER_BYTES..frame_bytes].copy_from_slice(body);
    let mut header = FrameHeader {
        magic: FRAME_MAGIC,
        version: FRAME_VERSION,
        kind: kind.into(),
        operation: envelope.operation,
        shard: envelope.shard,
        body_bytes,
        client_id: envelope.client_id,
        request_number: envelope.request_number,
        record_count,
        error_code,
        checksum_body: frame_checksum(body),
        checksum_header: 0,
        reserved: [0; 8],
    };
    header.checksum_header = header_checksum(&header);
    buf[..FRAME_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&header));
    frame_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn signed_requests_carry_their_signature_after_the_records() {
        let envelope = Envelope {
            client_id: 3,
            request_number: 9,
            operation: Operation::CreateTransfers.into(),
            shard: 1,
        };
        let records = [[7u8; RECORD_BYTES]; 2];
        let mut buf = vec![0u8; 1024];
        let bytes = encode_signed_request(&mut buf, &envelope, &records, &[5; 64]);
        assert_eq!(bytes, FRAME_HEADER_BYTES + 2 * RECORD_BYTES + 64);
        let (header, body) = decode_frame(&buf[..bytes], 1024, &LedgerSchema).expect("decodes");
        assert_eq!(header.kind, Kind::SignedRequest);
        assert_eq!(
            (header.record_count, header.records_bytes()),
            (2, 2 * RECORD_BYTES)
        );
        assert_eq!(&body[header.records_bytes()..], &[5u8; 64][..]);
        assert_eq!(header.envelope, envelope);
        // A signed request without room for its signature is refused.
        let short = encode_request(&mut buf, &envelope, &records[..1]);
        let mut unsigned: FrameHeader = bytemuck::pod_read_unaligned(&buf[..FRAME_HEADER_BYTES]);
        unsigned.kind = Kind::SignedRequest.into();
        unsigned.checksum_header = header_checksum(&unsigned);
        buf[..FRAME_HEADER_BYTES].copy_from_slice(bytemuck::bytes_of(&unsigned));
        assert!(matches!(
            decode_frame(&buf[..short], 1024, &LedgerSchema),
            Err(FrameError::BodyNotMultipleOfRecord { .. } | FrameError::RecordCountMismatch { .. })
        ));
    }

    #[test]
    fn header_layout_is_the_documented_wire_layout() {
        assert_eq!(offset_of!(FrameHeader, magic), 0);
        assert_eq!(offset_of!(FrameHeader, version), 4);
        assert_eq!(offset_of!(FrameHeader, kind), 6);
        assert_eq!(offset_of!(FrameHeader, operation), 8);
        assert_eq!(offset_of!(FrameHeader, shard), 10);
        assert_eq!(offset_of!(FrameHeader, body_bytes), 12);
        assert_eq!(offset_of!(FrameHeader, client_id), 16);
        assert_eq!(offset_of!(FrameHeader, request_number), 32);
        assert_eq!(offset_of!(FrameHeader, record_count), 40);
        assert_eq!(offset_of!(FrameHeader, error_code), 44);
        assert_eq!(offset_of!(FrameHeader, checksum_body), 48);
        assert_eq!(offset_of!(FrameHeader, checksum_header), 52);
        assert_eq!(offset_of!(FrameHeader, reserved), 56);
    }

    #[test]
    fn every_error_has_its_own_code() {
        let errors = [
            FrameError::Truncated {
                bytes: 0,
                needed: 1,
            },
            FrameError::BadMagic { magic: 0 },
            FrameError::UnsupportedVersion { version: 0 },
            FrameError::HeaderChecksum,
            FrameError::ReservedNotZero,
            FrameError::UnknownKind { kind: 0 },
            FrameError::UnknownOperation { operation: 0 },
            FrameError::ErrorCodeInvalid { error_code: 0 },
            FrameError::TooLarge { bytes: 0, max: 0 },
            FrameError::BodyNotMultipleOfRecord {
                body_bytes: 0,
                record_bytes: 0,
            },
            FrameError::RecordCountMismatch {
                record_count: 0,
                expected: 0,
            },
            FrameError::BodyChecksum,
        ];
        let mut codes: Vec<u32> = errors.iter().map(|error| error.code().into()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        assert!(codes.iter().all(|&code| code != 0 && code < 1000));
    }

    #[test]
    fn zeroed_header_is_rejected() {
        let zeroes = [0_u8; FRAME_HEADER_BYTES];
        assert_eq!(
            decode_header(&zeroes, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema),
            Err(FrameError::BadMagic { magic: 0 })
        );
    }
}
