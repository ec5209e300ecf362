//! percore-tests: integration, simulation and multi-process fault tests live here.
//!
//! [`sim`] is the deterministic cluster simulator (`cargo run -p percore-tests --bin sim`);
//! [`bft_sim`] simulates one Byzantine-fault-tolerant group (`--bin sim_bft`).

pub mod bft_sim;
pub mod node;
pub mod sched;
pub mod sim;
pub mod support;
