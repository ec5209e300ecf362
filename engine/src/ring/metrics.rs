//! Ring metrics that cost nothing when unused.
//!
//! Rings are generic over `M: RingMetrics`. The default, [`NoMetrics`], is a zero-sized
//! type whose methods are empty and inline away. [`Counting`] keeps relaxed atomic
//! counters on their own cache lines.

use crate::sync::{AtomicU64, Ordering};
use crossbeam_utils::CachePadded;

/// A snapshot of a ring's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Items pushed successfully.
    pub pushed: u64,
    /// Items popped.
    pub popped: u64,
    /// Push attempts (single or batch) that found the ring full.
    pub full_events: u64,
}

/// Hooks a ring calls on its hot paths.
pub trait RingMetrics: Default + Send + Sync {
    /// `count` items were pushed.
    fn on_push(&self, count: usize);
    /// `count` items were popped.
    fn on_pop(&self, count: usize);
    /// A push found the ring full.
    fn on_full(&self);
    /// Current counter values (all zero for [`NoMetrics`]).
    fn stats(&self) -> RingStats;
}

/// No counters: every hook is empty.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetrics;

impl RingMetrics for NoMetrics {
    #[inline(always)]
    fn on_push(&self, _count: usize) {}
    #[inline(always)]
    fn on_pop(&self, _count: usize) {}
    #[inline(always)]
    fn on_full(&self) {}
    fn stats(&self) -> RingStats {
        RingStats::default()
    }
}

/// Relaxed counters, each on its own cache line so producer and consumer do not share one.
#[derive(Debug, Default)]
pub struct Counting {
    pushed: CachePadded<AtomicU64>,
    popped: CachePadded<AtomicU64>,
    full_events: CachePadded<AtomicU64>,
}

impl RingMetrics for Counting {
    #[inline]
    fn on_push(&self, count: usize) {
        // Relaxed: counters are statistics, they order nothing.
        self.pushed.fetch_add(count as u64, Ordering::Relaxed);
    }
    #[inline]
    fn on_pop(&self, count: usize) {
        self.popped.fetch_add(count as u64, Ordering::Relaxed);
    }
    #[inline]
    fn on_full(&self) {
        self.full_events.fetch_add(1, Ordering::Relaxed);
    }
    fn stats(&self) -> RingStats {
        RingStats {
            pushed: self.pushed.load(Ordering::Relaxed),
            popped: self.popped.load(Ordering::Relaxed),
            full_events: self.full_events.load(Ordering::Relaxed),
        }
    }
}
