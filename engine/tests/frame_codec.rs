//! The client frame codec: round trips, every refusal, and detection of every single-bit
//! error in the header (exhaustive) and body.

use bytemuck::Zeroable;
use percore_engine::frame::{
    DecodedHeader, Envelope, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, FRAME_MAGIC,
    FRAME_VERSION, FrameError, FrameHeader, Kind, LedgerSchema, Operation, decode_frame,
    decode_header, encode_error_reply, encode_reply, encode_request, header_checksum, read_records,
    verify_body,
};
use percore_engine::record::{Account, RecordResult, Transfer};

fn envelope(operation: Operation) -> Envelope {
    Envelope {
        client_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        request_number: 77,
        operation: operation.into(),
        shard: 3,
    }
}

fn transfers(count: usize) -> Vec<Transfer> {
    (0..count)
        .map(|index| Transfer {
            id: 1_000 + index as u128,
            debit_account_id: 1,
            credit_account_id: 2,
            amount: 10 + index as u128,
            ledger: 1,
            code: 1,
            ..Transfer::zeroed()
        })
        .collect()
}

fn request_frame(count: usize) -> Vec<u8> {
    let mut buf = vec![0; FRAME_BYTES_MAX_DEFAULT];
    let bytes = encode_request(
        &mut buf,
        &envelope(Operation::CreateTransfers),
        &transfers(count),
    );
    buf.truncate(bytes);
    buf
}

/// A header with valid checksums after `edit`: exercises the checks behind the checksum.
fn resealed(frame: &[u8], edit: impl FnOnce(&mut FrameHeader)) -> Vec<u8> {
    let mut header: FrameHeader = bytemuck::pod_read_unaligned(&frame[..FRAME_HEADER_BYTES]);
    edit(&mut header);
    header.checksum_header = header_checksum(&header);
    let mut bytes = bytemuck::bytes_of(&header).to_vec();
    bytes.extend_from_slice(&frame[FRAME_HEADER_BYTES..]);
    bytes
}

#[test]
fn a_request_round_trips() {
    let frame = request_frame(3);
    assert_eq!(frame.len(), FRAME_HEADER_BYTES + 3 * 128);
    let (header, body) = decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!(
        header,
        DecodedHeader {
            kind: Kind::Request,
            record_bytes: 128,
            envelope: envelope(Operation::CreateTransfers),
            record_count: 3,
            body_bytes: 384,
            error_code: 0,
            checksum_body: header.checksum_body,
        }
    );
    assert_eq!(header.frame_bytes(), frame.len());
    let mut decoded = vec![Transfer::zeroed(); 8];
    assert_eq!(read_records(body, &mut decoded), 3);
    assert_eq!(decoded[..3], transfers(3)[..]);
}

#[test]
fn replies_lookups_pings_and_errors_round_trip() {
    let mut buf = vec![0; 4_096];

    let results: Vec<RecordResult> = (0..5)
        .map(|index| RecordResult {
            index,
            code: index % 2,
        })
        .collect();
    let size = encode_reply(&mut buf, &envelope(Operation::CreateTransfers), &results);
    let (header, body) =
        decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!(
        (header.kind, header.record_count, header.record_bytes),
        (Kind::Reply, 5, 8)
    );
    let mut decoded = [RecordResult::zeroed(); 5];
    read_records(body, &mut decoded);
    assert_eq!(decoded[..], results[..]);

    let ids = [7_u128, 8, u128::MAX];
    let size = encode_request(&mut buf, &envelope(Operation::LookupAccounts), &ids);
    let (header, body) =
        decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!((header.record_count, body.len()), (3, 48));

    let accounts = [Account {
        id: 7,
        ledger: 1,
        code: 1,
        ..Account::zeroed()
    }];
    let size = encode_reply(&mut buf, &envelope(Operation::LookupAccounts), &accounts);
    let (_, body) = decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    let mut decoded = [Account::zeroed()];
    read_records(body, &mut decoded);
    assert_eq!(decoded, accounts);

    let size = encode_request::<u8>(&mut buf, &envelope(Operation::Ping), &[]);
    assert_eq!(size, FRAME_HEADER_BYTES);
    let (header, body) =
        decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!(
        (header.envelope.operation, body.len()),
        (u16::from(Operation::Ping), 0)
    );

    let size = encode_error_reply(&mut buf, &envelope(Operation::CreateAccounts), 1_234);
    let (header, _) = decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!((header.kind, header.error_code), (Kind::ErrorReply, 1_234));
}

#[test]
fn frames_back_to_back_decode_one_after_another() {
    let mut stream = request_frame(2);
    stream.extend(request_frame(1));
    let (first, _) = decode_frame(&stream, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    let rest = &stream[first.frame_bytes()..];
    let (second, body) = decode_frame(rest, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    assert_eq!((first.record_count, second.record_count), (2, 1));
    assert_eq!(body.len(), rest.len() - FRAME_HEADER_BYTES);
}

#[test]
fn every_single_bit_flip_in_the_header_is_detected() {
    for frame in [request_frame(0), request_frame(2)] {
        for bit in 0..FRAME_HEADER_BYTES * 8 {
            let mut damaged = frame.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&damaged, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).is_err(),
                "header bit {bit} flipped undetected"
            );
        }
    }
}

#[test]
fn every_single_bit_flip_in_a_small_body_is_detected() {
    let frame = request_frame(2);
    let header = decode_header(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
    for bit in FRAME_HEADER_BYTES * 8..frame.len() * 8 {
        let mut damaged = frame.clone();
        damaged[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            verify_body(&header, &damaged[FRAME_HEADER_BYTES..]),
            Err(FrameError::BodyChecksum),
            "body bit {bit}"
        );
    }
}

#[test]
fn sampled_bit_flips_in_a_maximal_body_are_detected() {
    let mut frame = request_frame(8_192);
    assert_eq!(frame.len(), FRAME_BYTES_MAX_DEFAULT);
    let body_bits = (frame.len() - FRAME_HEADER_BYTES) * 8;
    // A stride coprime to 8 visits every bit position within a byte.
    for bit in (0..body_bits).step_by(9_973) {
        let bit = FRAME_HEADER_BYTES * 8 + bit;
        frame[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).map(|_| ()),
            Err(FrameError::BodyChecksum),
            "body bit {bit}"
        );
        frame[bit / 8] ^= 1 << (bit % 8);
    }
    assert!(decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).is_ok());
}

#[test]
fn oversize_frames_are_refused_before_their_body_is_read() {
    let frame = request_frame(4);
    // The same frame is fine under the default limit and too large under a smaller one.
    assert!(decode_header(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).is_ok());
    assert_eq!(
        decode_header(
            &frame[..FRAME_HEADER_BYTES],
            FRAME_HEADER_BYTES + 3 * 128,
            &LedgerSchema
        ),
        Err(FrameError::TooLarge {
            bytes: frame.len(),
            max: FRAME_HEADER_BYTES + 3 * 128
        })
    );
    // A header claiming 4 GiB is refused from the header alone.
    let huge = resealed(&frame, |header| {
        header.body_bytes = u32::MAX - 127;
        header.record_count = (u32::MAX - 127) / 128;
    });
    assert_eq!(
        decode_header(
            &huge[..FRAME_HEADER_BYTES],
            FRAME_BYTES_MAX_DEFAULT,
            &LedgerSchema
        ),
        Err(FrameError::TooLarge {
            bytes: FRAME_HEADER_BYTES + (u32::MAX - 127) as usize,
            max: FRAME_BYTES_MAX_DEFAULT
        })
    );
}

#[test]
fn truncated_frames_are_refused() {
    let frame = request_frame(1);
    assert_eq!(
        decode_header(
            &frame[..FRAME_HEADER_BYTES - 1],
            FRAME_BYTES_MAX_DEFAULT,
            &LedgerSchema
        ),
        Err(FrameError::Truncated {
            bytes: 63,
            needed: 64
        })
    );
    assert_eq!(
        decode_frame(
            &frame[..frame.len() - 1],
            FRAME_BYTES_MAX_DEFAULT,
            &LedgerSchema
        )
        .map(|_| ()),
        Err(FrameError::Truncated {
            bytes: 127,
            needed: 128
        })
    );
}

#[test]
fn each_invalid_field_is_refused_with_its_error() {
    let frame = request_frame(1);
    let max = FRAME_BYTES_MAX_DEFAULT;
    let decode = |bytes: &[u8]| decode_frame(bytes, max, &LedgerSchema).map(|_| ());

    let mut magic = frame.clone();
    magic[0] = b'X';
    let expected_magic = u32::from_le_bytes(magic[..4].try_into().unwrap());
    assert_eq!(
        decode(&magic),
        Err(FrameError::BadMagic {
            magic: expected_magic
        })
    );
    assert_ne!(expected_magic, FRAME_MAGIC);

    let version = resealed(&frame, |header| header.version = FRAME_VERSION + 1);
    assert_eq!(
        decode(&version),
        Err(FrameError::UnsupportedVersion {
            version: FRAME_VERSION + 1
        })
    );

    let mut checksum = frame.clone();
    checksum[12] ^= 0x80; // body_bytes, without resealing
    assert_eq!(decode(&checksum), Err(FrameError::HeaderChecksum));

    let reserved = resealed(&frame, |header| header.reserved[7] = 1);
    assert_eq!(decode(&reserved), Err(FrameError::ReservedNotZero));

    for kind in [0, 5, u16::MAX] {
        let bad = resealed(&frame, |header| header.kind = kind);
        assert_eq!(decode(&bad), Err(FrameError::UnknownKind { kind }));
    }
    for operation in [0, 6, 256, u16::MAX] {
        let bad = resealed(&frame, |header| header.operation = operation);
        assert_eq!(
            decode(&bad),
            Err(FrameError::UnknownOperation { operation })
        );
    }

    let error_in_request = resealed(&frame, |header| header.error_code = 5);
    assert_eq!(
        decode(&error_in_request),
        Err(FrameError::ErrorCodeInvalid { error_code: 5 })
    );
    let silent_error = resealed(&frame, |header| {
        header.kind = Kind::ErrorReply.into();
        header.body_bytes = 0;
        header.record_count = 0;
    });
    assert_eq!(
        decode(&silent_error[..FRAME_HEADER_BYTES]),
        Err(FrameError::ErrorCodeInvalid { error_code: 0 })
    );

    let ragged = resealed(&frame, |header| header.body_bytes = 127);
    assert_eq!(
        decode_header(&ragged, max, &LedgerSchema),
        Err(FrameError::BodyNotMultipleOfRecord {
            body_bytes: 127,
            record_bytes: 128
        })
    );
    let ping_with_body = resealed(&frame, |header| header.operation = Operation::Ping.into());
    assert_eq!(
        decode_header(&ping_with_body, max, &LedgerSchema),
        Err(FrameError::BodyNotMultipleOfRecord {
            body_bytes: 128,
            record_bytes: 0
        })
    );
    let miscounted = resealed(&frame, |header| header.record_count = 2);
    assert_eq!(
        decode_header(&miscounted, max, &LedgerSchema),
        Err(FrameError::RecordCountMismatch {
            record_count: 2,
            expected: 1
        })
    );

    let mut body = frame.clone();
    *body.last_mut().unwrap() ^= 1;
    assert_eq!(decode(&body), Err(FrameError::BodyChecksum));
}
