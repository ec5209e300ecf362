//! The journal's entry and superblock formats: round trips, every single-bit flip detected,
//! a decoder that never panics, superblock copy selection, and (ignored) the checksum
//! throughput measurement behind the choice of `journal_checksum`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use percore_engine::journal::{
    Checkpoint, DecodedEntry, ENTRY_BODY_BYTES_MAX_LIMIT, ENTRY_HEADER_BYTES, EntryError,
    EntryMeta, JOURNAL_CHAIN_ROOT, SECTOR_BYTES, SEGMENT_BYTES_DEFAULT, SUPERBLOCK_BYTES,
    SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, Superblock, SuperblockError, decode_entry,
    decode_superblock, encode_entry, encode_superblock, entry_bytes_padded, journal_checksum,
    superblock_latest,
};
use proptest::prelude::*;

const RECORD_BYTES: u32 = 128;

fn meta(op: u64, entry_count: u32) -> EntryMeta {
    EntryMeta {
        shard: 5,
        view: 2,
        op,
        operation: 3,
        entry_count,
        record_bytes: RECORD_BYTES,
        request_count: 0,
    }
}

fn body(entry_count: u32, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..entry_count as usize * RECORD_BYTES as usize)
        .map(|_| {
            // xorshift64: deterministic, not all-zero, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn encoded(meta: &EntryMeta, body: &[u8], checksum_previous: u128) -> (Vec<u8>, u128) {
    let mut buf = vec![0xEE; entry_bytes_padded(body.len())];
    let (written, checksum) = encode_entry(&mut buf, meta, body, checksum_previous);
    assert_eq!(written, buf.len());
    (buf, checksum)
}

#[test]
fn entries_round_trip_at_every_size_class() {
    for entry_count in [0, 1, 31, 32, 33, 100, 1000, 10_000] {
        let meta = meta(u64::from(entry_count) + 1, entry_count);
        let body = body(entry_count, u64::from(entry_count));
        let (buf, checksum) = encoded(&meta, &body, 42);
        assert!(buf.len().is_multiple_of(SECTOR_BYTES));
        assert!(buf.len() - (ENTRY_HEADER_BYTES + body.len()) < SECTOR_BYTES);
        let entry = decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT).unwrap();
        assert_eq!(
            entry,
            DecodedEntry {
                meta,
                body: &body,
                checksum,
                checksum_previous: 42,
                padded_bytes: buf.len(),
            }
        );
        // Header and body are enough; the padding is not needed to decode.
        let unpadded = &buf[..ENTRY_HEADER_BYTES + body.len()];
        assert_eq!(
            decode_entry(unpadded, ENTRY_BODY_BYTES_MAX_LIMIT),
            Ok(entry)
        );
        // One byte short of the body is truncated, not a checksum error.
        if !body.is_empty() {
            assert_eq!(
                decode_entry(&unpadded[..unpadded.len() - 1], ENTRY_BODY_BYTES_MAX_LIMIT),
                Err(EntryError::Truncated {
                    bytes: unpadded.len() - 1,
                    needed: unpadded.len()
                })
            );
        }
    }
}

#[test]
fn decode_reports_the_first_problem_in_order() {
    let (buf, _) = encoded(&meta(1, 1), &body(1, 1), 0);
    assert_eq!(
        decode_entry(&buf[..ENTRY_HEADER_BYTES - 1], 1 << 20),
        Err(EntryError::Truncated {
            bytes: ENTRY_HEADER_BYTES - 1,
            needed: ENTRY_HEADER_BYTES
        })
    );
    assert_eq!(
        decode_entry(&[0; SECTOR_BYTES], 1 << 20),
        Err(EntryError::BadMagic)
    );
    let mut bad_version = buf.clone();
    bad_version[8] = 9;
    assert_eq!(
        decode_entry(&bad_version, 1 << 20),
        Err(EntryError::UnsupportedVersion { version: 9 })
    );
    let mut bad_header = buf.clone();
    bad_header[40] ^= 1; // op
    assert_eq!(
        decode_entry(&bad_header, 1 << 20),
        Err(EntryError::HeaderChecksum)
    );
    let mut bad_body = buf.clone();
    bad_body[ENTRY_HEADER_BYTES] ^= 0x80;
    assert_eq!(
        decode_entry(&bad_body, 1 << 20),
        Err(EntryError::BodyChecksum)
    );
    // Padding is not part of the entry.
    let mut bad_padding = buf.clone();
    bad_padding[SECTOR_BYTES - 1] = 1;
    assert!(decode_entry(&bad_padding, 1 << 20).is_ok());
}

#[test]
fn every_single_bit_flip_in_the_header_is_detected() {
    let body = body(4, 7);
    let (mut buf, _) = encoded(&meta(9, 4), &body, 1234);
    for bit in 0..ENTRY_HEADER_BYTES * 8 {
        buf[bit / 8] ^= 1 << (bit % 8);
        let result = decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT);
        assert!(result.is_err(), "header bit {bit} flipped went unnoticed");
        buf[bit / 8] ^= 1 << (bit % 8);
    }
    assert!(decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT).is_ok());
}

#[test]
fn every_single_bit_flip_in_a_small_body_is_detected() {
    let body = body(2, 3);
    let (mut buf, _) = encoded(&meta(1, 2), &body, 0);
    for bit in ENTRY_HEADER_BYTES * 8..(ENTRY_HEADER_BYTES + body.len()) * 8 {
        buf[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT),
            Err(EntryError::BodyChecksum),
            "body bit {bit}"
        );
        buf[bit / 8] ^= 1 << (bit % 8);
    }
    assert!(decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT).is_ok());
}

#[test]
fn sampled_bit_flips_in_a_large_body_are_detected() {
    let body = body(1000, 11);
    let (mut buf, _) = encoded(&meta(1, 1000), &body, 0);
    let body_bits = body.len() * 8;
    // A stride coprime to the length visits bits all over the body, first and last included.
    let mut bits: Vec<usize> = (0..512).map(|i| i * 2_003 % body_bits).collect();
    bits.extend([0, body_bits - 1]);
    for bit in bits.into_iter().map(|bit| ENTRY_HEADER_BYTES * 8 + bit) {
        buf[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            decode_entry(&buf, ENTRY_BODY_BYTES_MAX_LIMIT),
            Err(EntryError::BodyChecksum),
            "body bit {bit}"
        );
        buf[bit / 8] ^= 1 << (bit % 8);
    }
}

#[test]
fn sizes_are_checked_after_the_header_checksum() {
    let (buf, _) = encoded(&meta(1, 8), &body(8, 2), 0);
    assert_eq!(
        decode_entry(&buf, 8 * 128 - 1),
        Err(EntryError::TooLarge {
            body_bytes: 8 * 128,
            max: 8 * 128 - 1
        })
    );
    assert!(decode_entry(&buf, 8 * 128).is_ok());
}

#[test]
#[should_panic(expected = "op numbers start at 1")]
fn encode_refuses_op_zero() {
    encoded(&meta(0, 1), &body(1, 1), 0);
}

proptest! {
    #[test]
    fn decode_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..3 * SECTOR_BYTES),
        body_bytes_max in 0usize..(1 << 21),
    ) {
        let _ = decode_entry(&bytes, body_bytes_max);
        let _ = decode_superblock(&bytes);
        let _ = superblock_latest(&bytes, &bytes);
    }

    #[test]
    fn decode_never_panics_on_damaged_entries(
        entry_count in 0u32..40,
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let (mut buf, _) = encoded(&meta(3, entry_count), &body(entry_count, 5), 77);
        for (index, byte) in damage {
            let at = index.index(buf.len());
            buf[at] ^= byte;
        }
        let len = cut.index(buf.len() + 1);
        let _ = decode_entry(&buf[..len], ENTRY_BODY_BYTES_MAX_LIMIT);
    }

    #[test]
    fn entries_round_trip(
        shard in any::<u32>(),
        view in any::<u64>(),
        op in 1u64..,
        operation in any::<u16>(),
        entry_count in 0u32..64,
        record_bytes in prop::sample::select(vec![0u32, 1, 16, 128, 200]),
        checksum_previous in any::<u128>(),
    ) {
        let meta = EntryMeta { shard, view, op, operation, entry_count, record_bytes, request_count: 0 };
        let body: Vec<u8> = (0..entry_count * record_bytes).map(|i| i as u8).collect();
        let (buf, checksum) = encoded(&meta, &body, checksum_previous);
        let entry = decode_entry(&buf, body.len()).unwrap();
        prop_assert_eq!(entry.meta, meta);
        prop_assert_eq!(entry.body, &body[..]);
        prop_assert_eq!(entry.checksum, checksum);
        prop_assert_eq!(entry.checksum_previous, checksum_previous);
    }
}

fn superblock(sequence: u64) -> Superblock {
    if sequence == 0 {
        // No checkpoint yet: both checkpoints are the journal's start, no snapshot.
        return Superblock {
            sequence: 0,
            view: 4,
            log_view: 0,
            commit_max: 0,
            op_durable: 0,
            checkpoint: Checkpoint::ROOT,
            snapshot_checksum: 0,
            checkpoint_previous: Checkpoint::ROOT,
            ..superblock(1)
        };
    }
    Superblock {
        cluster_id: 0xC1C1_0000_0000_0000_0000_0000_0000_0001,
        shard: 1,
        sequence,
        view: 4 + sequence,
        log_view: 3 + sequence / 2,
        commit_max: 120 * sequence,
        op_durable: 100 * sequence,
        checkpoint: Checkpoint {
            op: 90 * sequence,
            segment: sequence / 3 + 1,
            offset: 4096 * (sequence % 1000),
            checksum: u128::from(sequence) << 64 | 0xABCD,
        },
        snapshot_checksum: u128::from(sequence) << 32 | 0x1234,
        checkpoint_previous: Checkpoint {
            op: 80 * sequence,
            segment: sequence / 3,
            offset: 4096 * (sequence % 7),
            checksum: u128::from(sequence) << 48 | 0x77,
        },
        segment_bytes: SEGMENT_BYTES_DEFAULT,
        replacing: sequence % 2 == 1,
        settings_digest: 0x000a_bcde_f012_3456 ^ sequence,
    }
}

fn superblock_encoded(superblock: &Superblock) -> [u8; SUPERBLOCK_BYTES] {
    let mut buf = [0xEE; SUPERBLOCK_BYTES];
    encode_superblock(superblock, &mut buf);
    buf
}

#[test]
fn superblock_round_trips() {
    for sequence in [0, 1, 2, 77, u64::MAX / 4096] {
        let expected = superblock(sequence);
        let buf = superblock_encoded(&expected);
        assert_eq!(decode_superblock(&buf), Ok(expected));
        // Longer buffers: only the first copy is read.
        let mut longer = buf.to_vec();
        longer.extend([0xFF; 100]);
        assert_eq!(decode_superblock(&longer), Ok(expected));
    }
    assert_eq!(
        decode_superblock(&[0; SUPERBLOCK_BYTES - 1]),
        Err(SuperblockError::Truncated {
            bytes: SUPERBLOCK_BYTES - 1
        })
    );
    assert_eq!(
        decode_superblock(&[0; SUPERBLOCK_BYTES]),
        Err(SuperblockError::BadMagic)
    );
}

#[test]
fn every_single_bit_flip_in_a_superblock_is_detected() {
    let mut buf = superblock_encoded(&superblock(6));
    for bit in 0..SUPERBLOCK_BYTES * 8 {
        buf[bit / 8] ^= 1 << (bit % 8);
        assert!(decode_superblock(&buf).is_err(), "superblock bit {bit}");
        buf[bit / 8] ^= 1 << (bit % 8);
    }
    assert_eq!(decode_superblock(&buf), Ok(superblock(6)));
}

#[test]
fn latest_superblock_copy_is_chosen() {
    let even = superblock_encoded(&superblock(10));
    let odd = superblock_encoded(&superblock(11));
    let older_odd = superblock_encoded(&superblock(9));
    assert_eq!(superblock_latest(&even, &odd), Ok(superblock(11)));
    assert_eq!(superblock_latest(&even, &older_odd), Ok(superblock(10)));

    // A torn write of the newer copy: whole sector old (here: garbage) or a damaged byte.
    let mut torn = odd;
    torn[1000] ^= 0x10;
    assert_eq!(superblock_latest(&even, &torn), Ok(superblock(10)));
    let garbage: Vec<u8> = body(32, 99);
    assert_eq!(superblock_latest(&even, &garbage), Ok(superblock(10)));
    // A write that never happened: the slot is still zero.
    assert_eq!(
        superblock_latest(&even, &[0; SUPERBLOCK_BYTES]),
        Ok(superblock(10))
    );
    assert_eq!(
        superblock_latest(&[0; SUPERBLOCK_BYTES], &odd),
        Ok(superblock(11))
    );
    // Neither valid.
    assert!(matches!(
        superblock_latest(&torn, &[0; SUPERBLOCK_BYTES]),
        Err(SuperblockError::NoValidCopy { .. })
    ));
    // A copy in the wrong slot is not trusted.
    assert!(matches!(
        superblock_latest(&odd, &even),
        Err(SuperblockError::NoValidCopy { .. })
    ));
    assert_eq!(superblock_latest(&odd, &odd), Ok(superblock(11)));
    // Both valid but for different shards: refuse rather than guess.
    let other_shard = superblock_encoded(&Superblock {
        shard: 2,
        ..superblock(11)
    });
    assert_eq!(
        superblock_latest(&even, &other_shard),
        Err(SuperblockError::CopiesDisagree)
    );
}

#[test]
fn superblock_geometry_is_validated() {
    let mut buf = superblock_encoded(&superblock(1));
    // Re-seal a copy with a checkpoint offset that is not sector aligned: only a checksum-valid
    // copy reaches the geometry check, so build it by hand from a valid one.
    buf[56..64].copy_from_slice(&4097u64.to_le_bytes());
    superblock_reseal(&mut buf);
    assert_eq!(
        decode_superblock(&buf),
        Err(SuperblockError::GeometryInvalid {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            checkpoint_offset: 4097
        })
    );
}

/// Re-seals `buf` (one superblock copy) after a field was edited by hand.
fn superblock_reseal(buf: &mut [u8; SUPERBLOCK_BYTES]) {
    buf[192..208].fill(0);
    let checksum = journal_checksum(buf);
    buf[192..208].copy_from_slice(&checksum.to_le_bytes());
}

#[test]
fn superblock_views_are_at_their_offsets_and_validated() {
    let expected = superblock(7);
    assert!(expected.log_view < expected.view && expected.commit_max > expected.op_durable);
    let mut buf = superblock_encoded(&expected);
    assert_eq!(buf[8..10], SUPERBLOCK_VERSION.to_le_bytes());
    assert_eq!(SUPERBLOCK_VERSION, 4);
    assert_eq!(buf[24..32], expected.view.to_le_bytes());
    assert_eq!(buf[160..168], expected.log_view.to_le_bytes());
    assert_eq!(buf[168..176], expected.commit_max.to_le_bytes());
    assert_eq!(buf[176..184], expected.settings_digest.to_le_bytes());
    // The reserved word after it must stay zero.
    let mut reserved = buf;
    reserved[190] = 1;
    superblock_reseal(&mut reserved);
    assert_eq!(
        decode_superblock(&reserved),
        Err(SuperblockError::ReservedNotZero)
    );
    // log_view above view is refused, even with a valid checksum.
    buf[160..168].copy_from_slice(&(expected.view + 1).to_le_bytes());
    superblock_reseal(&mut buf);
    assert_eq!(
        decode_superblock(&buf),
        Err(SuperblockError::ViewsInvalid {
            view: expected.view,
            log_view: expected.view + 1
        })
    );
    // log_view equal to view is fine.
    buf[160..168].copy_from_slice(&expected.view.to_le_bytes());
    superblock_reseal(&mut buf);
    assert_eq!(
        decode_superblock(&buf),
        Ok(Superblock {
            log_view: expected.view,
            ..expected
        })
    );
}

#[test]
fn superblocks_of_older_versions_are_refused_even_when_sealed() {
    for version in [1u16, 2, 3] {
        let mut buf = superblock_encoded(&superblock(3));
        buf[8..10].copy_from_slice(&version.to_le_bytes());
        superblock_reseal(&mut buf);
        assert_eq!(
            decode_superblock(&buf),
            Err(SuperblockError::UnsupportedVersion { version })
        );
        // Both copies of an older version: no valid copy, naming the version.
        let mut odd = superblock_encoded(&superblock(5));
        odd[8..10].copy_from_slice(&version.to_le_bytes());
        superblock_reseal(&mut odd);
        assert!(matches!(
            superblock_latest(&buf, &odd),
            Err(SuperblockError::NoValidCopy { .. })
        ));
    }
    assert_eq!(SUPERBLOCK_MAGIC.to_le_bytes(), *b"PCSUPERB");
}

#[test]
fn journal_checksum_is_blake3_truncated() {
    // BLAKE3("") = af1349b9f5f9a1a6a0404dea36dcc949…, first 16 bytes read little-endian.
    assert_eq!(
        journal_checksum(b""),
        0x49c9_dc36_ea4d_40a0_a6a1_f9f5_b949_13af
    );
    assert_ne!(journal_checksum(b"a"), journal_checksum(b"b"));
    assert_eq!(JOURNAL_CHAIN_ROOT, 0);
}

/// Throughput of the checksum candidates on 128 KiB buffers (about one 1,000-record batch).
/// Run: `cargo test --release -p percore-engine --test journal_format -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release with --nocapture"]
fn journal_checksum_throughput() {
    const BUFFER_BYTES: usize = 128 * 1024;
    const ROUND: Duration = Duration::from_millis(200);
    const ROUNDS: usize = 7;
    let buffer = body((BUFFER_BYTES / 128) as u32, 1);
    let key = [7u8; 32];

    type Candidate<'a> = (&'a str, Box<dyn Fn(&[u8]) -> u128 + 'a>);
    let candidates: Vec<Candidate> = vec![
        ("crc32c", Box::new(|b| u128::from(crc32c::crc32c(b)))),
        (
            "4 x crc32c (seeds 0..3)",
            Box::new(|b| {
                (0..4u32).fold(0u128, |acc, seed| {
                    acc << 32 | u128::from(crc32c::crc32c_append(seed, b))
                })
            }),
        ),
        (
            "blake3 unkeyed, 128 bits",
            Box::new(|b| u128::from_le_bytes(blake3::hash(b).as_bytes()[..16].try_into().unwrap())),
        ),
        (
            "blake3 keyed, 128 bits",
            Box::new(|b| {
                u128::from_le_bytes(
                    blake3::keyed_hash(&key, b).as_bytes()[..16]
                        .try_into()
                        .unwrap(),
                )
            }),
        ),
        ("journal_checksum", Box::new(journal_checksum)),
    ];

    println!(
        "journal checksum throughput, {BUFFER_BYTES}-byte buffers, {ROUNDS} rounds of {ROUND:?}, best and median round:"
    );
    for (name, checksum) in &candidates {
        let mut rounds_gbps: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                let mut iterations = 0u64;
                while start.elapsed() < ROUND {
                    for _ in 0..16 {
                        black_box(checksum(black_box(&buffer)));
                    }
                    iterations += 16;
                }
                (iterations as f64 * BUFFER_BYTES as f64) / start.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        rounds_gbps.sort_by(f64::total_cmp);
        let best = rounds_gbps[ROUNDS - 1];
        let median = rounds_gbps[ROUNDS / 2];
        let us_per_buffer = BUFFER_BYTES as f64 / (median * 1e9) * 1e6;
        println!(
            "  {name:<26} best {best:6.2} GB/s  median {median:6.2} GB/s  {us_per_buffer:6.1} us/128KiB (median)"
        );
    }
}
