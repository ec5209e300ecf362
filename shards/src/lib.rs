//! percore-shards: the per-core runtime that wires engine and net together.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
