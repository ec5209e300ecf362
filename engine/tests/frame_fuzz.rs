//! Property tests of the frame decoder: it never panics on arbitrary bytes, every short burst
//! of damage is detected, and encode/decode round-trips arbitrary envelopes and records.

use bytemuck::Zeroable;
use percore_engine::frame::{
    Envelope, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, FRAME_MAGIC, FRAME_VERSION, FrameError,
    FrameHeader, Kind, LedgerSchema, Operation, decode_frame, decode_header, encode_request,
    header_checksum, read_records,
};
use percore_engine::record::Transfer;
use proptest::prelude::*;

fn operation() -> impl Strategy<Value = Operation> {
    prop::sample::select(Operation::ALL)
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (any::<u128>(), any::<u64>(), operation(), any::<u16>()).prop_map(
        |(client_id, request_number, operation, shard)| Envelope {
            client_id,
            request_number,
            operation: operation.into(),
            shard,
        },
    )
}

fn transfer() -> impl Strategy<Value = Transfer> {
    (any::<u128>(), any::<u128>(), any::<u64>()).prop_map(|(id, amount, timestamp)| Transfer {
        id,
        amount,
        timestamp,
        ..Transfer::zeroed()
    })
}

fn valid_frame() -> impl Strategy<Value = Vec<u8>> {
    (envelope(), prop::collection::vec(transfer(), 0..6)).prop_map(|(mut envelope, records)| {
        envelope.operation = Operation::CreateTransfers.into();
        let mut buf = vec![0; FRAME_HEADER_BYTES + records.len() * 128];
        let size = encode_request(&mut buf, &envelope, &records);
        assert_eq!(size, buf.len());
        buf
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..1_024),
        frame_bytes_max in FRAME_HEADER_BYTES..FRAME_BYTES_MAX_DEFAULT,
    ) {
        let _ = decode_frame(&bytes, frame_bytes_max, &LedgerSchema);
    }

    #[test]
    fn decoding_a_header_with_a_valid_magic_never_panics(
        mut bytes in prop::collection::vec(any::<u8>(), 64..512),
    ) {
        bytes[..4].copy_from_slice(b"PCOR");
        bytes[4..6].copy_from_slice(&1_u16.to_le_bytes());
        let _ = decode_frame(&bytes, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema);
    }

    /// Headers with arbitrary fields and a valid checksum reach every check behind it; when
    /// one is accepted, what `decode_header` promises holds.
    #[test]
    fn sealed_arbitrary_headers_are_refused_or_consistent(
        fields in any::<[u8; FRAME_HEADER_BYTES]>(),
        kind in prop_oneof![3 => 1_u16..4, 1 => any::<u16>()],
        operation in prop_oneof![3 => 1_u16..6, 1 => any::<u16>()],
        body_records in 0_u32..4,
        record_bytes in prop::sample::select(vec![0_u32, 8, 16, 128, 7]),
        record_count in any::<u32>(),
        error_code in 1_u32..,
        consistent in any::<[bool; 3]>(),
        frame_bytes_max in FRAME_HEADER_BYTES..FRAME_BYTES_MAX_DEFAULT,
    ) {
        let [count_matches, error_matches, reserved_zero] = consistent;
        let mut header: FrameHeader = bytemuck::pod_read_unaligned(&fields);
        header.magic = FRAME_MAGIC;
        header.version = FRAME_VERSION;
        header.kind = kind;
        header.operation = operation;
        header.body_bytes = body_records * record_bytes;
        header.record_count = if count_matches { body_records } else { record_count };
        if error_matches {
            let is_error = kind == u16::from(Kind::ErrorReply);
            header.error_code = if is_error { error_code } else { 0 };
        }
        if reserved_zero {
            header.reserved = [0; 8];
        }
        header.checksum_header = header_checksum(&header);
        match decode_header(bytemuck::bytes_of(&header), frame_bytes_max, &LedgerSchema) {
            Err(_) => {}
            Ok(decoded) => {
                prop_assert!(decoded.frame_bytes() <= frame_bytes_max);
                prop_assert_eq!(
                    decoded.record_count as usize * decoded.record_bytes,
                    decoded.body_bytes as usize
                );
                prop_assert_eq!(decoded.kind == Kind::ErrorReply, decoded.error_code != 0);
                prop_assert_eq!(header.reserved, [0; 8]);
            }
        }
    }

    #[test]
    fn arbitrary_damage_to_a_valid_frame_never_panics(
        mut frame in valid_frame(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        for (index, value) in edits {
            let position = index.index(frame.len());
            frame[position] = value;
        }
        let _ = decode_frame(&frame, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema);
    }

    /// CRC-32C detects every error burst of up to 32 bits, so any damage confined to four
    /// consecutive bytes is always caught.
    #[test]
    fn every_burst_of_up_to_four_bytes_is_detected(
        frame in valid_frame(),
        start in any::<prop::sample::Index>(),
        mask in any::<[u8; 4]>(),
        length in 1_usize..=4,
    ) {
        prop_assume!(mask[..length].iter().any(|&byte| byte != 0));
        let start = start.index(frame.len());
        let mut damaged = frame.clone();
        let mut changed = false;
        for (offset, &byte) in mask[..length].iter().enumerate() {
            if let Some(target) = damaged.get_mut(start + offset) {
                *target ^= byte;
                changed |= byte != 0;
            }
        }
        prop_assume!(changed);
        prop_assert!(decode_frame(&damaged, FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).is_err());
    }

    #[test]
    fn requests_round_trip(
        envelope in envelope(),
        records in prop::collection::vec(transfer(), 0..16),
    ) {
        let envelope = Envelope { operation: Operation::CreateTransfers.into(), ..envelope };
        let mut buf = vec![0; FRAME_BYTES_MAX_DEFAULT];
        let size = encode_request(&mut buf, &envelope, &records);
        let (header, body) = decode_frame(&buf[..size], FRAME_BYTES_MAX_DEFAULT, &LedgerSchema).unwrap();
        prop_assert_eq!(header.envelope, envelope);
        prop_assert_eq!(header.record_count as usize, records.len());
        let mut decoded = vec![Transfer::zeroed(); records.len()];
        read_records(body, &mut decoded);
        prop_assert_eq!(decoded, records);
    }

    #[test]
    fn a_limit_below_the_frame_size_refuses_it(frame in valid_frame(), slack in 1_usize..256) {
        let limit = frame.len().saturating_sub(slack).max(FRAME_HEADER_BYTES);
        prop_assume!(limit < frame.len());
        prop_assert_eq!(
            decode_header(&frame, limit, &LedgerSchema),
            Err(FrameError::TooLarge { bytes: frame.len(), max: limit })
        );
    }
}
