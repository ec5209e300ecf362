//! What the journal test files share: a temporary directory removed on drop, and a fresh
//! glommio executor to run one test body on.

// Each test file is its own crate and uses a subset.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;

/// Registered io memory of [`run_small`] executors (bytes): well under the 8 MiB memlock
/// limit, even with several tests running at once.
pub const IO_MEMORY_BYTES_TEST: usize = 1 << 20;

/// `percore-<suite>-<name>-<pid>` under the temporary directory, emptied when created and
/// removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(suite: &str, name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("percore-{suite}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }

    /// Shard `shard`'s journal directory at the root.
    pub fn shard_dir(&self, shard: u32) -> PathBuf {
        self.0.join(format!("shard-{shard}"))
    }

    /// Shard `shard`'s journal directory of `case` (a replica, a scenario).
    pub fn case_shard_dir(&self, case: &str, shard: u32) -> PathBuf {
        self.0.join(case).join(format!("shard-{shard}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `make()` to completion on a fresh glommio executor.
pub fn run<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(make)
        .expect("executor starts")
        .join()
        .expect("executor finishes");
}

/// [`run`] with [`IO_MEMORY_BYTES_TEST`] of registered io memory.
pub fn run_small<F, Fut>(make: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .io_memory(IO_MEMORY_BYTES_TEST)
        .spawn(make)
        .expect("executor starts")
        .join()
        .expect("executor finishes");
}
