//! What the journal test files share: a temporary directory removed on drop, and a fresh
//! glommio executor to run one test body on.

// Each test file is its own crate and uses a subset.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// The extent lines of `filefrag -v path` (the file system's own extent map): one per
/// extent, `index: logical_start.. logical_end: physical.. : length: [expected] flags`.
fn extent_lines(path: &Path) -> Vec<String> {
    let output = Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs) runs; .ci/run installs it");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("ext:"),
        "filefrag could not map {}: {text} {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .filter(|line| {
            line.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .map(str::to_owned)
        .collect()
}

/// Extents of `path` that the file system marks unwritten (allocated, never written).
pub fn unwritten_extents(path: &Path) -> usize {
    extent_lines(path)
        .iter()
        .filter(|line| line.contains("unwritten"))
        .count()
}

/// File system blocks of `path` in unwritten extents.
pub fn unwritten_blocks(path: &Path) -> u64 {
    extent_lines(path)
        .iter()
        .filter(|line| line.contains("unwritten"))
        .map(|line| {
            // The fourth colon-separated field is the length.
            let length = line.split(':').nth(3).unwrap_or("").trim();
            length
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("no extent length in {line:?}"))
        })
        .sum()
}
