//! Property tests: random operation sequences on one thread, checked against a `VecDeque`
//! model of a bounded FIFO. Small capacities and long sequences make the rings wrap many
//! times; every operation's result and the fill level are compared after each step.
#![cfg(not(loom))]

use std::collections::VecDeque;

use percore_engine::ring::mpmc::Mpmc;
use percore_engine::ring::{Counting, spsc};
use proptest::prelude::*;

/// One step of a test run.
#[derive(Debug, Clone)]
enum Op {
    Push(u32),
    PushSlice(Vec<u32>),
    PushIter(Vec<u32>),
    Pop,
    PopSlice(usize),
    PopEach(usize),
    /// Borrow up to `max`, then commit `commit` of them (clamped to the chunk), or
    /// nothing when `None`.
    ReadChunk {
        max: usize,
        commit: Option<usize>,
    },
    FreeSlots,
    Available,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u32>().prop_map(Op::Push),
        2 => prop::collection::vec(any::<u32>(), 0..40).prop_map(Op::PushSlice),
        2 => prop::collection::vec(any::<u32>(), 0..40).prop_map(Op::PushIter),
        3 => Just(Op::Pop),
        2 => (0usize..40).prop_map(Op::PopSlice),
        2 => (0usize..40).prop_map(Op::PopEach),
        2 => (0usize..40, prop::option::of(0usize..40))
            .prop_map(|(max, commit)| Op::ReadChunk { max, commit }),
        1 => Just(Op::FreeSlots),
        1 => Just(Op::Available),
    ]
}

/// A power-of-two capacity from 2^min_log2 to 32.
fn capacity(min_log2: u32) -> impl Strategy<Value = usize> {
    (min_log2..=5u32).prop_map(|log2| 1usize << log2)
}

/// Pops up to `n` items from the model.
fn model_take(model: &mut VecDeque<u32>, n: usize) -> Vec<u32> {
    let n = n.min(model.len());
    model.drain(..n).collect()
}

fn run_spsc(capacity: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let (mut producer, mut consumer) = spsc::channel_with_metrics::<u32, Counting>(capacity);
    let mut model = VecDeque::new();
    let (mut pushed, mut full_events) = (0u64, 0u64);
    for op in ops {
        let free = capacity - model.len();
        match op {
            Op::Push(item) => {
                let result = producer.push(*item);
                if free > 0 {
                    prop_assert!(result.is_ok());
                    model.push_back(*item);
                    pushed += 1;
                } else {
                    prop_assert_eq!(result, Err(spsc::Full(*item)));
                    full_events += 1;
                }
            }
            Op::PushSlice(items) => {
                let n = producer.push_slice(items);
                prop_assert_eq!(n, items.len().min(free));
                model.extend(&items[..n]);
                pushed += n as u64;
                full_events += u64::from(n < items.len());
            }
            Op::PushIter(items) => {
                let mut source = items.iter().copied();
                let n = producer.push_iter(&mut source);
                prop_assert_eq!(n, items.len().min(free));
                // Never pulls an item it cannot store.
                prop_assert_eq!(source.len(), items.len() - n);
                model.extend(&items[..n]);
                pushed += n as u64;
                full_events += u64::from(free == 0);
            }
            Op::Pop => {
                prop_assert_eq!(consumer.pop(), model.pop_front());
            }
            Op::PopSlice(len) => {
                let mut out = vec![0u32; *len];
                let n = consumer.pop_slice(&mut out);
                prop_assert_eq!(&out[..n], &model_take(&mut model, *len)[..]);
            }
            Op::PopEach(max) => {
                let mut got = Vec::new();
                let n = consumer.pop_each(*max, |item| got.push(item));
                prop_assert_eq!(n, got.len());
                prop_assert_eq!(got, model_take(&mut model, *max));
            }
            Op::ReadChunk { max, commit } => {
                let chunk = consumer.read_chunk(*max);
                let (first, second) = chunk.as_slices();
                let seen: Vec<u32> = first.iter().chain(second).copied().collect();
                let expected: Vec<u32> = model.iter().take(*max).copied().collect();
                prop_assert_eq!(chunk.len(), expected.len());
                prop_assert_eq!(&seen, &expected);
                if let Some(commit) = commit {
                    let commit = (*commit).min(chunk.len());
                    chunk.commit(commit);
                    model_take(&mut model, commit);
                }
            }
            Op::FreeSlots => prop_assert_eq!(producer.free_slots(), free),
            Op::Available => prop_assert_eq!(consumer.available(), model.len()),
        }
        prop_assert_eq!(producer.len(), model.len());
        prop_assert_eq!(consumer.len(), model.len());
        prop_assert_eq!(consumer.is_empty(), model.is_empty());
    }
    let stats = producer.stats();
    prop_assert_eq!(stats.pushed, pushed);
    prop_assert_eq!(stats.popped, pushed - model.len() as u64);
    prop_assert_eq!(stats.full_events, full_events);
    Ok(())
}

fn run_mpmc(capacity: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let ring = Mpmc::<u32, Counting>::new(capacity);
    let mut model = VecDeque::new();
    let mut pushed = 0u64;
    for op in ops {
        let free = capacity - model.len();
        match op {
            Op::Push(item) => {
                let result = ring.push(*item);
                if free > 0 {
                    prop_assert!(result.is_ok());
                    model.push_back(*item);
                    pushed += 1;
                } else {
                    prop_assert_eq!(result, Err(spsc::Full(*item)));
                }
            }
            // Mpmc has no iterator push; a slice push stands in for it.
            Op::PushSlice(items) | Op::PushIter(items) => {
                let n = ring.push_slice(items);
                prop_assert_eq!(n, items.len().min(free));
                model.extend(&items[..n]);
                pushed += n as u64;
            }
            Op::Pop => prop_assert_eq!(ring.pop(), model.pop_front()),
            Op::PopSlice(len) => {
                let mut out = vec![0u32; *len];
                let n = ring.pop_slice(&mut out);
                prop_assert_eq!(&out[..n], &model_take(&mut model, *len)[..]);
            }
            // Mpmc has no chunk read; a batch pop of the committed count stands in for it.
            Op::PopEach(max)
            | Op::ReadChunk {
                commit: Some(max), ..
            } => {
                let mut got = Vec::new();
                let n = ring.pop_batch(*max, |item| got.push(item));
                prop_assert_eq!(n, got.len());
                prop_assert_eq!(got, model_take(&mut model, *max));
            }
            Op::ReadChunk { commit: None, .. } | Op::FreeSlots | Op::Available => {}
        }
        prop_assert_eq!(ring.len(), model.len());
        prop_assert_eq!(ring.is_empty(), model.is_empty());
    }
    let stats = ring.stats();
    prop_assert_eq!(stats.pushed, pushed);
    prop_assert_eq!(stats.popped, pushed - model.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn spsc_matches_vecdeque(
        capacity in capacity(0),
        ops in prop::collection::vec(op(), 0..200),
    ) {
        run_spsc(capacity, &ops)?;
    }

    #[test]
    fn mpmc_matches_vecdeque(
        capacity in capacity(1),
        ops in prop::collection::vec(op(), 0..200),
    ) {
        run_mpmc(capacity, &ops)?;
    }
}

/// Items that are not `Copy` still leave each ring exactly once, in order, through the
/// moving operations (push, push_iter, pop, pop_each / pop_batch, drop of the ring).
mod owned_items {
    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn spsc_moves_strings(ops in prop::collection::vec((0u8..4, 0usize..12), 0..150)) {
            let (mut producer, mut consumer) = spsc::channel::<String>(8);
            let mut model = VecDeque::new();
            let mut next = 0u32;
            for (kind, n) in ops {
                match kind {
                    0 => {
                        let item = next.to_string();
                        if producer.push(item.clone()).is_ok() {
                            model.push_back(item);
                            next += 1;
                        }
                    }
                    1 => {
                        let start = next;
                        let mut source = (start..start + n as u32).map(|v| v.to_string());
                        let pushed = producer.push_iter(&mut source);
                        model.extend((start..start + pushed as u32).map(|v| v.to_string()));
                        next += pushed as u32;
                    }
                    2 => prop_assert_eq!(consumer.pop(), model.pop_front()),
                    _ => {
                        let mut got = Vec::new();
                        consumer.pop_each(n, |item| got.push(item));
                        let expected: Vec<String> = model.drain(..n.min(model.len())).collect();
                        prop_assert_eq!(got, expected);
                    }
                }
            }
        }

        #[test]
        fn mpmc_moves_strings(ops in prop::collection::vec((0u8..3, 0usize..12), 0..150)) {
            let ring = Mpmc::<String>::new(8);
            let mut model = VecDeque::new();
            for (i, (kind, n)) in ops.into_iter().enumerate() {
                match kind {
                    0 => {
                        let item = i.to_string();
                        if ring.push(item.clone()).is_ok() {
                            model.push_back(item);
                        }
                    }
                    1 => prop_assert_eq!(ring.pop(), model.pop_front()),
                    _ => {
                        let mut got = Vec::new();
                        ring.pop_batch(n, |item| got.push(item));
                        let expected: Vec<String> = model.drain(..n.min(model.len())).collect();
                        prop_assert_eq!(got, expected);
                    }
                }
            }
        }
    }
}
