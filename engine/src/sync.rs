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
