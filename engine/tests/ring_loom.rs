//! Loom models of every ring path that crosses threads, and of the ring waiters' park and
//! wake-up protocol.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p percore-engine --release --test ring_loom`
//!
//! Each model explores every interleaving of its threads up to a preemption bound: 4 unless
//! `LOOM_MAX_PREEMPTIONS` says otherwise (loom's usual knob). The models are small on
//! purpose (capacity 2 to 4, at most 4 items), which is enough to wrap the rings and
//! to hit full and empty from both sides. Items are `loom::sync::Arc`s where leaks or
//! double drops matter: loom fails a model that leaks one, and a double drop would trip
//! its reference-count checks.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;
use percore_engine::ring::mpmc::Mpmc;
use percore_engine::ring::spsc;

const PREEMPTION_BOUND_DEFAULT: usize = 4;

/// Runs `model` under loom with the preemption bound described in the module docs.
fn check(model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTION_BOUND_DEFAULT);
    }
    builder.check(model);
}

/// Pushes `items` one at a time, yielding while the ring is full.
fn push_all<T>(producer: &mut spsc::Producer<T>, items: impl IntoIterator<Item = T>) {
    for mut item in items {
        loop {
            match producer.push(item) {
                Ok(()) => break,
                Err(spsc::Full(back)) => {
                    item = back;
                    thread::yield_now();
                }
            }
        }
    }
}

#[test]
fn spsc_single_push_pop_wraps() {
    check(|| {
        let (mut producer, mut consumer) = spsc::channel::<usize>(2);
        let sender = thread::spawn(move || push_all(&mut producer, 0..3));
        let mut expected = 0;
        while expected < 3 {
            match consumer.pop() {
                Some(item) => {
                    assert_eq!(item, expected);
                    expected += 1;
                }
                None => thread::yield_now(),
            }
        }
        sender.join().unwrap();
        assert_eq!(consumer.pop(), None);
    });
}

#[test]
fn spsc_batch_push_slice_pop_slice() {
    check(|| {
        let (mut producer, mut consumer) = spsc::channel::<usize>(4);
        let sender = thread::spawn(move || {
            let items = [1, 2, 3, 4, 5];
            let mut sent = 0;
            while sent < items.len() {
                let n = producer.push_slice(&items[sent..]);
                sent += n;
                if n == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut received = Vec::new();
        let mut out = [0usize; 3];
        while received.len() < 5 {
            let n = consumer.pop_slice(&mut out);
            received.extend_from_slice(&out[..n]);
            if n == 0 {
                thread::yield_now();
            }
        }
        sender.join().unwrap();
        assert_eq!(received, [1, 2, 3, 4, 5]);
    });
}

#[test]
fn spsc_push_iter_pop_each_drop_leftovers() {
    check(|| {
        let (mut producer, mut consumer) = spsc::channel::<Arc<usize>>(2);
        let sender = thread::spawn(move || {
            let mut items = (0..3).map(Arc::new);
            let mut sent = 0;
            while sent < 3 {
                let n = producer.push_iter(&mut items);
                sent += n;
                if n == 0 {
                    thread::yield_now();
                }
            }
            // The producer is dropped here, maybe after the consumer: whichever handle
            // goes last frees the items still in the ring.
        });
        let mut next = 0;
        while next < 2 {
            let n = consumer.pop_each(2 - next, |item| {
                assert_eq!(*item, next);
                next += 1;
            });
            if n == 0 {
                thread::yield_now();
            }
        }
        drop(consumer);
        sender.join().unwrap();
    });
}

#[test]
fn spsc_read_chunk_commit() {
    check(|| {
        let (mut producer, mut consumer) = spsc::channel::<usize>(2);
        let sender = thread::spawn(move || push_all(&mut producer, 10..13));
        let mut received = Vec::new();
        while received.len() < 3 {
            let chunk = consumer.read_chunk(2);
            let (first, second) = chunk.as_slices();
            received.extend(first.iter().chain(second).copied());
            if chunk.is_empty() {
                thread::yield_now();
            }
            chunk.commit_all();
        }
        sender.join().unwrap();
        assert_eq!(received, [10, 11, 12]);
    });
}

#[test]
fn spsc_abandoned_producer_is_fully_visible() {
    check(|| {
        let (mut producer, mut consumer) = spsc::channel::<usize>(2);
        let sender = thread::spawn(move || {
            producer.push(7).unwrap();
            producer.push(8).unwrap();
        });
        while !consumer.is_abandoned() {
            thread::yield_now();
        }
        // `is_abandoned` returned true, so both pushes must be visible now.
        assert_eq!(consumer.pop(), Some(7));
        assert_eq!(consumer.pop(), Some(8));
        assert_eq!(consumer.pop(), None);
        sender.join().unwrap();
    });
}

/// A capacity-2 MPMC ring whose positions start at 1, so the next two claims wrap the
/// slot array. Advanced on the model's main thread before any other thread starts.
fn mpmc_advanced_by_one() -> Arc<Mpmc<usize>> {
    let ring = Mpmc::new(2);
    ring.push(usize::MAX).unwrap();
    assert_eq!(ring.pop(), Some(usize::MAX));
    Arc::new(ring)
}

/// The items of producer `id` (items are `id * 10 + n`), in the order received.
fn from_producer(received: &[usize], id: usize) -> Vec<usize> {
    received.iter().copied().filter(|v| v / 10 == id).collect()
}

#[test]
fn mpmc_two_producers_one_consumer_wraps() {
    // No thread waits for another (a failed push is recorded, the consumer tries a fixed
    // number of times and the rest is drained after the join), which keeps the model small.
    check(|| {
        let ring = mpmc_advanced_by_one();
        let senders: Vec<_> = [vec![10, 11], vec![20]]
            .into_iter()
            .map(|items| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    let mut pushed = Vec::new();
                    for item in items {
                        match ring.push(item) {
                            Ok(()) => pushed.push(item),
                            Err(full) => assert_eq!(full.into_inner(), item),
                        }
                    }
                    pushed
                })
            })
            .collect();
        let mut received: Vec<usize> = (0..2).filter_map(|_| ring.pop()).collect();
        let mut pushed: Vec<usize> = senders
            .into_iter()
            .flat_map(|sender| sender.join().unwrap())
            .collect();
        while let Some(item) = ring.pop() {
            received.push(item);
        }
        // The first two pushes find an empty ring of two slots: they cannot fail.
        assert!(pushed.len() >= 2, "spurious Full: only {pushed:?} pushed");
        // Exactly once, and in push order per producer (this consumer's view).
        assert_eq!(from_producer(&received, 1), from_producer(&pushed, 1));
        assert_eq!(from_producer(&received, 2), from_producer(&pushed, 2));
        received.sort_unstable();
        pushed.sort_unstable();
        assert_eq!(received, pushed);
    });
}

#[test]
fn mpmc_one_producer_two_batch_consumers() {
    check(|| {
        let ring = mpmc_advanced_by_one();
        let receivers: Vec<_> = (0..2)
            .map(|_| {
                let ring = Arc::clone(&ring);
                thread::spawn(move || {
                    let mut mine = Vec::new();
                    ring.pop_batch(2, |item| mine.push(item));
                    mine
                })
            })
            .collect();
        // Both slots are free, so one claim takes both.
        assert_eq!(ring.push_slice(&[1, 2]), 2);
        let third_pushed = ring.push(3).is_ok();
        let mut all = Vec::new();
        for receiver in receivers {
            let mine = receiver.join().unwrap();
            assert!(
                mine.is_sorted(),
                "one consumer saw items out of order: {mine:?}"
            );
            all.extend(mine);
        }
        let mut rest = [0usize; 2];
        let n = ring.pop_slice(&mut rest);
        all.extend_from_slice(&rest[..n]);
        all.sort_unstable();
        let expected: &[usize] = if third_pushed { &[1, 2, 3] } else { &[1, 2] };
        assert_eq!(all, expected);
    });
}

#[test]
fn mpmc_concurrent_push_pop_drops_leftovers() {
    check(|| {
        let ring = Arc::new(Mpmc::<Arc<usize>>::new(2));
        let sender = {
            let ring = Arc::clone(&ring);
            thread::spawn(move || {
                for item in 0..3 {
                    let mut item = Arc::new(item);
                    loop {
                        match ring.push(item) {
                            Ok(()) => break,
                            Err(full) => {
                                item = full.into_inner();
                                thread::yield_now();
                            }
                        }
                    }
                }
            })
        };
        // Pop one item concurrently; the rest are dropped with the ring.
        let mut got = None;
        while got.is_none() {
            got = ring.pop();
            if got.is_none() {
                thread::yield_now();
            }
        }
        assert_eq!(got.as_deref(), Some(&0));
        sender.join().unwrap();
        assert_eq!(ring.len(), 2);
    });
}

/// Time left for a waiter in a model: always some (the models never time out; loom's
/// `Condvar::wait_timeout` does not either, so a lost wake-up is a deadlock loom reports).
fn forever() -> Option<core::time::Duration> {
    Some(core::time::Duration::from_secs(3_600))
}

/// Takes one token if there is one.
fn take(tokens: &loom::sync::atomic::AtomicUsize) -> Result<(), ()> {
    use loom::sync::atomic::Ordering;
    tokens
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .map(|_| ())
        .map_err(|_| ())
}

/// One waiter parks for room that one notifier makes: whatever the interleaving of the
/// waiter's last try, its park and the notification, the waiter gets the room.
#[test]
fn waiters_never_lose_a_wake_up() {
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use percore_engine::ring::waiters::Waiters;
    check(|| {
        let waiters = Arc::new(Waiters::new());
        let tokens = Arc::new(AtomicUsize::new(0));
        let (w, t) = (waiters.clone(), tokens.clone());
        let waiter = thread::spawn(move || w.retry(forever, || take(&t)));
        // Make the room only once the waiter has registered, so that the models cover its
        // last try, its park and the notification in every order (loom runs a yielding
        // thread last: without this wait the waiter would never get as far as parking
        // before the room is made, and a missing notification would go unseen).
        while waiters.parked() == 0 {
            thread::yield_now();
        }
        tokens.fetch_add(1, Ordering::Release);
        waiters.notify(1);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!(tokens.load(Ordering::Relaxed), 0);
    });
}

/// Two waiters, room made for one at a time, one notification each: both get through.
#[test]
fn waiters_wake_each_waiter_once_per_room() {
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use percore_engine::ring::waiters::Waiters;
    check(|| {
        let waiters = Arc::new(Waiters::new());
        let tokens = Arc::new(AtomicUsize::new(0));
        let spawned: Vec<_> = (0..2)
            .map(|_| {
                let (w, t) = (waiters.clone(), tokens.clone());
                thread::spawn(move || w.retry(forever, || take(&t)))
            })
            .collect();
        for _ in 0..2 {
            tokens.fetch_add(1, Ordering::Release);
            waiters.notify(1);
        }
        for waiter in spawned {
            assert_eq!(waiter.join().unwrap(), Ok(()));
        }
        assert_eq!(tokens.load(Ordering::Relaxed), 0);
    });
}

/// Two producers wait for room in their full lane while the consumer drains the lanes in
/// turn once, then waits for the producers: the drain must wake the lane it took from
/// (without its notification the parked producers deadlock, which loom reports), and
/// nothing is lost or taken twice.
#[test]
fn lanes_drain_wakes_the_lane_it_took_from() {
    use percore_engine::ring::lanes::Lanes;
    check(|| {
        let lanes = Arc::new(Lanes::new(2, 2));
        lanes.push(0, 1u32).unwrap();
        lanes.push(0, 2).unwrap();
        lanes.push(1, 10).unwrap();
        let producers: Vec<_> = [3u32, 4]
            .into_iter()
            .map(|value| {
                let lanes = lanes.clone();
                thread::spawn(move || lanes.push_wait(0, value, forever).is_ok())
            })
            .collect();
        let mut sum = 0;
        assert_eq!(lanes.pop_batch(3, |value| sum += value), 3);
        for producer in producers {
            assert!(producer.join().unwrap());
        }
        assert_eq!(lanes.pop_batch(4, |value| sum += value), 2);
        assert_eq!(sum, 1 + 2 + 10 + 3 + 4);
        assert!(lanes.is_empty());
    });
}
