//! percore-tests: integration, simulation and multi-process fault tests live here.
//!
//! [`sim`] is the deterministic cluster simulator (`cargo run -p percore-tests --bin sim`).

pub mod sim;
