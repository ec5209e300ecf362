//! percore-bench: throughput and latency of percore's rings and pools against peer crates.
//!
//! This crate owns the benchmark kernels, the interleaved measurement harness and the
//! report format. Every row measures OURS and one PEER in the same process, alternating
//! rounds (ours, peer, ours, peer, ...) so that machine noise hits both alike, and reports
//! the median round. Every kernel returns a checksum of the keys it moved, and the harness
//! checks it: a benchmark that loses or duplicates items fails loudly instead of looking fast.
//! It must never assert on timings: benchmarks report, they do not judge.

pub mod disk;
pub mod harness;
pub mod item;
pub mod machine;
pub mod pools;
pub mod rings;
pub mod threads;

pub use harness::{Bench, Metric, RowResult, Sample};
pub use item::Item;
pub use machine::{Machine, Pins};
