//! Cross-core return of borrowed slots: an SPSC ring of [`Handle`]s, never a lock.
//!
//! A slot borrowed on its home core and finished on another core is sent home with
//! [`ReturnPath::send_home`]; the home core releases it with
//! [`super::Pool::reclaim_from`]. One `ReturnPath` per (remote core, pool) pair, since the
//! ring has a single producer; the home core drains each of its consumers.

use super::Handle;
use crate::ring::spsc;
use std::fmt;

/// The remote core's end of a return ring: sends finished handles to their home pool.
pub struct ReturnPath {
    producer: spsc::Producer<Handle>,
}

impl ReturnPath {
    /// Wraps the producer of a ring whose consumer the home core passes to
    /// [`super::Pool::reclaim_from`].
    pub fn new(producer: spsc::Producer<Handle>) -> Self {
        Self { producer }
    }

    /// Sends `handle` home. If the ring is full the handle comes back and the caller
    /// keeps it (retries next loop turn); it is never dropped. A ring of
    /// [`return_channel_capacity`] slots is never full while each handle is sent once.
    #[inline]
    pub fn send_home(&mut self, handle: Handle) -> Result<(), Handle> {
        self.producer.push(handle).map_err(spsc::Full::into_inner)
    }
}

impl fmt::Debug for ReturnPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReturnPath").finish_non_exhaustive()
    }
}

/// Ring capacity for returning handles to a pool of `pool_capacity` slots: the smallest
/// power of two that holds every slot, so [`ReturnPath::send_home`] cannot find it full.
pub fn return_channel_capacity(pool_capacity: usize) -> usize {
    debug_assert!(pool_capacity <= super::POOL_CAPACITY_MAX);
    spsc::capacity_for(pool_capacity)
}

/// A return ring for a pool of `pool_capacity` slots (allocated now, at start-up):
/// give the [`ReturnPath`] to the remote core, keep the consumer on the home core.
pub fn return_channel(pool_capacity: usize) -> (ReturnPath, spsc::Consumer<Handle>) {
    let (producer, consumer) = spsc::channel(return_channel_capacity(pool_capacity));
    (ReturnPath::new(producer), consumer)
}
