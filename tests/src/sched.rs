//! The event-queue entry both simulators schedule: a `BinaryHeap` of them pops the earliest
//! event first, ties in the order they were scheduled (so one seed replays one run).

use std::cmp::Ordering;

/// `event` due at `time_us`, the `sequence`-th event scheduled.
#[derive(Debug)]
pub struct Scheduled<E> {
    /// When it is due (simulated µs).
    pub time_us: u64,
    /// Scheduling order: breaks ties between events due at the same time.
    pub sequence: u64,
    /// What happens.
    pub event: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.time_us, self.sequence) == (other.time_us, other.sequence)
    }
}

impl<E> Eq for Scheduled<E> {}

impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Scheduled<E> {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest event goes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time_us, other.sequence).cmp(&(self.time_us, self.sequence))
    }
}
