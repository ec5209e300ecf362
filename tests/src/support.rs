//! What the multi-process test files share: polling for a condition with a deadline, and a
//! deterministic random stream.

use std::time::{Duration, Instant};

/// Interval between two polls of [`wait_until`].
pub const POLL_INTERVAL_MS: u64 = 50;

/// Polls `probe` every [`POLL_INTERVAL_MS`] until it returns a value; panics naming `what`
/// once `timeout` has passed.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(POLL_INTERVAL_MS));
    }
}

/// A deterministic xorshift stream (seed must be nonzero).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
