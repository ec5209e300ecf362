//! The recovery scanner: clean ends, torn last writes (byte cuts and `O_DIRECT` sector tears,
//! over zero, garbage and stale old bytes), corruption inside the journal, op gaps, broken
//! chains, and scans that start mid-journal.

use percore_engine::journal::{
    ENTRY_BODY_BYTES_MAX_LIMIT, ENTRY_HEADER_BYTES, EntryError, EntryMeta, JOURNAL_CHAIN_ROOT,
    JournalChecksum, JournalScanError, SECTOR_BYTES, ScanOutcome, Tail, encode_entry,
    entry_bytes_padded, scan,
};
use proptest::prelude::*;

const RECORD_BYTES: u32 = 128;
const BODY_BYTES_MAX: usize = ENTRY_BODY_BYTES_MAX_LIMIT;
/// File offset of the test regions: not zero, so offsets are checked as file offsets.
const BASE_OFFSET: u64 = 3 * SECTOR_BYTES as u64;

/// Records per entry for op `op`: a mix of one-sector and multi-sector entries.
fn entry_count_of(op: u64) -> u32 {
    [1, 31, 40, 0, 70, 2][(op % 6) as usize]
}

#[derive(Clone, Copy, Debug)]
struct Written {
    op: u64,
    offset: usize,
    padded_bytes: usize,
    body_bytes: usize,
    checksum: JournalChecksum,
}

/// A journal region: entries `op_first..=op_last` back to back, then `zero_sectors` unwritten.
struct Journal {
    bytes: Vec<u8>,
    entries: Vec<Written>,
    checksum_before: JournalChecksum,
}

fn xorshift_fill(bytes: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    for byte in bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
}

/// Writes ops `ops` chained from `checksum_before`; `edit` may change the meta and the chain
/// value each entry is written with (to forge gaps and broken chains).
fn journal_with(
    ops: std::ops::RangeInclusive<u64>,
    checksum_before: JournalChecksum,
    zero_sectors: usize,
    seed: u64,
    mut edit: impl FnMut(&mut EntryMeta, &mut JournalChecksum),
) -> Journal {
    let mut bytes = Vec::new();
    let mut entries = Vec::new();
    let mut checksum_previous = checksum_before;
    for op in ops {
        let entry_count = entry_count_of(op);
        let mut body = vec![0; entry_count as usize * RECORD_BYTES as usize];
        xorshift_fill(&mut body, seed ^ op);
        let mut meta = EntryMeta {
            shard: 1,
            view: 1 + op / 4,
            op,
            operation: 2,
            entry_count,
            record_bytes: RECORD_BYTES,
            request_count: 0,
        };
        let mut chain = checksum_previous;
        edit(&mut meta, &mut chain);
        let offset = bytes.len();
        bytes.resize(offset + entry_bytes_padded(body.len()), 0);
        let (padded_bytes, checksum) = encode_entry(&mut bytes[offset..], &meta, &body, chain);
        entries.push(Written {
            op: meta.op,
            offset,
            padded_bytes,
            body_bytes: body.len(),
            checksum,
        });
        checksum_previous = checksum;
    }
    bytes.resize(bytes.len() + zero_sectors * SECTOR_BYTES, 0);
    Journal {
        bytes,
        entries,
        checksum_before,
    }
}

fn journal(ops: std::ops::RangeInclusive<u64>, zero_sectors: usize) -> Journal {
    journal_with(ops, JOURNAL_CHAIN_ROOT, zero_sectors, 0x5EED, |_, _| {})
}

/// Scans `bytes` as the region at [`BASE_OFFSET`], checking that delivered entries are
/// consecutive and at the right offsets; returns the outcome and the (op, offset) delivered.
fn scan_at(
    bytes: &[u8],
    op_next: u64,
    checksum_previous: JournalChecksum,
) -> (ScanOutcome, Vec<(u64, u64)>) {
    let mut delivered = Vec::new();
    let outcome = scan(
        bytes,
        BASE_OFFSET,
        op_next,
        checksum_previous,
        BODY_BYTES_MAX,
        |entry, offset| {
            assert_eq!(entry.meta.op, op_next + delivered.len() as u64);
            assert_eq!(entry.body.len(), entry.meta.entry_count as usize * 128);
            delivered.push((entry.meta.op, offset));
        },
    );
    assert_eq!(outcome.entries, delivered.len() as u64);
    assert_eq!(outcome.op_last, op_next + outcome.entries - 1);
    assert!(outcome.end_offset.is_multiple_of(SECTOR_BYTES as u64));
    (outcome, delivered)
}

fn offset_of(written: &Written) -> u64 {
    BASE_OFFSET + written.offset as u64
}

/// The outcome of a scan that delivered exactly `entries[..count]` and stopped with `tail`.
fn expected_outcome(journal: &Journal, count: usize, tail: Tail) -> ScanOutcome {
    let first_op = journal.entries[0].op;
    let (end_offset, checksum_last) = match count {
        0 => (BASE_OFFSET, journal.checksum_before),
        _ => {
            let last = &journal.entries[count - 1];
            (offset_of(last) + last.padded_bytes as u64, last.checksum)
        }
    };
    ScanOutcome {
        entries: count as u64,
        end_offset,
        op_last: first_op + count as u64 - 1,
        checksum_last,
        tail,
    }
}

fn delivered_of(journal: &Journal, count: usize) -> Vec<(u64, u64)> {
    journal.entries[..count]
        .iter()
        .map(|written| (written.op, offset_of(written)))
        .collect()
}

#[test]
fn an_empty_region_is_clean_at_its_base() {
    let (outcome, delivered) = scan_at(&[], 1, JOURNAL_CHAIN_ROOT);
    assert!(delivered.is_empty());
    assert_eq!(
        outcome,
        ScanOutcome {
            entries: 0,
            end_offset: BASE_OFFSET,
            op_last: 0,
            checksum_last: JOURNAL_CHAIN_ROOT,
            tail: Tail::Clean
        }
    );
    let (outcome, _) = scan_at(&[0; 4 * SECTOR_BYTES], 1, JOURNAL_CHAIN_ROOT);
    assert_eq!(outcome.tail, Tail::Clean);
    assert_eq!(outcome.end_offset, BASE_OFFSET);
}

#[test]
fn a_whole_journal_scans_clean() {
    for zero_sectors in [0, 3] {
        let journal = journal(1..=12, zero_sectors);
        let (outcome, delivered) = scan_at(&journal.bytes, 1, JOURNAL_CHAIN_ROOT);
        assert_eq!(outcome, expected_outcome(&journal, 12, Tail::Clean));
        assert_eq!(delivered, delivered_of(&journal, 12));
    }
}

/// What the sectors a torn write did not reach contain.
#[derive(Clone, Copy, Debug)]
enum Old {
    /// Never written (a fresh or preallocated file).
    Zero,
    /// Random bytes.
    Garbage,
    /// An earlier life of a recycled segment: valid entries with lower ops.
    Stale,
}

const OLDS: [Old; 3] = [Old::Zero, Old::Garbage, Old::Stale];

/// The previous contents of a region as long as `len`, for the journal of ops 100.. .
fn old_bytes(old: Old, len: usize) -> Vec<u8> {
    match old {
        Old::Zero => vec![0; len],
        Old::Garbage => {
            let mut bytes = vec![0; len];
            xorshift_fill(&mut bytes, 0xBAD);
            bytes
        }
        Old::Stale => {
            // Ops 1.. written by an earlier user of the file, with other bodies and sizes.
            let mut stale = journal_with(1..=40, JOURNAL_CHAIN_ROOT, 0, 0x01D, |_, _| {}).bytes;
            assert!(stale.len() >= len);
            stale.truncate(len);
            stale
        }
    }
}

/// The tail a scan must report when the last entry (at `last`) did not verify and the bytes
/// after the cut are `old`.
fn torn_tail(old: Old, nothing_new_landed: bool, last: &Written) -> Tail {
    match (old, nothing_new_landed) {
        (Old::Zero, true) => Tail::Clean,
        _ => Tail::Torn {
            offset: offset_of(last),
        },
    }
}

const OP_FIRST: u64 = 100;
const OP_LAST: u64 = 106;

fn torn_journal() -> Journal {
    // Mid-journal ops, so stale ops 1.. are lower; two unwritten sectors after the end.
    let base = journal(1..=OP_FIRST - 1, 0);
    let checksum_before = base.entries.last().unwrap().checksum;
    journal_with(OP_FIRST..=OP_LAST, checksum_before, 2, 0x5EED, |_, _| {})
}

#[test]
fn a_torn_tail_at_every_byte_of_the_last_entry_is_truncated() {
    let journal = torn_journal();
    let count = journal.entries.len();
    let last = journal.entries[count - 1];
    assert!(
        last.padded_bytes >= 2 * SECTOR_BYTES,
        "test a multi-sector entry"
    );
    for old in OLDS {
        let old_region = old_bytes(old, journal.bytes.len());
        for cut in 0..last.padded_bytes {
            // New bytes up to the cut, old bytes from there to the end of the region.
            let mut bytes = journal.bytes.clone();
            let cut_at = last.offset + cut;
            bytes[cut_at..].copy_from_slice(&old_region[cut_at..]);
            let (outcome, delivered) = scan_at(&bytes, OP_FIRST, journal.checksum_before);
            // Whole if old bytes reached only the padding (or equal the new ones).
            let entry_range = last.offset..last.offset + ENTRY_HEADER_BYTES + last.body_bytes;
            let entry_whole = bytes[entry_range.clone()] == journal.bytes[entry_range];
            let expected = if entry_whole {
                let tail = match old {
                    Old::Zero => Tail::Clean,
                    Old::Garbage | Old::Stale => Tail::Torn {
                        offset: offset_of(&last) + last.padded_bytes as u64,
                    },
                };
                expected_outcome(&journal, count, tail)
            } else {
                expected_outcome(&journal, count - 1, torn_tail(old, cut == 0, &last))
            };
            assert_eq!(outcome, expected, "{old:?} cut at byte {cut}");
            assert_eq!(
                delivered,
                delivered_of(&journal, expected.entries as usize),
                "{old:?} cut at byte {cut}"
            );
        }
    }
}

#[test]
fn an_o_direct_tear_of_any_sector_subset_of_the_last_entry_is_truncated() {
    let journal = torn_journal();
    let count = journal.entries.len();
    let last = journal.entries[count - 1];
    let sectors = last.padded_bytes / SECTOR_BYTES;
    assert!((2..=8).contains(&sectors));
    for old in OLDS {
        let old_region = old_bytes(old, journal.bytes.len());
        // Every subset of sectors that landed, except all of them.
        for landed in 0u32..(1 << sectors) - 1 {
            let mut bytes = journal.bytes.clone();
            for sector in 0..sectors {
                if landed & (1 << sector) == 0 {
                    let start = last.offset + sector * SECTOR_BYTES;
                    bytes[start..start + SECTOR_BYTES]
                        .copy_from_slice(&old_region[start..start + SECTOR_BYTES]);
                }
            }
            // The unwritten sectors after the journal hold old bytes too.
            let end = last.offset + last.padded_bytes;
            bytes[end..].copy_from_slice(&old_region[end..]);
            let (outcome, delivered) = scan_at(&bytes, OP_FIRST, journal.checksum_before);
            let nothing_new_landed = landed == 0;
            let tail = match (old, nothing_new_landed) {
                (Old::Zero, true) => Tail::Clean,
                _ => Tail::Torn {
                    offset: offset_of(&last),
                },
            };
            assert_eq!(
                outcome,
                expected_outcome(&journal, count - 1, tail),
                "{old:?}, sectors landed {landed:#b}"
            );
            assert_eq!(delivered, delivered_of(&journal, count - 1));
        }
    }
}

#[test]
fn a_corrupt_entry_before_the_tail_is_reported_not_skipped() {
    let journal = journal(1..=12, 2);
    for index in 0..journal.entries.len() - 1 {
        let written = journal.entries[index];
        let damages: [(usize, JournalScanError); 3] = [
            // In the header checksum field, in the body, and a lost (zero) first sector.
            (
                written.offset + 80,
                JournalScanError::Entry(EntryError::HeaderChecksum),
            ),
            (
                // The last byte of the body, or of the header if there is no body.
                written.offset + ENTRY_HEADER_BYTES + written.body_bytes - 1,
                JournalScanError::Entry(if written.body_bytes == 0 {
                    EntryError::HeaderChecksum
                } else {
                    EntryError::BodyChecksum
                }),
            ),
            (
                written.offset,
                JournalScanError::Entry(EntryError::BadMagic),
            ),
        ];
        for (damage, (at, error)) in damages.into_iter().enumerate() {
            let mut bytes = journal.bytes.clone();
            if damage == 2 {
                bytes[at..at + SECTOR_BYTES].fill(0);
            } else {
                bytes[at] ^= 0x04;
            }
            let (outcome, delivered) = scan_at(&bytes, 1, JOURNAL_CHAIN_ROOT);
            let tail = Tail::Corrupt {
                offset: offset_of(&written),
                op_expected: written.op,
                error,
            };
            assert_eq!(
                outcome,
                expected_outcome(&journal, index, tail),
                "entry {index} damage {damage}"
            );
            assert_eq!(delivered, delivered_of(&journal, index));
        }
    }
}

#[test]
fn a_bit_flip_in_the_last_entry_reads_as_a_torn_tail() {
    // The documented limit: without later history, damage to the last entry cannot be told
    // from a torn write. The caller compares op_last with what was acknowledged durable.
    let journal = journal(1..=5, 1);
    let last = journal.entries[4];
    let mut bytes = journal.bytes.clone();
    bytes[last.offset + ENTRY_HEADER_BYTES] ^= 1;
    let (outcome, _) = scan_at(&bytes, 1, JOURNAL_CHAIN_ROOT);
    assert_eq!(
        outcome,
        expected_outcome(
            &journal,
            4,
            Tail::Torn {
                offset: offset_of(&last)
            }
        )
    );
}

#[test]
fn an_op_gap_is_corruption_wherever_it_is() {
    for gap_op in [1u64, 4, 8] {
        // Ops 1..=8 with `gap_op` missing: every entry from there on is written one op later,
        // correctly chained, so only the op sequence is wrong.
        let journal = journal_with(1..=8, JOURNAL_CHAIN_ROOT, 1, 7, |meta, _| {
            if meta.op >= gap_op {
                meta.op += 1;
            }
        });
        let index = (gap_op - 1) as usize;
        let (outcome, delivered) = scan_at(&journal.bytes, 1, JOURNAL_CHAIN_ROOT);
        let tail = Tail::Corrupt {
            offset: offset_of(&journal.entries[index]),
            op_expected: gap_op,
            error: JournalScanError::OpGap {
                expected: gap_op,
                found: gap_op + 1,
            },
        };
        assert_eq!(outcome.tail, tail, "gap at op {gap_op}");
        assert_eq!(outcome.entries, index as u64);
        assert_eq!(delivered, delivered_of(&journal, index));
    }
}

#[test]
fn a_broken_chain_is_corruption_wherever_it_is() {
    for broken_op in [1u64, 5, 8] {
        let journal = journal_with(1..=8, JOURNAL_CHAIN_ROOT, 1, 9, |meta, chain| {
            if meta.op == broken_op {
                *chain ^= 1;
            }
        });
        let index = (broken_op - 1) as usize;
        let (outcome, delivered) = scan_at(&journal.bytes, 1, JOURNAL_CHAIN_ROOT);
        // Entries after the broken one chain to it, but the scan stops at the break.
        let tail = Tail::Corrupt {
            offset: offset_of(&journal.entries[index]),
            op_expected: broken_op,
            error: JournalScanError::ChainBroken { op: broken_op },
        };
        assert_eq!(
            outcome,
            expected_outcome(&journal, index, tail),
            "chain broken at op {broken_op}"
        );
        assert_eq!(delivered, delivered_of(&journal, index));
    }
}

#[test]
fn stale_lower_ops_after_the_end_are_a_torn_tail() {
    // A recycled segment: after ops 100..=106, an older life's op 3 starts exactly at the end.
    let journal = torn_journal();
    let stale = journal_with(3..=3, 12345, 0, 1, |_, _| {});
    let end = journal.entries.last().unwrap().offset + journal.entries.last().unwrap().padded_bytes;
    let mut bytes = journal.bytes.clone();
    bytes[end..end + stale.bytes.len()].copy_from_slice(&stale.bytes);
    let (outcome, _) = scan_at(&bytes, OP_FIRST, journal.checksum_before);
    assert_eq!(
        outcome,
        expected_outcome(
            &journal,
            journal.entries.len(),
            Tail::Torn {
                offset: BASE_OFFSET + end as u64
            }
        )
    );
}

#[test]
fn a_torn_group_write_with_a_later_entry_landed_is_corrupt() {
    // The documented limit: one write held ops 105 and 106; a sector of 105 tore while 106
    // landed. The bytes cannot tell this from corruption of a durable entry.
    let journal = torn_journal();
    let count = journal.entries.len();
    let torn = journal.entries[count - 2];
    let mut bytes = journal.bytes.clone();
    bytes[torn.offset..torn.offset + SECTOR_BYTES].fill(0);
    let (outcome, _) = scan_at(&bytes, OP_FIRST, journal.checksum_before);
    assert_eq!(
        outcome.tail,
        Tail::Corrupt {
            offset: offset_of(&torn),
            op_expected: torn.op,
            error: JournalScanError::Entry(EntryError::BadMagic)
        }
    );
    assert_eq!(outcome.end_offset, offset_of(&torn));
}

#[test]
fn a_scan_can_start_mid_journal() {
    let journal = journal(1..=12, 1);
    for start in [1usize, 5, 11] {
        let from = journal.entries[start];
        let checksum_previous = journal.entries[start - 1].checksum;
        let region = &journal.bytes[from.offset..];
        let (outcome, delivered) = scan_at(region, from.op, checksum_previous);
        let end = journal.entries[11].offset + journal.entries[11].padded_bytes - from.offset;
        assert_eq!(
            outcome,
            ScanOutcome {
                entries: (12 - start) as u64,
                end_offset: BASE_OFFSET + end as u64,
                op_last: 12,
                checksum_last: journal.entries[11].checksum,
                tail: Tail::Clean,
            }
        );
        assert_eq!(delivered[0], (from.op, BASE_OFFSET));

        // The wrong chain value or op number at the start is corruption, not an empty journal.
        let (outcome, _) = scan_at(region, from.op, checksum_previous ^ 1);
        assert_eq!(
            outcome.tail,
            Tail::Corrupt {
                offset: BASE_OFFSET,
                op_expected: from.op,
                error: JournalScanError::ChainBroken { op: from.op }
            }
        );
        let (outcome, _) = scan_at(region, from.op - 1, checksum_previous);
        assert!(matches!(
            outcome.tail,
            Tail::Corrupt {
                error: JournalScanError::OpGap { .. },
                ..
            }
        ));
        assert_eq!(outcome.entries, 0);
    }
}

#[test]
fn a_region_ending_inside_an_entry_ends_torn_there() {
    let journal = journal(1..=6, 0);
    let last = journal.entries[5];
    // The header and body are there, the padding is cut.
    let bytes = &journal.bytes[..last.offset + ENTRY_HEADER_BYTES + last.body_bytes];
    let (outcome, _) = scan_at(bytes, 1, JOURNAL_CHAIN_ROOT);
    assert_eq!(
        outcome,
        expected_outcome(
            &journal,
            5,
            Tail::Torn {
                offset: offset_of(&last)
            }
        )
    );
}

proptest! {
    #[test]
    fn scan_never_panics_and_stays_in_its_region(
        bytes in prop::collection::vec(any::<u8>(), 0..3 * SECTOR_BYTES),
        op_next in 1u64..,
        checksum_previous in any::<u128>(),
    ) {
        let (outcome, _) = scan_at(&bytes, op_next, checksum_previous);
        prop_assert!(outcome.end_offset >= BASE_OFFSET);
        prop_assert!(outcome.end_offset <= BASE_OFFSET + bytes.len().next_multiple_of(SECTOR_BYTES) as u64);
    }

    /// Damage anywhere in a journal: the scan delivers a prefix of the true entries, and
    /// stops exactly at the first damaged entry; damage before the last entry is Corrupt.
    #[test]
    fn damage_stops_the_scan_at_the_first_damaged_entry(
        damage in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4),
    ) {
        let journal = journal(1..=9, 1);
        let mut bytes = journal.bytes.clone();
        for (index, flip) in damage {
            let at = index.index(bytes.len());
            bytes[at] ^= flip;
        }
        // Entries whose header or body changed (padding and the free tail are not data).
        let damaged: Vec<usize> = (0..journal.entries.len())
            .filter(|&position| {
                let written = journal.entries[position];
                let range = written.offset..written.offset + ENTRY_HEADER_BYTES + written.body_bytes;
                bytes[range.clone()] != journal.bytes[range]
            })
            .collect();
        let (outcome, delivered) = scan_at(&bytes, 1, JOURNAL_CHAIN_ROOT);
        match damaged.iter().min() {
            None => {
                prop_assert_eq!(outcome.entries, 9);
                prop_assert_eq!(delivered, delivered_of(&journal, 9));
            }
            Some(&first) => {
                prop_assert_eq!(outcome.entries, first as u64);
                prop_assert_eq!(delivered, delivered_of(&journal, first));
                prop_assert_eq!(outcome.end_offset, offset_of(&journal.entries[first]));
                let intact_after_first = (first + 1..journal.entries.len())
                    .any(|position| !damaged.contains(&position));
                prop_assert_eq!(
                    matches!(outcome.tail, Tail::Corrupt { .. }),
                    intact_after_first
                );
                match outcome.tail {
                    Tail::Corrupt { offset, op_expected, .. } => {
                        prop_assert_eq!(offset, outcome.end_offset);
                        prop_assert_eq!(op_expected, first as u64 + 1);
                    }
                    Tail::Torn { offset } => {
                        prop_assert_eq!(offset, outcome.end_offset);
                    }
                    Tail::Clean => prop_assert!(false, "damage read as a clean end"),
                }
            }
        }
    }
}
