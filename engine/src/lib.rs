//! percore-engine: the foundation every shard is built from.
//!
//! This crate owns the limits, the lock-free rings, the preallocated pools, the record
//! and log formats and (later) the sans-IO replication core. It must never perform I/O,
//! read a clock or draw randomness of its own: time and randomness are injected so that
//! one seed replays one run. `unsafe` is confined to `ring` and `pool`. Its one system
//! call is a memory hint: `pool::table` advises large tables for huge pages.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod batch;
pub mod bft;
pub mod checksum;
pub mod frame;
pub mod journal;
pub mod ledger;
pub mod limits;
pub mod message;
pub mod placement;
pub mod pool;
pub mod record;
pub mod replica;
pub mod ring;
pub mod session;
pub mod state_machine;
pub(crate) mod sync;
