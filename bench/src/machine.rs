//! What machine the numbers came from, and which cores the benchmark threads run on.
//!
//! Pinning is best effort: if the core list is unavailable or has fewer than two cores,
//! nothing is pinned; if a pin call fails, the thread runs unpinned and the failure is
//! counted and reported. It never aborts a run.

use std::sync::atomic::{AtomicUsize, Ordering};

use core_affinity::CoreId;
use serde::Serialize;

/// The CPU model and core count, as reported in every row.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`, or `unknown`.
    pub cpu: String,
    /// Cores available to this process.
    pub cores: usize,
}

impl Machine {
    /// Reads the CPU model and the available parallelism of this process.
    pub fn detect() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self { cpu, cores }
    }
}

/// Which core each benchmark thread is pinned to.
///
/// Producer `i` goes to core `i mod n`, consumer `i` to core `(i + 1) mod n`, so a 1P/1C
/// pair always sits on two different cores. With more threads than cores, threads share.
#[derive(Debug)]
pub struct Pins {
    cores: Vec<CoreId>,
    failures: AtomicUsize,
}

/// The role of a benchmark thread, which decides its core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Pushes into a ring (or is the pinger's partner in a ping-pong).
    Producer,
    /// Pops from a ring (or the pinger in a ping-pong).
    Consumer,
}

impl Pins {
    /// Pins across the cores this process may run on, or pins nothing when there are
    /// fewer than two (a 1P/1C pair on one core would measure the scheduler).
    pub fn detect() -> Self {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        Self::from_cores(if cores.len() >= 2 { cores } else { Vec::new() })
    }

    /// Pins nothing: every thread floats.
    pub fn none() -> Self {
        Self::from_cores(Vec::new())
    }

    fn from_cores(cores: Vec<CoreId>) -> Self {
        Self {
            cores,
            failures: AtomicUsize::new(0),
        }
    }

    /// The core thread `index` of `role` is assigned, if pinning is on.
    pub fn core_for(&self, role: Role, index: usize) -> Option<usize> {
        if self.cores.is_empty() {
            return None;
        }
        let slot = match role {
            Role::Producer => index,
            Role::Consumer => index + 1,
        };
        Some(self.cores[slot % self.cores.len()].id)
    }

    /// Pins the calling thread as thread `index` of `role`; counts a failure if the OS refuses.
    pub fn pin_current(&self, role: Role, index: usize) {
        let Some(id) = self.core_for(role, index) else {
            return;
        };
        if !core_affinity::set_for_current(CoreId { id }) {
            // Relaxed: a diagnostic counter, read after all threads are joined.
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many pin calls the OS refused so far.
    pub fn failures(&self) -> usize {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether pinning is on at all.
    pub fn enabled(&self) -> bool {
        !self.cores.is_empty()
    }

    /// A one-line description for the report header.
    pub fn describe(&self) -> String {
        match (
            self.core_for(Role::Producer, 0),
            self.core_for(Role::Consumer, 0),
        ) {
            (Some(producer), Some(consumer)) => format!(
                "producer -> core {producer}, consumer -> core {consumer} ({} cores usable); \
                 2P/2C rows put two threads on each core; pin failures so far: {}",
                self.cores.len(),
                self.failures()
            ),
            _ => "off (fewer than two cores visible); threads float".to_owned(),
        }
    }
}
