//! Helpers shared by the SPSC and MPMC unit tests (compiled for tests only).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Scales sizes down under miri, which is ~1000x slower.
pub(crate) const fn scaled(n: usize) -> usize {
    if cfg!(miri) { n / 50 } else { n }
}

/// Counts its drops in a shared counter, so a test can prove each item drops once.
#[derive(Debug)]
pub(crate) struct DropCounter {
    pub(crate) value: usize,
    drops: Arc<AtomicUsize>,
}

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// One counted item.
pub(crate) fn counter(value: usize, drops: &Arc<AtomicUsize>) -> DropCounter {
    DropCounter {
        value,
        drops: Arc::clone(drops),
    }
}

/// Counted items `0..n`.
pub(crate) fn counters(
    n: usize,
    drops: &Arc<AtomicUsize>,
) -> impl Iterator<Item = DropCounter> + '_ {
    (0..n).map(|value| counter(value, drops))
}
