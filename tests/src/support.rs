//! What the multi-process test files share: polling for a condition with a deadline, and a
//! deterministic random stream; and the simulators' seed files (`tests/seeds.txt`,
//! `tests/seeds_bft.txt`).

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

/// One line of a seeds file: `<sim arguments> expect=<checker|pass>  # why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedCase {
    /// Line number (from 1).
    pub line: usize,
    /// The simulator's arguments.
    pub arguments: String,
    /// `pass`, or the checker expected to fail.
    pub expect: String,
}

/// The cases of a seeds file's `text` (comments and blank lines skipped); panics naming
/// `file` on a line without `expect=`.
pub fn seed_cases(text: &str, file: &str) -> Vec<SeedCase> {
    let mut cases = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let (arguments, expect) = content
            .rsplit_once("expect=")
            .unwrap_or_else(|| panic!("{file} line {}: no expect=", index + 1));
        cases.push(SeedCase {
            line: index + 1,
            arguments: arguments.trim().to_string(),
            expect: expect.trim().to_string(),
        });
    }
    cases
}
