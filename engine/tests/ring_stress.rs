//! Multi-threaded stress tests: real threads, many items, mixed single and batch
//! operations. Each side yields when it cannot make progress (the test machine may have
//! fewer cores than threads), and every wait is bounded by a deadline so a lost item fails
//! the test instead of hanging it.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use percore_engine::ring::mpmc::Mpmc;
use percore_engine::ring::spsc;

/// A run that takes longer than this has lost items (or livelocked).
const DEADLINE: Duration = Duration::from_secs(60);

/// Yields, and panics once `started + DEADLINE` has passed.
fn wait(started: Instant, what: &str) {
    assert!(started.elapsed() < DEADLINE, "deadline passed while {what}");
    thread::yield_now();
}

#[test]
fn spsc_every_item_once_in_order() {
    const ITEMS: u64 = 1_500_000;
    let (mut producer, mut consumer) = spsc::channel::<u64>(1024);
    let started = Instant::now();
    let sender = thread::spawn(move || {
        let mut next = 0u64;
        let mut batch = Vec::with_capacity(300);
        let mut round = 0u64;
        while next < ITEMS {
            round += 1;
            let pushed = match round % 4 {
                0 => usize::from(producer.push(next).is_ok()),
                1 => {
                    batch.clear();
                    batch.extend(next..ITEMS.min(next + 1 + round % 300));
                    producer.push_slice(&batch)
                }
                _ => {
                    let mut source = next..ITEMS.min(next + 1 + round % 500);
                    producer.push_iter(&mut source)
                }
            };
            next += pushed as u64;
            if pushed == 0 {
                wait(started, "pushing");
            }
        }
    });
    let mut expected = 0u64;
    let mut out = vec![0u64; 400];
    let mut round = 0usize;
    while expected < ITEMS {
        round += 1;
        let popped = match round % 4 {
            0 => match consumer.pop() {
                Some(item) => {
                    assert_eq!(item, expected);
                    expected += 1;
                    1
                }
                None => 0,
            },
            1 => {
                let n = consumer.pop_slice(&mut out[..1 + round % 400]);
                for &item in &out[..n] {
                    assert_eq!(item, expected);
                    expected += 1;
                }
                n
            }
            2 => consumer.pop_each(1 + round % 700, |item| {
                assert_eq!(item, expected);
                expected += 1;
            }),
            _ => {
                let chunk = consumer.read_chunk(1 + round % 600);
                let (first, second) = chunk.as_slices();
                for &item in first.iter().chain(second) {
                    assert_eq!(item, expected);
                    expected += 1;
                }
                let n = chunk.len();
                chunk.commit_all();
                n
            }
        };
        if popped == 0 {
            wait(started, "popping");
        }
    }
    sender.join().unwrap();
    assert!(consumer.is_abandoned());
    assert_eq!(consumer.pop(), None);
}

#[test]
fn mpmc_four_by_four_every_item_once() {
    const PRODUCERS: usize = 4;
    const CONSUMERS: usize = 4;
    const PER_PRODUCER: usize = 250_000;
    const ITEMS: usize = PRODUCERS * PER_PRODUCER;
    // Item `i` of producer `p` is `p * PER_PRODUCER + i`.
    let ring = Mpmc::<usize>::new(256);
    let seen: Vec<AtomicBool> = (0..ITEMS).map(|_| AtomicBool::new(false)).collect();
    let received = AtomicUsize::new(0);
    let started = Instant::now();
    thread::scope(|scope| {
        for producer in 0..PRODUCERS {
            let ring = &ring;
            scope.spawn(move || {
                let base = producer * PER_PRODUCER;
                let mut next = 0;
                let mut batch = Vec::with_capacity(64);
                while next < PER_PRODUCER {
                    let pushed = if next % 3 == 0 {
                        batch.clear();
                        batch.extend(base + next..base + PER_PRODUCER.min(next + 1 + next % 64));
                        ring.push_slice(&batch)
                    } else {
                        usize::from(ring.push(base + next).is_ok())
                    };
                    next += pushed;
                    if pushed == 0 {
                        wait(started, "pushing");
                    }
                }
            });
        }
        for consumer in 0..CONSUMERS {
            let (ring, seen, received) = (&ring, &seen, &received);
            scope.spawn(move || {
                // Positions are claimed in order, so one consumer sees each producer's
                // items in push order (a property of this design, checked here too).
                let mut last_from = [None::<usize>; PRODUCERS];
                let mut record = |item: usize| {
                    let from = item / PER_PRODUCER;
                    assert!(
                        last_from[from].is_none_or(|last| last < item),
                        "consumer {consumer} saw {item} after {:?}",
                        last_from[from]
                    );
                    last_from[from] = Some(item);
                    assert!(
                        !seen[item].swap(true, Ordering::Relaxed),
                        "{item} arrived twice"
                    );
                };
                let mut out = [0usize; 48];
                let mut round = 0usize;
                while received.load(Ordering::Relaxed) < ITEMS {
                    round += 1;
                    let n = match round % 3 {
                        0 => ring.pop().map(&mut record).map_or(0, |()| 1),
                        1 => ring.pop_batch(1 + round % 80, &mut record),
                        _ => {
                            let n = ring.pop_slice(&mut out[..1 + round % 48]);
                            out[..n].iter().for_each(|&item| record(item));
                            n
                        }
                    };
                    received.fetch_add(n, Ordering::Relaxed);
                    if n == 0 {
                        wait(started, "popping");
                    }
                }
            });
        }
    });
    assert_eq!(received.load(Ordering::Relaxed), ITEMS);
    assert!(
        seen.iter().all(|s| s.load(Ordering::Relaxed)),
        "an item never arrived"
    );
    assert!(ring.is_empty());
}
