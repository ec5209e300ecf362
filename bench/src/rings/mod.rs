//! Ring benchmarks: percore's SPSC and MPMC rings against rtrb, heapless, crossbeam and std.
//!
//! Every kernel moves keys `0..ops` from producer threads to consumer threads and returns
//! the sum of the keys received. All queues get the same capacity (`RING_CAPACITY`), the
//! same item type and the same wait policy (`harness::Backoff`), so the only difference
//! inside a row is the queue.

pub mod mpmc;
pub mod pingpong;
pub mod spsc;

use crate::harness::{Bench, Metric, Sample};
use crate::machine::Pins;

/// Slots in every ring under test (heapless::spsc can hold one fewer: it keeps one slot
/// empty to tell full from empty).
pub const RING_CAPACITY: usize = 4_096;

/// Items per batch for the batched SPSC rows and `pop_batch`.
pub const BATCH_ITEMS: usize = 256;

const _: () = assert!(RING_CAPACITY.is_power_of_two());
const _: () = assert!(
    BATCH_ITEMS <= RING_CAPACITY / 2,
    "a batch must fit with room to spare"
);

/// Default items per timed round for throughput rows.
pub const ITEMS_DEFAULT: u64 = 1_000_000;
/// Ping-pong round trips are this many times fewer than throughput items (each costs a
/// full cross-core round trip rather than a pipelined slot).
pub const PINGPONG_DIVISOR: u64 = 20;
/// The 2P/2C rows oversubscribe a 2-core box; they get this many times fewer items.
pub const OVERSUBSCRIBED_DIVISOR: u64 = 4;

/// All ring rows for `items` items per round; each row name lists 16 then 128 bytes.
pub fn benches(items: u64) -> Vec<Bench> {
    let small = rows_for::<16>(items);
    let large = rows_for::<128>(items);
    assert_eq!(small.len(), large.len(), "both sizes have the same rows");
    small
        .into_iter()
        .zip(large)
        .flat_map(|(small, large)| [small, large])
        .collect()
}

/// A two-thread SPSC (or ping-pong) kernel.
type PairKernel = fn(u64, &Pins) -> Sample;
/// A shared-queue kernel taking the number of producer/consumer pairs.
type GroupKernel = fn(u64, &Pins, usize) -> Sample;

/// The rows for one item size `N`.
fn rows_for<const N: usize>(items: u64) -> Vec<Bench> {
    let items = items.max(1);
    let single: PairKernel = spsc::ours_single::<N>;
    let slice: PairKernel = spsc::ours_batch_slice::<N>;
    let spsc_rows: [(&'static str, &'static str, PairKernel, PairKernel); 7] = [
        ("spsc_single", "rtrb", single, spsc::rtrb_single::<N>),
        (
            "spsc_single",
            "heapless::spsc::Queue",
            single,
            spsc::heapless_single::<N>,
        ),
        (
            "spsc_single",
            "crossbeam::ArrayQueue",
            single,
            spsc::crossbeam_array_single::<N>,
        ),
        (
            "spsc_single",
            "std::sync_channel",
            single,
            spsc::std_sync_channel::<N>,
        ),
        (
            "spsc_batch256_slice",
            "rtrb(chunk)",
            slice,
            spsc::rtrb_batch_chunk::<N>,
        ),
        (
            "spsc_batch256_slice",
            "rtrb(single)",
            slice,
            spsc::rtrb_single::<N>,
        ),
        (
            "spsc_batch256_chunk",
            "rtrb(chunk)",
            spsc::ours_batch_chunk::<N>,
            spsc::rtrb_batch_chunk::<N>,
        ),
    ];
    let mut rows: Vec<Bench> = spsc_rows
        .into_iter()
        .map(|(name, peer, ours, peer_kernel)| Bench {
            name,
            peer,
            item_bytes: N,
            threads: "1P/1C",
            metric: Metric::Throughput,
            ops: items,
            ours: Box::new(ours),
            peer_kernel: Box::new(peer_kernel),
        })
        .collect();

    let mpmc_rows: [(&'static str, &'static str, GroupKernel, GroupKernel); 4] = [
        (
            "mpmc",
            "crossbeam::ArrayQueue",
            mpmc::ours::<N>,
            mpmc::crossbeam_array::<N>,
        ),
        (
            "mpmc",
            "crossbeam::SegQueue",
            mpmc::ours::<N>,
            mpmc::crossbeam_seg::<N>,
        ),
        (
            "mpmc",
            "heapless::mpmc::Queue",
            mpmc::ours::<N>,
            mpmc::heapless_mpmc::<N>,
        ),
        (
            "mpmc_pop_batch256",
            "crossbeam::ArrayQueue",
            mpmc::ours_pop_batch::<N>,
            mpmc::crossbeam_array::<N>,
        ),
    ];
    let crowded = (items / OVERSUBSCRIBED_DIVISOR).max(1);
    for (pairs, threads, ops) in [(1usize, "1P/1C", items), (2, "2P/2C", crowded)] {
        rows.extend(mpmc_rows.map(|(name, peer, ours, peer_kernel)| Bench {
            name,
            peer,
            item_bytes: N,
            threads,
            metric: Metric::Throughput,
            ops,
            ours: Box::new(move |ops, pins| ours(ops, pins, pairs)),
            peer_kernel: Box::new(move |ops, pins| peer_kernel(ops, pins, pairs)),
        }));
    }

    rows.push(Bench {
        name: "mpmc_push_only",
        peer: "crossbeam::ArrayQueue",
        item_bytes: N,
        threads: "2P/0C",
        metric: Metric::Throughput,
        ops: crowded,
        ours: Box::new(|ops, pins| mpmc::ours_push_only::<N>(ops, pins, 2)),
        peer_kernel: Box::new(|ops, pins| mpmc::crossbeam_array_push_only::<N>(ops, pins, 2)),
    });
    rows.push(Bench {
        name: "pingpong_one_way",
        peer: "rtrb",
        item_bytes: N,
        threads: "1P/1C",
        metric: Metric::OneWayLatency,
        ops: (items / PINGPONG_DIVISOR).max(1),
        ours: Box::new(pingpong::ours::<N>),
        peer_kernel: Box::new(pingpong::rtrb::<N>),
    });
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ring kernel, ours and peers, moves every key exactly once (tiny counts,
    /// pinned like a real run, so the pinned code path is exercised too).
    #[test]
    fn every_ring_kernel_moves_every_item() {
        crate::harness::on_big_stack(check_every_ring_kernel);
    }

    fn check_every_ring_kernel() {
        let pins = Pins::detect();
        let rows = benches(3_000);
        assert_eq!(rows.len() % 2, 0, "every row comes in two sizes");
        for bench in &rows {
            for (side, kernel) in [("ours", &bench.ours), ("peer", &bench.peer_kernel)] {
                let sample = kernel(bench.ops, &pins);
                assert_eq!(
                    sample.checksum, sample.expected,
                    "{side} of {} vs {} ({} B) lost or duplicated items",
                    bench.name, bench.peer, bench.item_bytes
                );
                assert!(
                    sample.items >= bench.ops,
                    "{side} of {} counted too few items",
                    bench.name
                );
            }
        }
    }

    #[test]
    fn rows_are_grouped_by_name_then_size() {
        let rows = benches(10);
        for pair in rows.chunks(2) {
            assert_eq!((pair[0].name, pair[0].peer), (pair[1].name, pair[1].peer));
            assert_eq!((pair[0].item_bytes, pair[1].item_bytes), (16, 128));
        }
    }
}
