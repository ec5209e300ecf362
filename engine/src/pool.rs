//! Fixed-capacity per-shard object pools. (in progress)
