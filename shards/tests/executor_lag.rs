//! The executor lag probe (`runtime::executor_lag_probe`) on a real glommio executor: a
//! task that blocks the executor for 30 ms shows as one lag of about that much.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use percore_shards::metrics::{COMMIT_GAP_BUCKETS_US, GapHistogram};
use percore_shards::runtime::executor_lag_probe;

/// The stall the test makes (ms).
const STALL_MS: u64 = 30;

#[test]
fn a_task_that_does_not_yield_shows_as_executor_lag() {
    let lag = Arc::new(GapHistogram::default());
    let recorded = lag.clone();
    let idle_max_us = glommio::LocalExecutorBuilder::default()
        .io_memory(256 << 10)
        .spawn(move || async move {
            let done = Rc::new(Cell::new(false));
            let probe = {
                let (done, recorded) = (done.clone(), recorded.clone());
                glommio::spawn_local(async move {
                    executor_lag_probe(&recorded, Duration::from_millis(1), || done.get()).await;
                })
            };
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let idle_max_us = recorded.max_us();
            // A task turn that does not yield: the probe's timer cannot run meanwhile.
            std::thread::sleep(Duration::from_millis(STALL_MS));
            glommio::timer::sleep(Duration::from_millis(10)).await;
            done.set(true);
            probe.await;
            idle_max_us
        })
        .expect("executor starts")
        .join()
        .expect("executor finishes");
    let buckets = lag.buckets();
    let samples: u64 = buckets.iter().sum();
    // At most one sample a millisecond for some 90 ms of run time (fewer on a busy box).
    assert!((10..=100).contains(&samples), "{samples} samples");
    // The stall: late by most of it (the timer was due within a millisecond of its start).
    assert!(
        lag.max_us() >= (STALL_MS - 2) * 1_000,
        "longest lag {} µs",
        lag.max_us()
    );
    eprintln!("idle: longest lag {idle_max_us} µs; {samples} samples");
    // Counted above 20 ms (once, unless the host also descheduled the thread that long).
    let over_20_ms = COMMIT_GAP_BUCKETS_US.partition_point(|&bound| bound < 20_001);
    assert!(
        buckets[over_20_ms..].iter().sum::<u64>() >= 1,
        "{buckets:?}"
    );
}
