//! Locked-memory budget for io_uring.
//!
//! glommio registers `io_memory` bytes per executor with io_uring, which the kernel counts
//! against RLIMIT_MEMLOCK (unless the process has CAP_IPC_LOCK). We size that memory from
//! the configuration, try to raise the soft limit up to the hard limit when it is too low,
//! and otherwise fail with a message that names the limit and the fix.

use thiserror::Error;

/// glommio refuses to start an executor below this limit.
pub const MEMLOCK_BYTES_MIN: u64 = 512 * 1024;

/// Locked memory the node cannot get.
#[derive(Debug, Error)]
pub enum MemlockError {
    /// The limit is below what the configured shards need and could not be raised.
    #[error(
        "RLIMIT_MEMLOCK is {current_bytes} bytes but {shards} shard(s) x io_memory {io_memory_bytes} bytes \
         need {needed_bytes} bytes (hard limit {hard_bytes}); raise it with `ulimit -l {needed_kib}` \
         (or LimitMEMLOCK= in the systemd unit), or lower --io-memory-kib"
    )]
    TooLow {
        /// Soft limit in force.
        current_bytes: u64,
        /// Hard limit in force.
        hard_bytes: u64,
        /// What the configuration needs.
        needed_bytes: u64,
        /// The same in KiB, for the ulimit hint.
        needed_kib: u64,
        /// Shards configured.
        shards: usize,
        /// Per-shard io_uring memory.
        io_memory_bytes: usize,
    },
    /// getrlimit/setrlimit failed.
    #[error("cannot read or set RLIMIT_MEMLOCK: {0}")]
    Os(#[from] std::io::Error),
}

/// What [`ensure`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemlockBudget {
    /// Soft limit before.
    pub before_bytes: u64,
    /// Soft limit after (raised if it was too low and the hard limit allowed).
    pub after_bytes: u64,
    /// What the configuration needs.
    pub needed_bytes: u64,
}

fn get() -> std::io::Result<(u64, u64)> {
    rlimit::Resource::MEMLOCK.get()
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    rlimit::Resource::MEMLOCK.set(soft, hard)
}

/// Makes sure `shards` executors with `io_memory_bytes` each can lock their memory.
///
/// Root (CAP_SYS_RESOURCE) may raise the hard limit too; others up to the hard limit.
pub fn ensure(shards: usize, io_memory_bytes: usize) -> Result<MemlockBudget, MemlockError> {
    // Rings, slab and page rounding: glommio rounds io_memory up and needs a floor.
    let per_shard = (io_memory_bytes as u64).max(64 * 1024) + 64 * 1024;
    let needed_bytes = (per_shard * shards as u64).max(MEMLOCK_BYTES_MIN);
    let (before_bytes, hard_bytes) = get()?;
    if before_bytes == rlimit::INFINITY || before_bytes >= needed_bytes {
        return Ok(MemlockBudget {
            before_bytes,
            after_bytes: before_bytes,
            needed_bytes,
        });
    }
    let raised = if hard_bytes == rlimit::INFINITY || hard_bytes >= needed_bytes {
        set(needed_bytes, hard_bytes).is_ok()
    } else {
        // Raising the hard limit needs CAP_SYS_RESOURCE; try, and fall through if refused.
        set(needed_bytes, needed_bytes).is_ok()
    };
    let (after_bytes, hard_after) = get()?;
    if raised && after_bytes >= needed_bytes {
        return Ok(MemlockBudget {
            before_bytes,
            after_bytes,
            needed_bytes,
        });
    }
    Err(MemlockError::TooLow {
        current_bytes: after_bytes,
        hard_bytes: hard_after,
        needed_bytes,
        needed_kib: needed_bytes.div_ceil(1024),
        shards,
        io_memory_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_budget_is_already_satisfied_or_raised() {
        let budget = ensure(1, 64 * 1024).expect("64 KiB fits any sane limit");
        assert!(budget.after_bytes >= budget.needed_bytes);
        assert!(budget.needed_bytes >= MEMLOCK_BYTES_MIN);
    }

    #[test]
    fn impossible_budget_names_the_limit() {
        // Only meaningful without CAP_SYS_RESOURCE/infinite limits: skip where it would pass.
        let (soft, hard) = get().unwrap();
        if soft == rlimit::INFINITY || hard == rlimit::INFINITY {
            return;
        }
        match ensure(1 << 20, 1 << 30) {
            Err(err @ MemlockError::TooLow { .. }) => {
                let text = err.to_string();
                assert!(text.contains("RLIMIT_MEMLOCK"), "{text}");
                assert!(text.contains("ulimit -l"), "{text}");
            }
            Ok(budget) => assert!(budget.after_bytes >= budget.needed_bytes, "root raised it"),
            Err(other) => panic!("unexpected {other}"),
        }
    }
}
