//! Bounded lock-free rings: the shard's transaction queue and the inter-core mesh.
//!
//! `spsc` is the workhorse (one producer, one consumer: the inter-core mesh, ingest to
//! batcher). `mpmc` serves many application threads submitting into one shard. Both are
//! allocated once at construction and never allocate again; a full ring hands the item back.
//! `waiters` is where a thread that found a ring full backs off and parks, and how the
//! thread that makes room wakes it without a lock on its fast path. `lanes` spreads many
//! producers over several MPMC rings that one consumer drains in turn.

pub mod lanes;
pub mod metrics;
pub mod mpmc;
pub mod spsc;
#[cfg(all(test, not(loom)))]
mod test_support;
pub mod waiters;

pub use metrics::{Counting, NoMetrics, RingMetrics, RingStats};
pub use spsc::Full;
