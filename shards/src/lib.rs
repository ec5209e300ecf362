//! percore-shards: the per-core runtime that wires engine and net together.
//!
//! A [`runtime::Node`] runs one shard per configured core, each on its own pinned glommio
//! executor with its own io_uring. A shard is a [`core::ShardCore`] (sans-IO: pools, ring,
//! batcher, state machine) driven by the runtime's socket and mesh tasks. Shards share
//! nothing but SPSC rings.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod affinity;
pub mod bft;
pub mod bft_bench;
pub mod bft_held;
pub mod bft_prepared;
pub mod bft_snapshot;
pub mod bft_xshard;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod core;
pub mod format;
pub mod hugepages;
pub mod ingest;
pub mod inspect;
pub mod io_fence;
pub mod journal;
pub mod loadgen;
pub mod memlock;
pub mod mesh;
pub mod metrics;
pub mod pacing;
pub mod peer_link;
pub mod replication;
pub mod runtime;
pub mod series_report;
pub mod soak;
pub mod status;
pub mod sync;
