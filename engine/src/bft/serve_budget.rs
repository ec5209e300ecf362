//! The budget a replica serves one peer from: a token bucket refilled at a rate from the
//! `now_us` its caller passes in, counted in whatever the caller spends (committed ops for
//! `StateRequest`s, bytes for the driver's snapshot chunks). It owns two integers and never
//! reads a clock or allocates; its owner keeps one per peer, allocated when it is built.

/// Millionths of a unit (an op, a byte) per unit: refilling `units_per_s` units per second
/// adds `units_per_s` of these per µs, so the bucket needs no division and loses no
/// fraction of a unit.
const MICRO_UNITS_PER_UNIT: u64 = 1_000_000;

/// One peer's serve budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeBudget {
    /// Units it may still serve, in millionths of a unit (at most the capacity).
    micro_units: u64,
    /// When it was last refilled (µs; never moves back).
    refilled_us: u64,
}

impl ServeBudget {
    /// A full budget of `capacity_units` at `now_us`.
    pub fn full(capacity_units: u64, now_us: u64) -> ServeBudget {
        ServeBudget {
            micro_units: capacity_units.saturating_mul(MICRO_UNITS_PER_UNIT),
            refilled_us: now_us,
        }
    }

    /// Refills the budget for the time since the last refill (`units_per_s`, capped at
    /// `capacity_units`), then spends `units` if it holds them. Returns whether it did; a
    /// refused request spends nothing. A clock that moves back refills nothing.
    pub fn try_spend(
        &mut self,
        now_us: u64,
        units: u64,
        (units_per_s, capacity_units): (u64, u64),
    ) -> bool {
        debug_assert!(units_per_s > 0 && capacity_units > 0);
        let capacity = capacity_units.saturating_mul(MICRO_UNITS_PER_UNIT);
        let elapsed_us = now_us.saturating_sub(self.refilled_us);
        self.refilled_us = self.refilled_us.max(now_us);
        self.micro_units = self
            .micro_units
            .saturating_add(elapsed_us.saturating_mul(units_per_s))
            .min(capacity);
        let cost = units.saturating_mul(MICRO_UNITS_PER_UNIT);
        if cost > self.micro_units {
            return false;
        }
        self.micro_units -= cost;
        debug_assert!(self.micro_units <= capacity);
        true
    }

    /// When, at the earliest, the budget holds `units` (refilling at `units_per_s`; its
    /// last refill, if it holds them already; `u64::MAX` if it never will, above
    /// `capacity_units`): when a request it refused can be served.
    pub fn available_at_us(&self, units: u64, (units_per_s, capacity_units): (u64, u64)) -> u64 {
        debug_assert!(units_per_s > 0);
        if units > capacity_units {
            return u64::MAX;
        }
        let missing = units
            .saturating_mul(MICRO_UNITS_PER_UNIT)
            .saturating_sub(self.micro_units);
        self.refilled_us
            .saturating_add(missing.div_ceil(units_per_s))
    }

    /// Whole units the budget holds (as of its last refill).
    #[cfg(test)]
    pub(crate) fn units(&self) -> u64 {
        self.micro_units / MICRO_UNITS_PER_UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::ServeBudget;

    const RATE: (u64, u64) = (1_000, 64);

    #[test]
    fn serve_budget_spends_down_to_empty_then_refills_at_its_rate() {
        let mut budget = ServeBudget::full(64, 10);
        for _ in 0..4 {
            assert!(budget.try_spend(10, 16, RATE));
        }
        assert_eq!(budget.units(), 0);
        assert!(!budget.try_spend(10, 1, RATE));
        // 1,000 ops/s: 15.999 ms is not yet 16 ops, 16 ms is.
        assert!(!budget.try_spend(10 + 15_999, 16, RATE));
        assert!(budget.try_spend(10 + 16_000, 16, RATE));
        assert_eq!(budget.units(), 0);
    }

    #[test]
    fn serve_budget_refills_no_further_than_its_capacity() {
        let mut budget = ServeBudget::full(64, 0);
        assert!(budget.try_spend(0, 64, RATE));
        assert!(
            budget.try_spend(u64::MAX, 64, RATE),
            "a long idle time refills it"
        );
        assert!(
            !budget.try_spend(u64::MAX, 1, RATE),
            "but only to its capacity"
        );
        assert!(!budget.try_spend(u64::MAX, 65, RATE));
    }

    #[test]
    fn serve_budget_refills_nothing_when_the_clock_moves_back() {
        let mut budget = ServeBudget::full(64, 1_000_000);
        assert!(budget.try_spend(1_000_000, 64, RATE));
        assert!(!budget.try_spend(0, 1, RATE));
        // The refill counts from the latest time seen, not from the earlier one.
        assert!(!budget.try_spend(1_000_500, 1, RATE));
        assert!(budget.try_spend(1_001_000, 1, RATE));
    }

    #[test]
    fn serve_budget_says_when_it_can_serve_what_it_refused() {
        let mut budget = ServeBudget::full(64, 10);
        assert_eq!(budget.available_at_us(64, RATE), 10, "full: at once");
        assert!(budget.try_spend(10, 64, RATE));
        // 1,000 ops/s: 16 ops in 16 ms, and not a µs before.
        let at = budget.available_at_us(16, RATE);
        assert_eq!(at, 10 + 16_000);
        assert!(!budget.try_spend(at - 1, 16, RATE));
        assert!(budget.try_spend(at, 16, RATE));
        assert_eq!(
            budget.available_at_us(65, RATE),
            u64::MAX,
            "never above capacity"
        );
    }

    #[test]
    fn serve_budget_refuses_a_request_larger_than_it_holds_whole() {
        let mut budget = ServeBudget::full(64, 0);
        assert!(!budget.try_spend(0, 65, RATE));
        assert_eq!(budget.units(), 64, "a refused request spends nothing");
    }
}
