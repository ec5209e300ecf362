//! Cross-core return on two real threads: the home thread owns the pool and lends slots
//! to a remote thread, which sends every handle home through a `ReturnPath`; the home
//! thread reclaims them when the pool runs dry. No locks, no lost or duplicated slots.

use percore_engine::pool::{Handle, Pool, PoolError, return_channel, return_channel_capacity};
use percore_engine::ring::spsc;
use std::time::{Duration, Instant};

const CAPACITY: usize = 256;
const ROUNDS: u64 = 300_000;

#[test]
fn handles_finished_on_another_thread_come_home() {
    let mut pool = Pool::new("messages", CAPACITY, |_| 0u64).unwrap();
    // The home -> remote direction carries (handle, the value written into the slot) so
    // the remote can check it saw each borrow exactly once, in order.
    let (mut to_remote, mut remote_rx) =
        spsc::channel::<(Handle, u64)>(return_channel_capacity(CAPACITY));
    let (mut return_path, mut home_rx) = return_channel(CAPACITY);
    let deadline = Instant::now() + Duration::from_secs(120);

    let remote = std::thread::spawn(move || {
        let mut expected = 0u64;
        while expected < ROUNDS {
            assert!(Instant::now() < deadline, "remote stalled at {expected}");
            let Some((handle, value)) = remote_rx.pop() else {
                std::hint::spin_loop();
                continue;
            };
            assert_eq!(value, expected, "lost or reordered work");
            expected += 1;
            let mut pending = handle;
            // The ring holds every slot of the pool, so this never spins in practice.
            while let Err(back) = return_path.send_home(pending) {
                assert!(Instant::now() < deadline, "return ring stuck full");
                pending = back;
            }
        }
    });

    let mut sent = 0u64;
    let mut reclaim_calls = 0u64;
    while sent < ROUNDS {
        match pool.borrow() {
            Ok(handle) => {
                *pool.get_mut(handle) = sent;
                let Ok(()) = to_remote.push((handle, sent)) else {
                    panic!("work ring holds every slot of the pool")
                };
                sent += 1;
            }
            Err(PoolError::Exhausted { .. }) => {
                assert!(Instant::now() < deadline, "home stalled at {sent}");
                reclaim_calls += 1;
                if pool.reclaim_from(&mut home_rx) == 0 {
                    std::hint::spin_loop();
                }
            }
            Err(other) => panic!("{other}"),
        }
    }
    remote.join().expect("remote thread");
    while pool.in_use() > 0 {
        assert!(Instant::now() < deadline, "handles never came home");
        pool.reclaim_from(&mut home_rx);
    }
    let stats = pool.stats();
    assert_eq!(stats.borrows, ROUNDS);
    assert_eq!(
        stats.release_failures, 0,
        "a handle came home twice or stale"
    );
    assert_eq!(stats.high_water, CAPACITY);
    assert!(reclaim_calls > 0);
    assert_eq!(pool.reclaim_from(&mut home_rx), 0);
}
