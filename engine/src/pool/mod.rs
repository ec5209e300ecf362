//! Fixed-capacity, per-core object pools.
//!
//! A [`Pool`] owns `capacity` objects constructed once at start-up and lends them out by
//! [`Handle`] (index + generation, 8 bytes, `Pod`, so it travels through rings and frames).
//! Objects are reused in place, never moved in or out: a borrowed slot keeps whatever its
//! previous borrower left in it unless the caller resets it (see [`Pool::borrow_with`]).
//! A pool belongs to one core: it is `Send` but never `Sync`, and buffers that finish on
//! another core come home through an SPSC ring ([`ReturnPath`], [`Pool::reclaim_from`]),
//! never through a lock. A pool must never allocate after [`Pool::new`]: an empty pool is a
//! typed [`PoolError::Exhausted`], and a stale or foreign handle given to
//! [`Pool::release`] is a typed error that leaves the free list untouched. The pools have no
//! `unsafe`. [`ShardPools`] bundles the three typed pools one shard needs; [`table`]
//! allocates the state machine's large tables (committed, advised for huge pages: its one
//! `unsafe` block is that system call).

mod return_path;
mod shard;
pub mod table;

#[cfg(test)]
mod tests;

pub use return_path::{ReturnPath, return_channel, return_channel_capacity};
pub use shard::{BatchSlot, MessageBuf, PoolConfig, ShardPools, TX_SLOT_BYTES, TxSlot};

use crate::ring::spsc;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

/// Largest capacity a pool may have: slot indices travel as `u32`.
pub const POOL_CAPACITY_MAX: usize = u32::MAX as usize;

/// A reference to one borrowed slot of a [`Pool`]: slot index plus the slot's generation
/// at borrow time.
///
/// Live generations are odd and free ones even, so a zeroed handle ([`Handle::DANGLING`])
/// is never live. A pool rejects a handle whose generation no longer matches (stale,
/// double release). Generations are 32 bits: a handle kept across 2^31 reuses of its
/// slot could alias a new borrow, which no code path in percore holds that long.
#[derive(Clone, Copy, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Handle {
    index: u32,
    generation: u32,
}

const _: () = assert!(size_of::<Handle>() == 8);

impl Handle {
    /// A handle no pool ever hands out (generation 0 is even, i.e. "free").
    pub const DANGLING: Handle = Handle {
        index: 0,
        generation: 0,
    };

    /// Slot index inside the pool that issued the handle.
    #[inline]
    pub const fn index(self) -> u32 {
        self.index
    }

    /// Generation of the slot when it was borrowed.
    #[inline]
    pub const fn generation(self) -> u32 {
        self.generation
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({}@{})", self.index, self.generation)
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Everything that can go wrong building or using a pool. Never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every slot is borrowed. The pool does not grow: the caller sheds load or waits.
    #[error("pool {pool} exhausted: all {capacity} slots borrowed")]
    Exhausted {
        /// Name of the pool.
        pool: &'static str,
        /// Its fixed capacity.
        capacity: usize,
    },
    /// The handle's slot is free or was re-borrowed since (double release, use after release).
    #[error("pool {pool}: stale handle {handle}")]
    StaleHandle {
        /// Name of the pool.
        pool: &'static str,
        /// The rejected handle.
        handle: Handle,
    },
    /// The handle's index is outside this pool: it came from another pool or was forged.
    #[error("pool {pool}: foreign handle {handle} (capacity {capacity})")]
    ForeignHandle {
        /// Name of the pool.
        pool: &'static str,
        /// The rejected handle.
        handle: Handle,
        /// The pool's capacity.
        capacity: usize,
    },
    /// A pool was configured with zero slots.
    #[error("pool {pool}: capacity must be at least 1")]
    ZeroCapacity {
        /// Name of the pool.
        pool: &'static str,
    },
    /// A pool was configured with more slots than a `u32` index can address.
    #[error("pool {pool}: capacity {capacity} exceeds {max}")]
    CapacityTooLarge {
        /// Name of the pool.
        pool: &'static str,
        /// Requested capacity.
        capacity: usize,
        /// [`POOL_CAPACITY_MAX`].
        max: usize,
    },
    /// A per-object size in [`PoolConfig`] is zero.
    #[error("pool config: {field} must be at least 1")]
    ZeroSize {
        /// The config field.
        field: &'static str,
    },
    /// `batch_entries_max` exceeds [`crate::limits::BATCH_ENTRIES_MAX_LIMIT`].
    #[error("pool config: batch_entries_max {batch_entries_max} exceeds {max}")]
    BatchEntriesTooLarge {
        /// Requested entries per batch.
        batch_entries_max: usize,
        /// The limit.
        max: usize,
    },
    /// The pool's total memory (`capacity * bytes_each`) overflows the address space.
    #[error("pool {pool}: {capacity} x {bytes_each} bytes overflows")]
    TotalBytesOverflow {
        /// Name of the pool.
        pool: &'static str,
        /// Requested capacity.
        capacity: usize,
        /// Bytes per object.
        bytes_each: usize,
    },
    /// Bytes do not fit a [`MessageBuf`].
    #[error("message of {len} bytes exceeds buffer of {capacity} bytes")]
    MessageTooLarge {
        /// Bytes offered.
        len: usize,
        /// Buffer capacity.
        capacity: usize,
    },
}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Name of the pool ("transactions", "batches", "messages", ...).
    pub name: &'static str,
    /// Fixed number of slots.
    pub capacity: usize,
    /// Slots borrowed now.
    pub in_use: usize,
    /// Most slots ever borrowed at once since construction (kept across [`Pool::clear`]).
    pub high_water: usize,
    /// Successful borrows.
    pub borrows: u64,
    /// Borrows that found the pool exhausted.
    pub borrow_failures: u64,
    /// Releases rejected as stale or foreign (each one is a bug somewhere upstream).
    pub release_failures: u64,
}

impl PoolStats {
    /// Capacity to configure for the next start: the high-water mark plus
    /// `headroom_percent` of it, rounded up, and at least 1.
    ///
    /// This is a plain high-water rule, not a learned model: it sizes for the worst load
    /// this run saw. The node logs it at shutdown; an operator (or the next start's
    /// config) decides whether to adopt it. It saturates at [`POOL_CAPACITY_MAX`].
    pub fn suggested_capacity(&self, headroom_percent: u32) -> usize {
        let high_water = self.high_water as u128;
        let headroom = (high_water * u128::from(headroom_percent)).div_ceil(100);
        let suggested = (high_water + headroom).clamp(1, POOL_CAPACITY_MAX as u128);
        suggested as usize
    }
}

/// A fixed-capacity pool of `T`, owned by one core.
///
/// The free list is a LIFO stack of indices preallocated to `capacity`, so the most
/// recently released (cache-warm) slot is lent next, and neither borrow nor release can
/// allocate. `Pool` is `Send` (when `T` is) but not `Sync`:
///
/// ```compile_fail,E0277
/// fn assert_sync<S: Sync>() {}
/// assert_sync::<percore_engine::pool::Pool<u64>>();
/// ```
pub struct Pool<T> {
    name: &'static str,
    slots: Box<[T]>,
    /// Per slot: odd while borrowed, even while free; bumped on every borrow and release.
    generations: Box<[u32]>,
    /// Indices of free slots; never longer than `slots.len()`, so `push` never reallocates.
    free: Vec<u32>,
    high_water: usize,
    borrows: u64,
    borrow_failures: u64,
    release_failures: u64,
    /// A pool belongs to one core: `Cell<()>` is `Send + !Sync`.
    _not_sync: PhantomData<Cell<()>>,
}

impl<T> Pool<T> {
    /// Builds a pool of `capacity` objects, `init(i)` constructing slot `i`. All memory
    /// the pool will ever use is allocated here.
    pub fn new(
        name: &'static str,
        capacity: usize,
        mut init: impl FnMut(usize) -> T,
    ) -> Result<Self, PoolError> {
        check_capacity(name, capacity)?;
        let slots: Box<[T]> = (0..capacity).map(&mut init).collect();
        let generations = vec![0u32; capacity].into_boxed_slice();
        let mut free = Vec::with_capacity(capacity);
        fill_free_stack(&mut free, capacity);
        debug_assert_eq!(slots.len(), capacity);
        Ok(Self {
            name,
            slots,
            generations,
            free,
            high_water: 0,
            borrows: 0,
            borrow_failures: 0,
            release_failures: 0,
            _not_sync: PhantomData,
        })
    }

    /// Name given at construction (used in errors and stats).
    #[inline]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Fixed number of slots.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots borrowed now.
    #[inline]
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Slots free now.
    #[inline]
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Lends a free slot. Its contents are whatever the previous borrower left (or
    /// `init`'s value); use [`Pool::borrow_with`] to reset them.
    #[inline]
    pub fn borrow(&mut self) -> Result<Handle, PoolError> {
        let Some(index) = self.free.pop() else {
            return Err(self.exhausted());
        };
        let generation = &mut self.generations[index as usize];
        *generation = generation.wrapping_add(1);
        debug_assert!(*generation & 1 == 1, "a free slot had a live generation");
        let handle = Handle {
            index,
            generation: *generation,
        };
        let in_use = self.slots.len() - self.free.len();
        self.high_water = self.high_water.max(in_use);
        self.borrows += 1;
        Ok(handle)
    }

    /// Lends a free slot after running `reset` on it.
    #[inline]
    pub fn borrow_with(&mut self, reset: impl FnOnce(&mut T)) -> Result<Handle, PoolError> {
        let handle = self.borrow()?;
        reset(&mut self.slots[handle.index as usize]);
        Ok(handle)
    }

    #[cold]
    #[inline(never)]
    fn exhausted(&mut self) -> PoolError {
        self.borrow_failures += 1;
        PoolError::Exhausted {
            pool: self.name,
            capacity: self.slots.len(),
        }
    }

    /// The borrowed object. The generation is checked only in debug builds (a stale handle
    /// in release reads whatever the slot holds now); panics on an index outside the pool.
    /// Use [`Pool::try_get`] for handles that came from outside the process.
    #[inline]
    pub fn get(&self, handle: Handle) -> &T {
        debug_assert!(self.is_live(handle), "{}: stale handle {handle}", self.name);
        &self.slots[handle.index as usize]
    }

    /// The borrowed object, mutably. Checks as [`Pool::get`].
    #[inline]
    pub fn get_mut(&mut self, handle: Handle) -> &mut T {
        debug_assert!(self.is_live(handle), "{}: stale handle {handle}", self.name);
        &mut self.slots[handle.index as usize]
    }

    /// The borrowed object, with the handle fully checked.
    #[inline]
    pub fn try_get(&self, handle: Handle) -> Result<&T, PoolError> {
        self.check_live(handle)?;
        Ok(&self.slots[handle.index as usize])
    }

    /// The borrowed object, mutably, with the handle fully checked.
    #[inline]
    pub fn try_get_mut(&mut self, handle: Handle) -> Result<&mut T, PoolError> {
        self.check_live(handle)?;
        Ok(&mut self.slots[handle.index as usize])
    }

    /// Whether `handle` refers to a slot of this pool that is borrowed under that
    /// generation right now.
    #[inline]
    pub fn is_live(&self, handle: Handle) -> bool {
        self.check_live(handle).is_ok()
    }

    #[inline]
    fn check_live(&self, handle: Handle) -> Result<(), PoolError> {
        match self.generations.get(handle.index as usize) {
            None => Err(self.foreign(handle)),
            Some(&generation) if generation != handle.generation || generation & 1 == 0 => {
                Err(PoolError::StaleHandle {
                    pool: self.name,
                    handle,
                })
            }
            Some(_) => Ok(()),
        }
    }

    #[cold]
    fn foreign(&self, handle: Handle) -> PoolError {
        PoolError::ForeignHandle {
            pool: self.name,
            handle,
            capacity: self.slots.len(),
        }
    }

    /// Returns a slot to the pool. Always checked, in every build: a stale (double) or
    /// foreign handle is an `Err` and changes nothing but `release_failures`.
    #[inline]
    pub fn release(&mut self, handle: Handle) -> Result<(), PoolError> {
        if let Err(error) = self.check_live(handle) {
            self.release_failures += 1;
            return Err(error);
        }
        let generation = &mut self.generations[handle.index as usize];
        *generation = generation.wrapping_add(1);
        // A live slot is not on the free stack, so the stack has room: no reallocation.
        debug_assert!(self.free.len() < self.free.capacity());
        self.free.push(handle.index);
        Ok(())
    }

    /// Returns every slot to the pool and invalidates every outstanding handle. Contents
    /// are left as they are. O(capacity); meant for recovery and tests, not the hot path.
    pub fn clear(&mut self) {
        for generation in self.generations.iter_mut() {
            if *generation & 1 == 1 {
                *generation = generation.wrapping_add(1);
            }
        }
        fill_free_stack(&mut self.free, self.slots.len());
        debug_assert_eq!(self.in_use(), 0);
    }

    /// Releases every handle waiting in `rx` (sent by a [`ReturnPath`] on another core)
    /// and returns how many were released. Call it each loop turn, or when a borrow finds
    /// the pool exhausted. Pops at most `capacity` handles per call (a bounded loop);
    /// stale or foreign handles are dropped and counted in `release_failures`.
    pub fn reclaim_from(&mut self, rx: &mut spsc::Consumer<Handle>) -> usize {
        let mut reclaimed = 0;
        rx.pop_each(self.slots.len(), |handle| {
            let released = self.release(handle);
            debug_assert!(released.is_ok(), "{released:?}");
            reclaimed += usize::from(released.is_ok());
        });
        reclaimed
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            name: self.name,
            capacity: self.slots.len(),
            in_use: self.in_use(),
            high_water: self.high_water,
            borrows: self.borrows,
            borrow_failures: self.borrow_failures,
            release_failures: self.release_failures,
        }
    }
}

impl<T> fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("capacity", &self.capacity())
            .field("in_use", &self.in_use())
            .field("high_water", &self.high_water)
            .finish_non_exhaustive()
    }
}

fn check_capacity(pool: &'static str, capacity: usize) -> Result<(), PoolError> {
    if capacity == 0 {
        return Err(PoolError::ZeroCapacity { pool });
    }
    if capacity > POOL_CAPACITY_MAX {
        return Err(PoolError::CapacityTooLarge {
            pool,
            capacity,
            max: POOL_CAPACITY_MAX,
        });
    }
    Ok(())
}

/// Refills `free` with every index, lowest on top so a fresh pool lends slot 0 first.
fn fill_free_stack(free: &mut Vec<u32>, capacity: usize) {
    debug_assert!(free.capacity() >= capacity && capacity <= POOL_CAPACITY_MAX);
    free.clear();
    // `capacity <= u32::MAX`, checked at construction.
    free.extend((0..capacity as u32).rev());
}
