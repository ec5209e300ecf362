//! Synchronisation shim: `std` normally, `loom` under `--cfg loom`.
//!
//! Every atomic, lock and `UnsafeCell` used by the rings, pools and ring waiters comes
//! through here so that the loom model checker can explore every interleaving of the
//! cross-thread paths.

// Not every module uses every item; the shim offers the full set under both configurations.
#[cfg(loom)]
#[allow(unused_imports)]
pub(crate) use loom::{
    cell::UnsafeCell,
    hint::spin_loop,
    sync::Arc,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
    sync::{Condvar, Mutex},
    thread,
};

#[cfg(not(loom))]
#[allow(unused_imports)]
pub(crate) use std::{
    hint::spin_loop,
    sync::Arc,
    sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence},
    sync::{Condvar, Mutex},
    thread,
};

/// A 32-bit word that threads can sleep on until it changes: the Linux `futex` (private to
/// the process), and under loom a model of it (a mutex and a condition variable) with the
/// same contract, so the ring waiters' protocol is checked against that contract.
///
/// Contract: [`FutexWord::wait`] sleeps only if the word still equals `expected`, checked
/// atomically with going to sleep; a thread that changes the word and then calls
/// [`FutexWord::wake`] wakes every sleeper that saw the old value (up to the count asked),
/// and a sleeper that comes later sees the new value and does not sleep. `wait` may also
/// return early (a signal, the timeout, or, in the kernel, for no reason): callers re-check.
#[derive(Debug)]
pub(crate) struct FutexWord {
    word: AtomicU32,
    #[cfg(loom)]
    lock: Mutex<()>,
    #[cfg(loom)]
    sleepers: Condvar,
}

impl FutexWord {
    pub(crate) fn new(value: u32) -> Self {
        Self {
            word: AtomicU32::new(value),
            #[cfg(loom)]
            lock: Mutex::new(()),
            #[cfg(loom)]
            sleepers: Condvar::new(),
        }
    }

    /// The word itself, for loads and read-modify-writes.
    #[inline(always)]
    pub(crate) fn word(&self) -> &AtomicU32 {
        &self.word
    }

    /// Sleeps while the word equals `expected`, at most `timeout` (loom ignores it: its
    /// waits never time out, so a lost wake-up is a deadlock there).
    #[cfg(not(loom))]
    pub(crate) fn wait(&self, expected: u32, timeout: core::time::Duration) {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_nsec: timeout.subsec_nanos().into(),
        };
        // SAFETY: `FUTEX_WAIT` reads the `u32` behind the first argument, a live atomic
        // borrowed for the whole call, and the `timespec` behind the fourth, a local that
        // outlives it; it writes through neither. The result is ignored on purpose: EAGAIN
        // (the word moved), ETIMEDOUT and EINTR all mean "look again".
        let _ = unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                &raw const timeout,
            )
        };
    }

    /// Wakes at most `count` threads sleeping on the word: one system call, however many.
    #[cfg(not(loom))]
    pub(crate) fn wake(&self, count: u32) {
        let count = count.min(i32::MAX as u32) as libc::c_int;
        // SAFETY: `FUTEX_WAKE` only uses the first argument as the key of the sleepers to
        // wake (a live atomic borrowed for the whole call) and reads no other pointer.
        let _ = unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                count,
            )
        };
    }

    #[cfg(loom)]
    pub(crate) fn wait(&self, expected: u32, _timeout: core::time::Duration) {
        let guard = self.lock.lock().unwrap();
        // Under the lock that `wake` takes: the kernel's atomic check-and-sleep.
        if self.word.load(Ordering::Acquire) == expected {
            drop(self.sleepers.wait(guard).unwrap());
        }
    }

    #[cfg(loom)]
    pub(crate) fn wake(&self, count: u32) {
        let _guard = self.lock.lock().unwrap();
        for _ in 0..count {
            self.sleepers.notify_one();
        }
    }
}

/// `std::cell::UnsafeCell` with loom's closure-based access API, so ring code reads the
/// same under both configurations.
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
#[allow(dead_code)] // `with` is part of the loom-compatible API even where only `with_mut` is used.
impl<T> UnsafeCell<T> {
    pub(crate) const fn new(value: T) -> Self {
        Self(std::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Tells loom about reads and writes of slots whose data lives in plain memory.
///
/// The SPSC ring keeps its items in one contiguous allocation so that it can hand out
/// `&[T]` slices (zero-copy reads); loom's `UnsafeCell` cannot give out such slices. This
/// tracker shadows every slot with a loom cell of `()` and touches it on each access, so
/// loom still reports a slot read racing with a slot write. Without loom it is zero-sized
/// and every method compiles to nothing.
#[derive(Debug)]
pub(crate) struct SlotAccessTracker {
    #[cfg(loom)]
    cells: Box<[loom::cell::UnsafeCell<()>]>,
}

impl SlotAccessTracker {
    /// One shadow cell per slot (nothing is allocated without loom).
    #[cfg_attr(not(loom), allow(unused_variables))]
    pub(crate) fn new(slot_count: usize) -> Self {
        Self {
            #[cfg(loom)]
            cells: (0..slot_count)
                .map(|_| loom::cell::UnsafeCell::new(()))
                .collect(),
        }
    }

    /// Records a shared (read) access to slot `index`.
    #[inline(always)]
    #[cfg_attr(not(loom), allow(unused_variables, dead_code))]
    pub(crate) fn read(&self, index: usize) {
        #[cfg(loom)]
        self.cells[index].with(|_| ());
    }

    /// Records an exclusive (write, move-out or drop) access to slot `index`.
    #[inline(always)]
    #[cfg_attr(not(loom), allow(unused_variables))]
    pub(crate) fn write(&self, index: usize) {
        #[cfg(loom)]
        self.cells[index].with_mut(|_| ());
    }
}
