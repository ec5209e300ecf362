//! Batch sealing policy and its adaptive controller.
//!
//! The batcher pops transactions from the shard's ring in bulk and must decide when a batch
//! is sealed: at `entries_max`, at `bytes_max`, or when the oldest pending entry has waited
//! `linger_us`. A fixed policy is wrong at both ends of the load curve: at low load any
//! linger is pure added latency, at high load tiny batches waste the per-batch cost (journal
//! write, replication round trip, fsync).
//!
//! [`BatchController`] is the seed's "ML-guided rebalancing", done honestly: a small,
//! deterministic feedback rule driven by measured queue depth, documented in
//! docs/architecture.md ("Adaptive batching"):
//!
//! * it keeps an EWMA of the ring depth seen at each batcher turn (alpha = 1/8);
//! * the *effective* entry target is that EWMA rounded up to a power of two, clamped to
//!   `[entries_min, entries_max]`: a deep queue asks for large batches, a shallow one for
//!   small ones, so a batch is sealed as soon as the work that is there has been taken;
//! * the *effective* linger doubles (from 1 µs, up to `linger_us_max`) each time a batch
//!   fills to its target (more work is arriving than one batch holds: waiting is cheap
//!   relative to throughput) and halves each time a batch is sealed by the linger timer
//!   while less than half full (waiting bought nothing: latency first).
//!
//! The controller owns no clock: `now_us` is passed in, so the simulator replays it exactly.
//! It never allocates.

use thiserror::Error;

use crate::limits::{BATCH_ENTRIES_MAX_DEFAULT, BATCH_ENTRIES_MAX_LIMIT};

/// Default cap on the bytes of records in one batch.
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1_000 * 128;
/// Default upper bound of the adaptive linger (µs).
pub const LINGER_US_MAX_DEFAULT: u64 = 200;
/// Smallest entry target the controller will choose.
pub const BATCH_ENTRIES_MIN_DEFAULT: usize = 16;

/// Why a batch was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealReason {
    /// The batch reached the effective entry target.
    Entries,
    /// The next entry would exceed `bytes_max`.
    Bytes,
    /// The oldest entry waited the effective linger.
    Linger,
    /// The ring was drained and the controller decided not to wait (linger is zero).
    Drained,
}

/// Static bounds of the batch policy, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Largest number of entries in one batch (`--batch-entries-max`).
    pub entries_max: usize,
    /// Smallest entry target the controller may choose.
    pub entries_min: usize,
    /// Largest number of record bytes in one batch (`--batch-bytes-max`).
    pub bytes_max: usize,
    /// Largest linger the controller may choose (`--linger-us`); 0 disables lingering.
    pub linger_us_max: u64,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            entries_max: BATCH_ENTRIES_MAX_DEFAULT,
            entries_min: BATCH_ENTRIES_MIN_DEFAULT,
            bytes_max: BATCH_BYTES_MAX_DEFAULT,
            linger_us_max: LINGER_US_MAX_DEFAULT,
        }
    }
}

/// A batch policy that cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BatchLimitsError {
    /// `entries_max` is zero or above [`BATCH_ENTRIES_MAX_LIMIT`].
    #[error("batch_entries_max = {0} must be in 1..={BATCH_ENTRIES_MAX_LIMIT}")]
    EntriesMax(usize),
    /// `entries_min` is zero or above `entries_max`.
    #[error("batch_entries_min = {min} must be in 1..=batch_entries_max ({max})")]
    EntriesMin {
        /// The configured minimum.
        min: usize,
        /// The configured maximum.
        max: usize,
    },
    /// `bytes_max` cannot hold even one record.
    #[error("batch_bytes_max = {bytes_max} cannot hold one record of {record_bytes} bytes")]
    BytesMax {
        /// The configured byte cap.
        bytes_max: usize,
        /// The record size it must hold.
        record_bytes: usize,
    },
}

impl BatchLimits {
    /// Checks the limits against each other and against a record size.
    pub fn validate(&self, record_bytes: usize) -> Result<(), BatchLimitsError> {
        if self.entries_max == 0 || self.entries_max > BATCH_ENTRIES_MAX_LIMIT {
            return Err(BatchLimitsError::EntriesMax(self.entries_max));
        }
        if self.entries_min == 0 || self.entries_min > self.entries_max {
            return Err(BatchLimitsError::EntriesMin {
                min: self.entries_min,
                max: self.entries_max,
            });
        }
        if self.bytes_max < record_bytes {
            return Err(BatchLimitsError::BytesMax {
                bytes_max: self.bytes_max,
                record_bytes,
            });
        }
        Ok(())
    }

    /// Entries that fit in one batch for records of `record_bytes` (both caps applied).
    pub fn entries_cap(&self, record_bytes: usize) -> usize {
        debug_assert!(record_bytes > 0);
        self.entries_max.min(self.bytes_max / record_bytes).max(1)
    }
}

/// The controller's observable state, exported as metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchControllerState {
    /// Current entry target.
    pub entries_target: usize,
    /// Current linger (µs).
    pub linger_us: u64,
    /// EWMA of the observed ring depth, in 1/256 entries (fixed point, deterministic).
    pub depth_ewma_x256: u64,
    /// Batches sealed, by reason: entries, bytes, linger, drained.
    pub sealed_by: [u64; 4],
}

/// Adaptive batch-size and linger controller. See the module docs for the rule.
#[derive(Debug, Clone)]
pub struct BatchController {
    limits: BatchLimits,
    entries_cap: usize,
    state: BatchControllerState,
}

impl BatchController {
    /// A controller for records of `record_bytes`; starts latency-first (small target, no linger).
    pub fn new(limits: BatchLimits, record_bytes: usize) -> Result<Self, BatchLimitsError> {
        limits.validate(record_bytes)?;
        let entries_cap = limits.entries_cap(record_bytes);
        let state = BatchControllerState {
            entries_target: limits.entries_min.min(entries_cap),
            linger_us: 0,
            depth_ewma_x256: 0,
            sealed_by: [0; 4],
        };
        Ok(Self {
            limits,
            entries_cap,
            state,
        })
    }

    /// The static limits.
    pub fn limits(&self) -> &BatchLimits {
        &self.limits
    }

    /// Hard cap on entries per batch (bytes and entries limits applied).
    pub fn entries_cap(&self) -> usize {
        self.entries_cap
    }

    /// The current state (for metrics).
    pub fn state(&self) -> BatchControllerState {
        self.state
    }

    /// Current entry target.
    pub fn entries_target(&self) -> usize {
        self.state.entries_target
    }

    /// Current linger (µs).
    pub fn linger_us(&self) -> u64 {
        self.state.linger_us
    }

    /// Feeds one observation of the ring depth (entries waiting, including those already
    /// taken into the open batch). Called once per batcher turn.
    pub fn observe_depth(&mut self, depth: usize) {
        // EWMA with alpha = 1/8 in 1/256 fixed point: integer-only, so replays are exact.
        let sample = (depth as u64).saturating_mul(256);
        let ewma = self.state.depth_ewma_x256;
        self.state.depth_ewma_x256 = ewma - ewma / 8 + sample / 8;
        let depth_estimate = (self.state.depth_ewma_x256 / 256) as usize;
        let target = depth_estimate.max(1).next_power_of_two();
        self.state.entries_target = target.clamp(
            self.limits.entries_min.min(self.entries_cap),
            self.entries_cap,
        );
        debug_assert!(
            self.state.entries_target >= 1 && self.state.entries_target <= self.entries_cap
        );
    }

    /// Decides whether an open batch must be sealed now.
    ///
    /// `entries`: entries in the open batch; `next_record_bytes`: bytes the open batch would
    /// hold after one more record; `oldest_us`: when its oldest entry arrived;
    /// `ring_empty`: whether the ring had nothing more to give this turn.
    pub fn should_seal(
        &self,
        now_us: u64,
        entries: usize,
        next_bytes: usize,
        oldest_us: u64,
        ring_empty: bool,
    ) -> Option<SealReason> {
        if entries == 0 {
            return None;
        }
        if entries >= self.entries_cap.min(self.limits.entries_max) {
            return Some(SealReason::Entries);
        }
        if next_bytes > self.limits.bytes_max {
            return Some(SealReason::Bytes);
        }
        if entries >= self.state.entries_target {
            return Some(SealReason::Entries);
        }
        if !ring_empty {
            // More is already waiting: take it before deciding anything.
            return None;
        }
        if self.state.linger_us == 0 {
            return Some(SealReason::Drained);
        }
        if now_us.saturating_sub(oldest_us) >= self.state.linger_us {
            return Some(SealReason::Linger);
        }
        None
    }

    /// When the open batch must be sealed by the linger timer at the latest.
    pub fn deadline_us(&self, oldest_us: u64) -> u64 {
        oldest_us.saturating_add(self.state.linger_us)
    }

    /// Records that a batch of `entries` was sealed for `reason`, and adapts the linger.
    pub fn on_sealed(&mut self, entries: usize, reason: SealReason) {
        debug_assert!(entries > 0);
        let index = match reason {
            SealReason::Entries => 0,
            SealReason::Bytes => 1,
            SealReason::Linger => 2,
            SealReason::Drained => 3,
        };
        self.state.sealed_by[index] += 1;
        let linger = self.state.linger_us;
        self.state.linger_us = match reason {
            SealReason::Entries | SealReason::Bytes => linger
                .max(1)
                .saturating_mul(2)
                .min(self.limits.linger_us_max),
            SealReason::Linger if entries * 2 < self.state.entries_target => linger / 2,
            SealReason::Linger | SealReason::Drained => linger,
        };
        debug_assert!(self.state.linger_us <= self.limits.linger_us_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> BatchController {
        BatchController::new(BatchLimits::default(), 128).unwrap()
    }

    #[test]
    fn limits_are_validated() {
        let bad = BatchLimits {
            entries_max: 0,
            ..BatchLimits::default()
        };
        assert_eq!(bad.validate(128), Err(BatchLimitsError::EntriesMax(0)));
        let bad = BatchLimits {
            entries_max: BATCH_ENTRIES_MAX_LIMIT + 1,
            ..BatchLimits::default()
        };
        assert!(matches!(
            bad.validate(128),
            Err(BatchLimitsError::EntriesMax(_))
        ));
        let bad = BatchLimits {
            entries_min: 2_000,
            ..BatchLimits::default()
        };
        assert!(matches!(
            bad.validate(128),
            Err(BatchLimitsError::EntriesMin { .. })
        ));
        let bad = BatchLimits {
            bytes_max: 64,
            ..BatchLimits::default()
        };
        assert!(matches!(
            bad.validate(128),
            Err(BatchLimitsError::BytesMax { .. })
        ));
        assert_eq!(BatchLimits::default().validate(128), Ok(()));
    }

    #[test]
    fn bytes_cap_bounds_entries() {
        let limits = BatchLimits {
            bytes_max: 10 * 128,
            ..BatchLimits::default()
        };
        let c = BatchController::new(limits, 128).unwrap();
        assert_eq!(c.entries_cap(), 10);
        assert_eq!(
            c.should_seal(0, 10, 11 * 128, 0, false),
            Some(SealReason::Entries)
        );
    }

    #[test]
    fn idle_load_seals_immediately() {
        let mut c = controller();
        c.observe_depth(1);
        assert_eq!(c.linger_us(), 0);
        assert_eq!(c.should_seal(5, 1, 256, 5, true), Some(SealReason::Drained));
    }

    #[test]
    fn deep_queue_grows_target_and_linger() {
        let mut c = controller();
        for _ in 0..64 {
            c.observe_depth(5_000);
        }
        assert_eq!(c.entries_target(), 1_000, "target clamps at entries_max");
        for _ in 0..20 {
            c.on_sealed(1_000, SealReason::Entries);
        }
        assert_eq!(c.linger_us(), LINGER_US_MAX_DEFAULT);
        assert_eq!(
            c.should_seal(0, 999, 1_000 * 128, 0, true),
            None,
            "waits for a full batch"
        );
        assert_eq!(
            c.should_seal(LINGER_US_MAX_DEFAULT, 999, 1_000 * 128, 0, true),
            Some(SealReason::Linger)
        );
    }

    #[test]
    fn linger_shrinks_when_waiting_buys_nothing() {
        let mut c = controller();
        for _ in 0..64 {
            c.observe_depth(512);
        }
        for _ in 0..10 {
            c.on_sealed(512, SealReason::Entries);
        }
        let before = c.linger_us();
        assert!(before > 0);
        for _ in 0..5 {
            c.observe_depth(2);
        }
        c.on_sealed(3, SealReason::Linger);
        assert_eq!(c.linger_us(), before / 2);
        for _ in 0..20 {
            c.on_sealed(1, SealReason::Linger);
        }
        assert_eq!(c.linger_us(), 0);
    }

    #[test]
    fn target_follows_depth_down() {
        let mut c = controller();
        for _ in 0..64 {
            c.observe_depth(4_096);
        }
        assert_eq!(c.entries_target(), 1_000);
        for _ in 0..128 {
            c.observe_depth(0);
        }
        assert_eq!(c.entries_target(), BATCH_ENTRIES_MIN_DEFAULT);
        assert_eq!(c.state().sealed_by, [0; 4]);
    }
}
