//! Waiting for room in a full ring: back off, then park, with a lock-free fast path for
//! whoever makes room.
//!
//! The rings never block: a full ring hands the item back. Many application threads
//! submitting into one shard (far more threads than cores) must then wait somewhere, and
//! spinning livelocks a small machine: the waiters take the CPU the consumer needs to make
//! room. [`Waiters`] is that somewhere. A waiter spins a little ([`Backoff`]), yields a
//! few times, then parks on a `Condvar`; whoever makes room calls [`Waiters::notify`],
//! which costs one locked read-modify-write of the waiter count when nobody is parked
//! (never a lock, never a syscall) and wakes a bounded number of parked threads otherwise.
//! Every waiter of one registry must wait for the same room (one registry per ring): a
//! notification wakes the oldest sleepers, whatever they wait for.
//!
//! # Protocol (no lost wake-ups)
//! A waiter registers by incrementing `count`, reads `epoch`, tries once more, and only
//! then locks and sleeps, if `epoch` has not moved. A notifier that made room reads `count`
//! with an RMW (`fetch_add(0)`, AcqRel), and if anyone waits bumps `epoch` and notifies
//! under the lock. Both sides are RMWs on `count`, so one comes first in its modification
//! order: if the waiter's does, the notifier reads it and notifies; if the notifier's does,
//! the waiter's RMW reads from it (acquire after release), so its last try sees the room
//! the notifier made before. The epoch the waiter compares against is read (Acquire) before
//! that last try, and the notifier bumps it (Release) after making room: a waiter that reads
//! the bumped epoch also sees the room, so it never sleeps on an epoch whose notification it
//! missed (loom found that lost wake-up when both were Relaxed). (A fence and a plain load on each side, Dekker style, is
//! correct under the C++ model's SeqCst fences too, but loom models SeqCst as AcqRel and
//! reports that version as a lost wake-up; the RMW costs the notifier about what the fence
//! did, though it takes the count's line exclusively, so notifiers of a busy registry
//! contend for it.) The notifier bumps `epoch` before it takes
//! the lock, so a waiter that locks after the notifier unlocked sees the new epoch and does
//! not sleep; one that locked before is already waiting when the notification comes. `tests/ring_loom.rs` checks this under
//! loom, whose `Condvar::wait_timeout` never times out: a lost wake-up is a deadlock there.
//! Parks are also bounded by a slice as a safety net in production; wake-ups do not depend
//! on it.
//!
//! No clock is read here: [`Waiters::retry`] asks its caller how much time is left.

use core::time::Duration;
use std::sync::PoisonError;

use crate::sync::{AtomicU64, AtomicUsize, Condvar, Mutex, Ordering, spin_loop, thread};

/// Back-off: rounds of exponentially growing `spin_loop` bursts before yielding.
pub const BACKOFF_SPIN_ROUNDS: u32 = 6;
/// Back-off: `yield_now` calls after spinning, before parking. Few: with far more threads
/// than cores, a yielding thread stays runnable and takes CPU from the consumer it waits on.
pub const BACKOFF_YIELDS_MAX: u32 = 2;
/// Most parked threads one notification wakes, by default ([`Waiters::with_wake_max`]):
/// each wake is a futex syscall on the notifier's (the consumer's) thread, and a woken
/// producer fills more than one freed place when it has more to send.
pub const WAKE_PER_NOTIFY_MAX: usize = 8;
/// A parked thread looks again at least this often (µs): a safety net; wake-ups do not
/// depend on it.
pub const PARK_SLICE_US: u64 = 2_000;

/// The spin rounds in effect: under loom every spin hint is a scheduling point, so the
/// models spin once (the protocol after the back-off is what they check).
const SPIN_ROUNDS: u32 = if cfg!(loom) { 1 } else { BACKOFF_SPIN_ROUNDS };

/// A cache line of its own, so the waiter count written by parking threads does not share
/// a line with whatever sits next to it.
#[repr(align(128))]
#[derive(Debug)]
struct Padded<T>(T);

/// Threads waiting for room. See the module documentation for the protocol.
#[derive(Debug)]
pub struct Waiters {
    count: Padded<AtomicUsize>,
    epoch: AtomicU64,
    lock: Mutex<()>,
    wake: Condvar,
    /// Most parked threads one notification wakes.
    wake_max: usize,
}

impl Waiters {
    /// An empty registry whose notifications wake up to [`WAKE_PER_NOTIFY_MAX`] threads.
    pub fn new() -> Self {
        Self::with_wake_max(WAKE_PER_NOTIFY_MAX)
    }

    /// An empty registry whose notifications wake up to `wake_max` threads (at least one).
    pub fn with_wake_max(wake_max: usize) -> Self {
        Self {
            count: Padded(AtomicUsize::new(0)),
            epoch: AtomicU64::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            wake_max: wake_max.max(1),
        }
    }

    /// Threads parked (or about to park) right now. A snapshot.
    pub fn parked(&self) -> usize {
        self.count.0.load(Ordering::Relaxed)
    }

    /// Room for about `freed` items was made: wakes up to that many waiters (at most the
    /// registry's `wake_max`). Without waiters this is one locked read-modify-write.
    #[inline]
    pub fn notify(&self, freed: usize) {
        // An RMW, not a load: see the module documentation.
        let waiting = self.count.0.fetch_add(0, Ordering::AcqRel);
        if waiting == 0 || freed == 0 {
            return;
        }
        // Release: a waiter that reads the new epoch (Acquire) also sees the room made.
        self.epoch.fetch_add(1, Ordering::Release);
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..freed.min(waiting).min(self.wake_max) {
            self.wake.notify_one();
        }
    }

    /// Retries `attempt` until it succeeds or `remaining` says no time is left (`None`),
    /// backing off: spin a little, then yield, then park here (each park at most the time
    /// left and [`PARK_SLICE_US`]). Returns the last error once time is up.
    pub fn retry<T, E>(
        &self,
        mut remaining: impl FnMut() -> Option<Duration>,
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut backoff = Backoff::new();
        loop {
            let error = match attempt() {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let Some(left) = remaining().filter(|left| !left.is_zero()) else {
                return Err(error);
            };
            if !backoff.is_completed() {
                backoff.snooze();
                continue;
            }
            // Registered before the last try: see the module documentation.
            self.count.0.fetch_add(1, Ordering::AcqRel);
            let epoch = self.epoch.load(Ordering::Acquire);
            let retried = attempt();
            if retried.is_err() {
                let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                if self.epoch.load(Ordering::Relaxed) == epoch {
                    let slice = left.min(Duration::from_micros(PARK_SLICE_US));
                    let _ = self.wake.wait_timeout(guard, slice);
                }
            }
            // AcqRel like every RMW on `count`, so that synchronization passes through it.
            self.count.0.fetch_sub(1, Ordering::AcqRel);
            if let Ok(value) = retried {
                return Ok(value);
            }
        }
    }
}

impl Default for Waiters {
    fn default() -> Self {
        Self::new()
    }
}

/// Spin (exponentially growing bursts), then yield, then tell the caller to park.
#[derive(Debug, Default)]
pub struct Backoff {
    step: u32,
}

impl Backoff {
    /// A fresh back-off that starts by spinning.
    pub fn new() -> Self {
        Self { step: 0 }
    }

    /// Waits a little: `2^step` spin hints for the first [`BACKOFF_SPIN_ROUNDS`] calls, then
    /// one `yield_now` per call for [`BACKOFF_YIELDS_MAX`] calls.
    #[inline]
    pub fn snooze(&mut self) {
        if self.step < SPIN_ROUNDS {
            for _ in 0..1u32 << self.step {
                spin_loop();
            }
        } else {
            thread::yield_now();
        }
        self.step = (self.step + 1).min(SPIN_ROUNDS + BACKOFF_YIELDS_MAX);
    }

    /// Spinning and yielding are over: the caller should park.
    #[inline]
    pub fn is_completed(&self) -> bool {
        self.step >= SPIN_ROUNDS + BACKOFF_YIELDS_MAX
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use super::*;

    fn take(room: &AtomicBool) -> Result<(), ()> {
        if room.swap(false, Ordering::AcqRel) {
            Ok(())
        } else {
            Err(())
        }
    }

    /// The real (std) path, outside loom: a waiter that parked on a full ring gets the room a
    /// notifier makes.
    #[test]
    fn a_parked_waiter_gets_the_room_made_for_it() {
        let waiters = Arc::new(Waiters::new());
        let room = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (waiters, room) = (waiters.clone(), room.clone());
            std::thread::spawn(move || {
                waiters.retry(|| Some(Duration::from_secs(60)), || take(&room))
            })
        };
        while waiters.parked() == 0 {
            std::thread::yield_now();
        }
        room.store(true, Ordering::Release);
        waiters.notify(1);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(!room.load(Ordering::Acquire));
        assert_eq!(waiters.parked(), 0);
    }

    /// No room before the deadline: the last error comes back, and the waiter is no
    /// longer counted.
    #[test]
    fn a_waiter_without_room_gives_up_at_its_deadline() {
        let waiters = Waiters::new();
        let room = AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_millis(20);
        let taken = waiters.retry(
            || Some(deadline.saturating_duration_since(Instant::now())),
            || take(&room),
        );
        assert_eq!(taken, Err(()));
        assert!(Instant::now() >= deadline);
        assert_eq!(waiters.parked(), 0);
    }
}
